"""Command line of sru_cupy: ``python -m sru_cupy COMMAND ...`` (console script ``sru-cupy``).

Commands:
  compile      compile every kernel instantiation to PTX with NVRTC (no GPU needed) into a folder
               that ``$SRU_CUPY_PTX_DIR`` can name (see :mod:`sru_cupy.ptx`)
  info         versions, GPUs, which backend each path uses and why, the kernel cache folders
  bench        SRU vs LSTM, Conv1d and the ``sru`` package; the kernel vs its memory floor
  cache        list the kernel cache's entries with sizes and ages; --clear empties it, --prune
               removes the entries of other kernel source versions and stale files
  clear-cache  empty sru_cupy's kernel cache folder (as ``cache --clear``)

Adding a command: write ``_add_NAME_arguments(parser)`` and ``_run_NAME(args) -> exit code`` and
register them in ``COMMANDS``. A command reports a failure the user can act on by raising
:class:`CommandError` (or one of the errors in ``_USER_ERRORS``): ``main`` prints it and exits 1.
Heavy imports belong inside the ``_run_`` function so that ``--help`` stays fast and importing this
module never touches CUDA.
"""

import argparse
import collections
import os
import sys

PROG = "python -m sru_cupy"


class CommandError(Exception):
    """A failure reported to the user as ``PROG COMMAND: error: message`` with exit code 1."""


Command = collections.namedtuple("Command", "help add_arguments run")


# ---------------------------------------------------------------------------------------------
# compile


def _arch_argument(value):
    from . import ptx

    try:
        return ptx.parse_arch(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cuda_argument(value):
    from . import ptx

    try:
        return ptx.parse_cuda_version(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_compile_arguments(parser):
    from . import ptx

    default_archs = " ".join(f"sm_{arch}" for arch in ptx.DEFAULT_ARCHS)
    parser.add_argument("--arch", action="append", type=_arch_argument, metavar="ARCH",
                        help=f"target architecture, e.g. sm_90, 90 or compute_90; repeat for several "
                             f"(default: {default_archs})")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for the PTX files and manifest.json (default: the ptx folder of "
                             "the sru_cupy cache)")
    parser.add_argument("--nvrtc", action="append", metavar="LIBRARY",
                        help="libnvrtc to use instead of searching (repeat for several); each "
                             "architecture uses the newest one that supports it")
    parser.add_argument("--cuda", type=_cuda_argument, metavar="X.Y",
                        help="oldest CUDA driver release the PTX must load on, e.g. 12.4: each "
                             "architecture is built by the newest NVRTC not newer than it (default: "
                             "the oldest NVRTC of the newest CUDA major supporting the "
                             "architecture, so every driver of that major loads it)")
    assembly = parser.add_mutually_exclusive_group()
    assembly.add_argument("--ptxas", action="store_true",
                          help="fail when no ptxas matching an architecture's NVRTC is found (by "
                               "default each PTX is assembled, and one line per kernel variant "
                               "gives its registers, spills and stack, when such a ptxas is found, "
                               "and a note says so when none is)")
    assembly.add_argument("--no-ptxas", action="store_true",
                          help="do not assemble the PTX with ptxas (no register report)")


def _run_compile(args):
    from . import cache, ptx

    archs = args.arch or list(ptx.DEFAULT_ARCHS)
    # The default is the private cache's ptx folder, made (mode 0700) and checked as the cache is.
    out = args.out or cache.cache_dir("ptx")
    manifest = ptx.build(out, archs, libraries=args.nvrtc, cuda=args.cuda, private=not args.out)
    tools = None if args.no_ptxas else ptx.find_ptxas()
    failed = False
    for arch in sorted(set(archs)):
        entry = manifest["archs"][ptx.arch_key(arch)]
        path = os.path.join(out, entry["file"])
        print(f"sm_{arch}: NVRTC {entry['nvrtc_version']} ({entry['nvrtc_library']}), "
              f"PTX ISA {entry['ptx_isa']} (drivers for CUDA {entry['min_driver']} and newer), "
              f"{entry['size']} bytes, "
              f"{len(entry['lowered_names'])} kernels -> {path}")
        for line in entry["log"].splitlines():
            print(f"  {line}")
        if tools is not None:
            failed |= not _report_ptxas(ptx, path, arch, entry, tools, args.ptxas)
    print(f"manifest: {os.path.join(out, ptx.MANIFEST_FILE)} (source hash {manifest['source_hash'][:16]}...)")
    if failed:
        raise CommandError("ptxas did not assemble every architecture's PTX (output above)")
    return 0


def _report_ptxas(ptx, path, arch, entry, tools, required):
    """Assembles one architecture's PTX with ptxas -v and prints, per kernel variant, its
    registers, spill bytes and stack frame. False when ptxas failed or said nothing of a kernel,
    or (``required``) when no ptxas matches the PTX's NVRTC."""
    tool = ptx.ptxas_for(entry["nvrtc_version"], tools)
    if tool is None:
        found = ", ".join(f"{t.version_string} ({t.path})" for t in tools) or "none"
        print(f"  ptxas: none matching NVRTC {entry['nvrtc_version']} found (found: {found}); "
              "not assembled, no register report (pip install nvidia-cuda-nvcc of that release)")
        return not required
    result = ptx.assemble(path, arch, tool)
    if result.returncode != 0:
        print(f"  ptxas {tool.version_string} ({tool.path}) failed, exit code {result.returncode}:")
        for line in result.output.splitlines():
            print(f"    {line}")
        return False
    print(f"  ptxas {tool.version_string} ({tool.path}), per kernel variant:")
    width = max(len(name) for name in entry["lowered_names"])
    complete = True
    for name, lowered in entry["lowered_names"].items():
        info = result.functions.get(lowered, {})
        if "registers" not in info:
            print(f"    {name:<{width}}  not in ptxas's report ({lowered})")
            complete = False
            continue
        print(f"    {name:<{width}}  {info['registers']:3d} registers, spills "
              f"{info.get('spill_stores', 0)} bytes stored {info.get('spill_loads', 0)} loaded, "
              f"stack {info.get('stack', 0)} bytes")
    return complete


# ---------------------------------------------------------------------------------------------
# info, bench, cache, clear-cache

def _add_info_arguments(parser):
    pass


def _run_info(args):
    from . import info
    print("\n".join(info.report()))
    return 0


def _add_bench_arguments(parser):
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--out", default=os.path.join("benchmarks", "out"),
                        help="folder for bench.json, bench.md and bench.png (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (every model once per round)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds before timing")
    from . import bench
    parser.add_argument("--dtype", action="append", dest="dtypes",
                        help=f"one of {', '.join(bench.DTYPES)} (repeatable; default float32, and "
                             "bfloat16 on GPU)")
    parser.add_argument("--config", action="append", dest="configs",
                        help=f"one of {', '.join(c['name'] for c in bench.CONFIGS)} (repeatable; "
                             "default all for the device)")
    parser.add_argument("--all", action="store_true",
                        help="also the large configurations that are skipped on the CPU")


def _run_bench(args):
    if args.repeats < 1 or args.warmup < 0:
        raise CommandError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, "
                           f"{args.warmup}")
    from . import bench
    try:
        bench.run(args.device, out_dir=args.out, repeats=args.repeats, warmup=args.warmup,
                  dtypes=args.dtypes, configs=args.configs, include_all=args.all)
    except ValueError as exc:  # a bad --device, --config or --dtype, found before any timing
        raise CommandError(str(exc)) from None
    return 0


def _size(size):
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _age(seconds):
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


_STATES = {True: "current kernels", False: "other kernel sources", None: ""}


def _add_cache_arguments(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--clear", action="store_true", help="remove every entry")
    group.add_argument("--prune", action="store_true",
                       help="remove the entries of other kernel source versions, stale temporary "
                            "files and lock files nobody holds")


def _run_cache(args):
    from . import cache
    root = cache.cache_root()
    if args.clear:
        return _run_clear_cache(args)
    if args.prune:
        removed = cache.prune()
        for entry in removed:
            print(f"removed {entry['name']} ({entry['kind']}, {_size(entry['size'])})")
        print(f"removed {len(removed)} entries from {root}")
        return 0
    entries = cache.entries()
    total = sum(entry["size"] for entry in entries)
    print(f"{root}: {len(entries)} entries, {_size(total)}")
    for entry in entries:
        state = _STATES[entry["current"]]
        print(f"  {entry['name']}  {entry['kind']}, {_size(entry['size'])}, {_age(entry['age'])} old"
              + (f", {state}" if state else ""))
    return 0


def _add_clear_cache_arguments(parser):
    pass


def _run_clear_cache(args):
    from . import cache
    removed = cache.clear()
    print(f"removed {removed} files from {cache.cache_root()}")
    return 0


# ---------------------------------------------------------------------------------------------
# The command table and entry point

COMMANDS = {
    "compile": Command("compile the kernels to PTX with NVRTC (no GPU needed)",
                       _add_compile_arguments, _run_compile),
    "info": Command("environment report: versions, GPUs, backends, kernel caches",
                    _add_info_arguments, _run_info),
    "bench": Command("benchmark the SRU layer and its kernels", _add_bench_arguments, _run_bench),
    "cache": Command("list the kernel cache (sizes, ages); --clear, --prune",
                     _add_cache_arguments, _run_cache),
    "clear-cache": Command("empty the kernel cache folder", _add_clear_cache_arguments,
                           _run_clear_cache),
}


def _user_errors():
    """Errors a command raises for the user to act on (imported lazily: they live in modules that
    ``--help`` need not load)."""
    from .errors import KernelCompileError
    from .ptx import PTXError

    return (CommandError, PTXError, KernelCompileError, OSError)


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description="sru_cupy command line tools")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv=None):
    """Console entry point: runs one command and returns its exit code (argparse exits with 2 on
    bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args._run(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
