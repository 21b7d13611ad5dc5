"""Host backend: the CUDA sources compiled by a C++ compiler and run on NumPy arrays.

The compiler is ``$CXX`` (split as a command line, never run through a shell: ``CXX="ccache g++"``
runs g++ through ccache), else ``c++``, ``g++`` or ``clang++`` on PATH, else the clang that the
``ziglang`` wheel ships (``pip install sru_cupy[cpu]``: a compiler from pip, for machines without a
C++ toolchain), run as the wheel's ``zig`` executable by its absolute path, located without looking
in the current working folder (a ``ziglang/`` folder there is never run). Where there is none, the
launch layer runs NumPy arrays through ``sru_cupy.numpy_fallback`` instead.

The kernels are compiled together with ``cuda/sru_host_emulation.h``, which supplies threadIdx,
blockIdx and a launcher that walks the grid (blocks in parallel, with OpenMP when the compiler has
it, else on std::thread workers). The shared library is built at first use into the cache folder
(see ``sru_cupy.cache`` for its trust rules), named by a hash of the assembled source, the compiler,
its version and the flags, written atomically beside a record of that hash and of the library's
SHA-256. Loading opens the library once, checks the descriptor (owner, mode, a regular file),
hashes it against the record and loads that descriptor (``/proc/self/fd/N``); a mismatching,
unreadable or unloadable entry is rebuilt once (with a warning), then an error says why. A build
prints one line to stderr while it runs.

Limits and faults: every compiler run (probes and the build) is stopped after
``$SRU_CUPY_COMPILE_TIMEOUT`` seconds (default :data:`DEFAULT_COMPILE_TIMEOUT`) with a
KernelCompileError naming the command, and a build waits for another one's lock at most
``$SRU_CUPY_LOCK_TIMEOUT`` seconds. A read-only cache is read (no compile, no write, when it holds
the entry), and a missing entry is built into a private temporary folder; a build that cannot be
written (a full disk) is kept for the process, with a warning. A process forked after a parallel
launch (a DataLoader worker) runs its launches on one thread: GNU OpenMP's thread pool does not
survive a fork.

The build targets this CPU's instruction set (``cpu_isa``: AVX-512, AVX2 or the baseline of the
architecture), named in the flags and so in the cache key: a cache folder shared between different
CPUs never loads a library built for another. A thread's columns are the lanes of SIMD vectors, 16
with AVX-512, else 8 (``COLUMNS_PER_THREAD``). What a build needs to know about the compiler (its
version, whether it has OpenMP, which instruction-set flags it takes) is probed once and kept in the
cache, keyed by the compiler's path, size and modification time, so that a process whose cache is
warm starts no compiler. Launches pass parameters the way cuLaunchKernel does: an array of
pointers to the values, so the launch layer is the same as for the GPU.
"""

import contextlib
import ctypes
import hashlib
import importlib.machinery
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading

import numpy as np

from .. import cpu, kernels
from .. import cache
from ..cache import build_lock, cache_dir, write_atomic
from ..errors import KernelCompileError, warn_once

name = "host"

#: Largest block the launch layer uses for this backend. Emulated blocks are what the workers spread
#: over cores (the threads of one block run one after another), so smaller blocks are chosen when
#: needed to give every core several (see block_size).
BLOCK_SIZE = 64
BLOCKS_PER_CORE = 4

#: The environment variable and instruction sets of ``sru_cupy.cpu`` (where the CPU is read).
ISA_ENV_VAR = cpu.ISA_ENV_VAR
ISAS = cpu.ISAS
#: Each instruction set's flags of g++/clang++, and those of the ziglang wheel's clang (zig targets
#: the build machine's CPU by default, so it is always told which). 512-bit vectors are asked for
#: explicitly: compilers otherwise prefer 256 bits on AVX-512 CPUs.
_ISA_FLAGS = {
    "avx512": ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "baseline": (),
}
_ISA_ZIGLANG_FLAGS = {
    "avx512": ("-mcpu=baseline+avx512f+avx512dq+avx512vl+avx512bw+avx2+fma+f16c",
               "-mprefer-vector-width=512"),
    "avx2": ("-mcpu=baseline+avx2+fma+f16c",),
    "baseline": ("-mcpu=baseline",),
}
#: Columns per emulated thread for each instruction set: one 512-bit vector of float32 (two of
#: float64) with AVX-512, else 8 (one 256-bit vector of float32).
_ISA_COLUMNS = {"avx512": 16, "avx2": 8, "baseline": 8}


def _default_columns():
    try:
        return _ISA_COLUMNS[cpu.isa()]
    except ValueError:  # a wrong $SRU_CUPY_HOST_ISA: the build says so
        return _ISA_COLUMNS["baseline"]


#: Columns each emulated thread runs (the kernels' template parameter N), chosen by the CPU's
#: instruction set: where a thread's columns lie in one direction of one batch element they are the
#: lanes of SIMD vectors, else they run as scalar columns interleaved step by step. Each value has a
#: library of its own, built at its first use: set 1 to run the GPU's instantiations here (the
#: tests do).
COLUMNS_PER_THREAD = _default_columns()

#: exp and tanh of the lanes through the C library's vector variants where the compiler reaches
#: them (glibc's libmvec with g++: within 4 ulp, IEEE special values). False builds a library
#: whose lanes call the scalar functions, bit for bit what one column per thread gives (tests).
VECTOR_MATH = True

#: -fopenmp-simd: the lane loops of the kernels (exp, tanh) are `omp simd` loops; it enables no
#: threads and no OpenMP runtime. -ffp-contract=off: no fused multiply-adds the source does not
#: write, so a lane computes bit for bit what a scalar column does. -Wno-psabi: lane values are
#: passed between inlined functions only (GCC notes the ABI of vector arguments).
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-Wno-psabi",
               "-fopenmp-simd", "-ffp-contract=off")
#: The compiler identity of the ziglang wheel in the cache key (not the interpreter's path, so every
#: virtual environment with the same ziglang version shares one library).
ZIGLANG = "ziglang c++"
_lock = threading.Lock()
_libraries = {}  # (columns per thread, VECTOR_MATH, $SRU_CUPY_HOST_ISA) -> loaded library
_compiler_info = {}


_found_compilers = {}  # ($CXX, $PATH) -> the compiler found with them

#: Environment variable: seconds any one compiler run (a probe or the build) may take.
COMPILE_TIMEOUT_ENV_VAR = "SRU_CUPY_COMPILE_TIMEOUT"
#: Default of $SRU_CUPY_COMPILE_TIMEOUT: g++ builds the kernels in seconds, the ziglang wheel's
#: first build on a machine takes about a minute and a half on 2 cores.
DEFAULT_COMPILE_TIMEOUT = 600.0


def compile_timeout():
    """Seconds one compiler run may take: $SRU_CUPY_COMPILE_TIMEOUT, else DEFAULT_COMPILE_TIMEOUT."""
    return cache.seconds_from_env(COMPILE_TIMEOUT_ENV_VAR, DEFAULT_COMPILE_TIMEOUT)


def _cxx_words():
    """$CXX as a command line (a list; [] when it cannot be split), or None when it is unset. A $CXX
    that names an existing file as a whole is that one word (a path with spaces)."""
    cxx = os.environ.get("CXX")
    if not cxx:
        return None
    if os.path.isfile(cxx):
        return [cxx]
    try:
        return shlex.split(cxx)
    except ValueError:  # unbalanced quotes: no compiler rather than a guess
        return []


def find_compiler():
    """Path of the program the system C++ compiler command starts: the first word of $CXX (the
    launcher for ``CXX="ccache g++"``), else c++, g++ or clang++ on PATH; None if there is none.

    Every CPU call asks (through available()), and a PATH search takes tens of microseconds: a
    compiler once found is kept for the same $CXX and $PATH while it is still there. Not finding
    one is not kept, so a compiler installed later is seen."""
    cxx = os.environ.get("CXX")
    key = (cxx, os.environ.get("PATH"))
    path = _found_compilers.get(key)
    if path is not None and os.access(path, os.X_OK):
        return path
    for candidate in (_cxx_words() or [])[:1] if cxx else ["c++", "g++", "clang++"]:
        path = shutil.which(candidate)
        if path:
            _found_compilers[key] = path
            return path
    return None


def _ziglang_command():
    """``[zig, "c++"]`` with the absolute path of the installed ziglang wheel's executable, or None
    without the wheel. Located with the import system's path finder over the absolute entries of
    sys.path other than the current working folder, so that a ``ziglang/`` folder there (a cloned
    repository, a download folder) is never taken for the wheel; no Python runs it."""
    if "ziglang" in sys.modules and sys.modules["ziglang"] is None:  # import blocked on purpose
        return None
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = None
    search = [p for p in sys.path
              if isinstance(p, str) and os.path.isabs(p) and os.path.realpath(p) != cwd]
    try:
        spec = importlib.machinery.PathFinder.find_spec("ziglang", search)
    except (ImportError, ValueError, OSError):
        return None
    if spec is None or not spec.origin or not spec.submodule_search_locations:
        return None
    zig = os.path.join(os.path.dirname(spec.origin), "zig.exe" if os.name == "nt" else "zig")
    return [zig, "c++"] if os.path.isfile(zig) and os.access(zig, os.X_OK) else None


def _ziglang_importable():
    return _ziglang_command() is not None


def compiler_command():
    """The command that compiles C++, as a list: $CXX split as a command line (its program found
    on PATH) or the system compiler (find_compiler), else the ziglang wheel's (``<wheel>/zig
    c++``); None when there is neither. A $CXX that does not exist is not silently replaced by
    ziglang."""
    system = find_compiler()
    if system is not None:
        words = _cxx_words()
        return [system, *words[1:]] if words else [system]
    if not os.environ.get("CXX"):
        return _ziglang_command()
    return None


def _is_ziglang(command):
    """True for the ziglang wheel's command: ``<...>/ziglang/zig c++``."""
    return (len(command) == 2 and command[1] == "c++"
            and os.path.basename(command[0]) in ("zig", "zig.exe")
            and os.path.basename(os.path.dirname(command[0])) == "ziglang")


def compiler_description(command=None):
    """A readable name of a compiler command (default: compiler_command()); None without one."""
    command = compiler_command() if command is None else command
    if command is None:
        return None
    if _is_ziglang(command):
        return f"the ziglang wheel's clang ({_compiler_version(command)})"
    return " ".join(shlex.quote(word) for word in command)


_available = {}  # ($CXX, $PATH) -> the program of the compiler command found with them


def available():
    """True when a C++ compiler is present (the library can be built). Asked on every CPU call:
    a compiler once found is kept for the same $CXX and $PATH while its program is still there."""
    key = (os.environ.get("CXX"), os.environ.get("PATH"))
    program = _available.get(key)
    if program is not None and os.access(program, os.X_OK):
        return True
    command = compiler_command()
    if command is None:
        return False
    _available[key] = command[0]
    return True


def _compiler_identity(command):
    """What names the compiler in the cache key: its command line, or ZIGLANG for the ziglang
    wheel."""
    return ZIGLANG if _is_ziglang(command) else " ".join(command)


def _file_stamp(program):
    """(real path, size, mtime in ns) of an executable (a path, or a name on PATH), or None."""
    try:
        path = os.path.realpath(shutil.which(program) or program)
        info = os.stat(path)
        return path, info.st_size, info.st_mtime_ns
    except (OSError, TypeError):
        return None


def _compiler_file(command):
    """(real path, size, mtime in ns) of the compiler's executable, or None where it cannot be read."""
    return _file_stamp(command[0])


#: Bump when what the facts record (or how it is probed) changes.
_FACTS_VERSION = 1


def _stop(process):
    """Kills a compiler and everything it started (its own session: g++'s cc1plus, ld)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except OSError:  # already gone
        pass
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a child that left the session holds the pipes: leave it
        pass


def _run_compiler(command, cwd, what):
    """Runs one compiler command in ``cwd`` (a private folder) within compile_timeout(); returns the
    CompletedProcess (text output). Past the limit the command and its children are killed and a
    KernelCompileError names the command and the limit."""
    limit = compile_timeout()
    try:
        process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=hasattr(os, "killpg"))
    except OSError as error:
        raise KernelCompileError(what, f"{type(error).__name__}: {error}", command) from None
    try:
        out, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _stop(process)
        raise KernelCompileError(f"{what} (stopped after {limit:g} s; ${COMPILE_TIMEOUT_ENV_VAR} "
                                 "sets the limit in seconds)", "", command) from None
    except BaseException:
        _stop(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode,
                                       out.decode(errors="replace"), err.decode(errors="replace"))


def _probe_compiler(command):
    """What a build needs to know about a system compiler: its version line, whether -fopenmp works,
    and which instruction sets' flags it accepts. Starts the compiler once per question."""
    what = f"probe of the C++ compiler {' '.join(command)}"
    with tempfile.TemporaryDirectory() as tmp:
        out = _run_compiler([*command, "--version"], tmp, what)
        text = (out.stdout or out.stderr).strip()
        facts = {"version": text.splitlines()[0] if out.returncode == 0 and text else "?"}
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nextern \"C\" int probe() { return omp_get_max_threads(); }\n")
        result = _run_compiler([*command, "-fopenmp", "-shared", "-fPIC", src, "-o",
                                os.path.join(tmp, "probe.so")], tmp, what)
        facts["openmp"] = result.returncode == 0
        plain = os.path.join(tmp, "isa.cpp")
        with open(plain, "w") as f:
            f.write("extern \"C\" float probe(float x) { return x * x; }\n")
        facts["isa"] = {}
        for isa in ISAS:
            result = _run_compiler([*command, *_ISA_FLAGS[isa], "-c", plain, "-o",
                                    os.path.join(tmp, "isa.o")], tmp, what)
            facts["isa"][isa] = result.returncode == 0
    return facts


def _valid_facts(facts):
    """True when a record's facts have every field _probe_compiler writes, of the right type."""
    return (isinstance(facts, dict) and isinstance(facts.get("version"), str)
            and isinstance(facts.get("openmp"), bool) and isinstance(facts.get("isa"), dict)
            and all(isinstance(facts["isa"].get(isa), bool) for isa in ISAS))


def _ziglang_version(command):
    """The version of the wheel that holds ``command``'s zig (read from that folder's metadata,
    not from wherever sys.path would find one first)."""
    import importlib.metadata  # here: importing it costs about 20 ms
    site = os.path.dirname(os.path.dirname(command[0]))
    for dist in importlib.metadata.distributions(name="ziglang", path=[site]):
        return "zig " + dist.version
    return "?"


def _compiler_facts(command):
    """The facts of _probe_compiler for a compiler command, from memory, else from the cache file
    of that compiler (valid while its path, size and modification time are the same, and whole),
    else probed and written there. The ziglang wheel's are known without a probe: its version from
    the wheel's metadata, no OpenMP, and every instruction set."""
    command = [command] if isinstance(command, str) else list(command)
    key = tuple(command)
    facts = _compiler_info.get(key)
    if facts is not None:
        return facts
    if _is_ziglang(command):
        facts = {"version": _ziglang_version(command), "openmp": False,
                 "isa": {isa: True for isa in ISAS}}
    else:
        stamp = _compiler_file(command)
        identity = {"facts": _FACTS_VERSION, "command": command,
                    "file": list(stamp) if stamp else None}
        launched = [list(s) for s in map(_file_stamp, command[1:2]) if s]
        if launched:  # "ccache g++": a changed g++ changes the facts too
            identity["launched"] = launched
        name = hashlib.sha256(json.dumps(command).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir("host"), f"compiler_{name}.json")
        try:
            record = json.loads(cache.read_trusted(path))
            if stamp is not None and record.get("identity") == identity \
                    and _valid_facts(record.get("facts")):
                facts = record["facts"]
        except (OSError, ValueError, AttributeError):  # absent, unreadable, untrusted, not JSON
            pass
        if facts is None:
            facts = _probe_compiler(command)
            if stamp is not None:
                try:
                    write_atomic(path, json.dumps({"identity": identity, "facts": facts},
                                                  indent=1).encode())
                except OSError:  # a full or read-only cache: the next process probes again
                    pass
    _compiler_info[key] = facts
    return facts


def _compiler_version(command):
    """The first line of ``--version``; for ziglang the wheel's version (which fixes its clang)."""
    return _compiler_facts(command)["version"]


def _openmp_flags(compiler):
    """["-fopenmp"] when the compiler accepts it, else [] (then the blocks run on std::thread
    workers). The ziglang wheel has no OpenMP."""
    return ["-fopenmp"] if _compiler_facts(compiler)["openmp"] else []


def build_isa(command):
    """The instruction set a build with ``command`` targets: cpu.isa(), or the best one below it
    whose flags the compiler takes."""
    accepted = _compiler_facts(command)["isa"]
    best = cpu.isa()
    return next(isa for isa in ISAS[ISAS.index(best):] if accepted.get(isa) or isa == "baseline")


def compiler_flags(command):
    """The flags a build of the kernels passes to ``command`` (before the source and output)."""
    command = [command] if isinstance(command, str) else list(command)
    threads = _openmp_flags(command) or ["-pthread"]  # std::thread workers without OpenMP
    isa = build_isa(command)
    isa_flags = _ISA_ZIGLANG_FLAGS[isa] if _is_ziglang(command) else _ISA_FLAGS[isa]
    math = [] if VECTOR_MATH else ["-DSRU_HOST_SCALAR_MATH"]
    return list(_BASE_FLAGS) + threads + list(isa_flags) + math


def translation_unit(columns):
    """The C++ text that is compiled: emulation header, kernels, and a table of the instantiations
    with ``columns`` columns per thread."""
    entries = ",\n".join(
        f'    {{"{n}", [](dim3 g, dim3 b, void** a, int t) {{ sru_host_run_grid(&{n}, g, b, a, t); }}}}'
        for n in kernels.all_kernel_names((columns,)))
    return (kernels.assembled_source(with_host_emulation=True)
            + "\n\nstatic const sru_host_kernel sru_host_kernels[] = {\n" + entries + "\n};\n"
            + "SRU_HOST_DEFINE_LAUNCH(sru_host_kernels)\n")


def _open_verified(library_path, record_path, key):
    """``(descriptor, None)`` of the cached library when it and its record are whole and the
    record's key and SHA-256 match, both read from descriptors that cache.open_trusted checked
    (owner, mode, a regular file, no link); else ``(None, why not)``, why not being None when
    neither file exists."""
    try:
        record = json.loads(cache.read_trusted(record_path))
        if not isinstance(record, dict) or record.get("key") != key:
            return None, "its record is not a record of these kernels"
        fd = cache.open_trusted(library_path)
    except FileNotFoundError:
        if os.path.lexists(library_path) or os.path.lexists(record_path):
            return None, "the library or its record is missing"
        return None, None
    except (OSError, ValueError) as error:  # untrusted, unreadable, not JSON
        return None, str(error)
    if cache.descriptor_digest(fd) != record.get("sha256"):
        os.close(fd)
        return None, "the library does not match its record's SHA-256"
    return fd, None


def _record_matches(library_path, record_path, key):
    """True when the library and its record are whole and the record's key and digest match."""
    fd, _ = _open_verified(library_path, record_path, key)
    if fd is None:
        return False
    os.close(fd)
    return True


def library_key(command, columns=None):
    """(key, source, flags) of the library for a compiler command and columns per thread (default
    COLUMNS_PER_THREAD): the key hashes the source, the compiler, its version and the flags (which
    name the instruction set), the platform and the machine."""
    command = [command] if isinstance(command, str) else list(command)
    flags = compiler_flags(command)
    source = translation_unit(COLUMNS_PER_THREAD if columns is None else columns)
    key = kernels.source_hash(source, _compiler_identity(command), _compiler_version(command),
                              " ".join(flags), sys.platform,
                              os.uname().machine if hasattr(os, "uname") else "")
    return key, source, flags


def _compile(command, flags, source):
    """The bytes of the library compiled from ``source``."""
    # A build takes seconds (g++) to a minute (ziglang's first use on a machine): say so.
    print(f"sru_cupy: compiling the CPU kernels (once per machine) with "
          f"{compiler_description(command)}...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="sru_cupy_build_") as tmp:
        src = os.path.join(tmp, "sru_host.cpp")
        out = os.path.join(tmp, "sru_host.so")
        with open(src, "w") as f:
            f.write(source)
        command_line = [*command, *flags, src, "-o", out]
        what = "host compilation of the SRU kernels"
        result = _run_compiler(command_line, tmp, what)
        if result.returncode != 0:
            raise KernelCompileError(what, result.stdout + result.stderr, command_line)
        with open(out, "rb") as f:
            return f.read()


def _build_in(folder, command, key, source, flags, force):
    """(descriptor, path) of the verified library in ``folder``, built there under the build lock
    if it is absent, does not match (or ``force``: it would not load)."""
    library_path = os.path.join(folder, f"sru_host_{key[:24]}.so")
    record_path = os.path.join(folder, f"sru_host_{key[:24]}.json")
    with build_lock(library_path):
        cache.clean_stale(folder)
        fd, why = _open_verified(library_path, record_path, key)
        if fd is not None and not force:  # another thread or process built it
            return fd, library_path
        if fd is not None:
            os.close(fd)
        if why:
            warn_once(("corrupt", library_path),
                      f"sru_cupy: cached host library {library_path} is incomplete or does not "
                      f"match its record ({why}); rebuilding it")
        data = _compile(command, flags, source)
        record = {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "compiler": command,
                  "compiler_version": _compiler_version(command), "flags": flags,
                  "isa": build_isa(command), "source_hash": kernels.source_hash()}
        try:
            write_atomic(library_path, data)
            try:
                write_atomic(record_path, json.dumps(record, indent=1).encode())
            except BaseException:
                with contextlib.suppress(OSError):  # no library without its record
                    os.unlink(library_path)
                raise
        except OSError as error:  # a full disk, a quota: this process still gets its kernels
            warn_once(("unwritten", folder),
                      f"sru_cupy: could not write the CPU kernels to {folder} ({error}); they are "
                      "kept for this process only, and the next process compiles them again")
            return cache.keep_in_memory(data, os.path.basename(library_path))
        fd, why = _open_verified(library_path, record_path, key)
        if fd is None:
            raise RuntimeError(f"sru_cupy host backend: the library just written to "
                               f"{library_path} does not check out ({why})")
        return fd, library_path


def _open_library(command, columns=None, force=False):
    """(descriptor, path) of the verified cached library for this source, columns per thread
    (default COLUMNS_PER_THREAD), compiler command and flags, built if needed (``force``: built
    again, the cached one would not load). A read-only cache folder is read; what it lacks is
    built into the private temporary folder."""
    command = [command] if isinstance(command, str) else list(command)
    key, source, flags = library_key(command, columns)
    folder = cache_dir("host")
    if not force:
        fd, _ = _open_verified(os.path.join(folder, f"sru_host_{key[:24]}.so"),
                               os.path.join(folder, f"sru_host_{key[:24]}.json"), key)
        if fd is not None:
            return fd, os.path.join(folder, f"sru_host_{key[:24]}.so")
    if cache.writable(folder):
        try:
            return _build_in(folder, command, key, source, flags, force)
        except cache.LockTimeoutError:
            raise
        except OSError as error:
            if cache.writable(folder):  # not a read-only folder: the error is the answer
                raise
            reason = f"the kernel cache {folder} cannot be written ({error})"
    else:
        reason = f"the kernel cache {folder} is read-only and lacks these CPU kernels"
    return _build_in(cache.private_dir("host", reason=reason), command, key, source, flags, force)


#: Per ELF class (1: 32-bit, 2: 64-bit): the word format, and the offsets of e_phoff (e_shoff
#: follows), of e_phentsize (e_phnum, e_shentsize, e_shnum follow), of p_offset and of p_filesz.
_ELF_LAYOUT = {1: ("I", 28, 42, 4, 16), 2: ("Q", 32, 54, 8, 32)}


def _truncation(fd):
    """Why an ELF file cannot be whole (a segment or a header table past its end), or None. The
    loader maps segments without this check, and touching a page past the end of the file kills
    the process (SIGBUS) instead of failing the load."""
    if not hasattr(os, "pread"):  # not a system of ELF files
        return None
    header = os.pread(fd, 64, 0)
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] not in _ELF_LAYOUT:
        return None  # not ELF (another system's format, or garbage): the loader says why
    word, tables_at, counts_at, offset_at, filesz_at = _ELF_LAYOUT[header[4]]
    order = "<" if header[5] == 1 else ">"
    size = os.fstat(fd).st_size
    phoff, shoff = struct.unpack_from(order + 2 * word, header, tables_at)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", header, counts_at)
    if phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
        return f"its header tables reach past its end ({size} bytes): it is truncated"
    table = os.pread(fd, phentsize * phnum, phoff)
    for entry in range(0, phentsize * phnum, phentsize):
        offset, = struct.unpack_from(order + word, table, entry + offset_at)
        filesz, = struct.unpack_from(order + word, table, entry + filesz_at)
        if offset + filesz > size:
            return f"a segment reaches past its end ({size} bytes): it is truncated"
    return None


def _build(command, columns=None):
    """Path of the verified cached library for this source, columns per thread (default
    COLUMNS_PER_THREAD), compiler command and flags, built if needed."""
    fd, path = _open_library(command, columns)
    os.close(fd)
    return path


_loaded_names = set()  # the /proc/self/fd/N names this process has loaded libraries by


def _unique_descriptor(fd):
    """A descriptor of the same file whose /proc/self/fd name no library of ours was loaded by
    (the loader takes a name it has loaded before for that library, without opening anything), or
    None when ``fd`` itself is one; the caller closes it."""
    if f"/proc/self/fd/{fd}" not in _loaded_names:
        return None
    import fcntl
    lowest = 1 + max(int(name.rsplit("/", 1)[1]) for name in _loaded_names)
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)


def _load(fd, path):
    """The library of a verified descriptor (closed here), loaded from that descriptor where the
    system names it (Linux: /proc/self/fd/N), else from its checked path."""
    duplicate = None
    try:
        truncated = _truncation(fd)
        if truncated:
            raise OSError(f"{path}: {truncated}")
        target = cache.loadable_path(fd, path)
        if target.startswith("/proc/self/fd/"):
            duplicate = _unique_descriptor(fd)
            if duplicate is not None:
                target = f"/proc/self/fd/{duplicate}"
            _loaded_names.add(target)
        lib = ctypes.CDLL(target)  # mapped: the descriptors are not needed any more
    finally:
        os.close(fd)
        if duplicate is not None:
            os.close(duplicate)
    lib.sru_host_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
        ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    lib.sru_host_launch.restype = ctypes.c_int
    lib.sru_host_kernel_count.restype = ctypes.c_int
    lib.sru_host_kernel_name.argtypes = [ctypes.c_int]
    lib.sru_host_kernel_name.restype = ctypes.c_char_p
    lib.path = path
    return lib


def library(columns=None):
    """The loaded host library for ``columns`` columns per thread (default COLUMNS_PER_THREAD),
    built on first use. A cached library that does not load (truncated, another architecture) is
    rebuilt once, with a warning. Raises RuntimeError without a compiler or when the rebuilt
    library does not load either."""
    columns = COLUMNS_PER_THREAD if columns is None else columns
    key = (columns, VECTOR_MATH, os.environ.get(ISA_ENV_VAR))
    lib = _libraries.get(key)
    if lib is not None:
        return lib
    with _lock:
        lib = _libraries.get(key)
        if lib is None:
            command = compiler_command()
            if command is None:
                raise RuntimeError("sru_cupy host backend: no C++ compiler found (set $CXX, install "
                                   "g++ or clang++, or pip install sru_cupy[cpu])")
            fd, path = _open_library(command, columns)
            try:
                lib = _load(fd, path)
            except (OSError, AttributeError) as error:  # not loadable, or not our library
                warn_once(("unloadable", path),
                          f"sru_cupy: cached host library {path} cannot be loaded ({error}); "
                          "rebuilding it")
                fd, path = _open_library(command, columns, force=True)
                try:
                    lib = _load(fd, path)
                except (OSError, AttributeError) as again:
                    raise RuntimeError(
                        f"sru_cupy host backend: the library {path}, just built with "
                        f"{compiler_description(command)}, cannot be loaded ({again})") from None
            _libraries[key] = lib
    return lib


_SCALAR_CTYPES = {
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.int64): ctypes.c_int64,
}


_POINTER_ARRAYS = {}


def _as_ctype(value):
    if type(value) is np.ndarray:  # the common cases first: one type check each
        return ctypes.c_void_p(value.ctypes.data)
    if value is None:
        return ctypes.c_void_p(None)
    # an array's address as ctypes.c_void_p (a bare int is refused: it could be meant as a scalar)
    if isinstance(value, (ctypes.c_void_p, ctypes.c_float, ctypes.c_double, ctypes.c_int32,
                          ctypes.c_int64)):
        return value
    if isinstance(value, np.ndarray):
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, np.generic) and value.dtype in _SCALAR_CTYPES:
        return _SCALAR_CTYPES[value.dtype](value.item())
    raise TypeError(f"kernel argument: expected a numpy array, an address (ctypes.c_void_p), None, "
                    f"or a numpy or ctypes float32/float64/int32/int64 scalar, got "
                    f"{type(value).__name__}")


def as_ctypes_scalar(value):
    """A NumPy float32/float64/int32/int64 scalar as the ctypes value ``launch`` passes (to be
    made once and reused: launch takes ctypes scalars as they are)."""
    return _SCALAR_CTYPES[value.dtype](value.item())


#: Below this many column-steps (columns x time steps) a launch runs on one OS thread.
PARALLEL_WORK = 1 << 18

_parallel_launched = False  # a launch in this process ran on the worker threads
_serial = False  # launches run on the calling thread only: a fork followed a parallel launch


def _note_parallel_launch():
    global _parallel_launched
    _parallel_launched = True


def _after_fork_in_child():
    """A child forked after a parallel launch inherits GNU OpenMP's thread pool without its threads,
    and its first parallel region would wait for them forever: the child launches on one thread
    (so does a child of that child). Locks another thread held at the fork are made anew."""
    global _serial, _lock
    _lock = threading.Lock()
    if _parallel_launched:
        _serial = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_COLUMNS_IN_NAME = re.compile(r",\s*(\d+)\s*>$")
_parsed_names = {}  # kernel name -> (columns per thread, the name as bytes)


def launch(kernel_name, grid, block, args, work=None):
    """Runs one kernel instantiation (the call returns when it has finished), from the library of
    the columns per thread its name gives (``...<float, 3, 8>``: 8). ``args``: NumPy arrays, or
    the addresses (``ctypes.c_void_p``) of host memory laid out as those arrays would be, None
    for a null pointer, and NumPy or ctypes scalars. ``work`` (column-steps) decides whether the blocks are
    spread over worker threads."""
    parsed = _parsed_names.get(kernel_name)
    if parsed is None:
        match = _COLUMNS_IN_NAME.search(kernel_name)
        columns = int(match.group(1)) if match else 0
        if not 1 <= columns <= 64:
            raise RuntimeError(f"sru_cupy host backend: kernel {kernel_name!r} is not a kernel "
                               "instantiation with 1 to 64 columns per thread")
        parsed = _parsed_names[kernel_name] = (columns, kernel_name.encode())
    columns, encoded_name = parsed
    lib = library(columns)
    if _serial or (work is not None and work < PARALLEL_WORK):
        threads = 1
    else:
        threads = 0
        _note_parallel_launch()
    values = [_as_ctype(a) for a in args]  # kept alive until the call returns
    # addressof, not cast(pointer(v)), and one array type per length: both avoid leaving
    # reference cycles behind on every call.
    array_type = _POINTER_ARRAYS.get(len(values))
    if array_type is None:
        array_type = _POINTER_ARRAYS[len(values)] = ctypes.c_void_p * len(values)
    pointers = array_type(*[ctypes.addressof(v) for v in values])
    status = lib.sru_host_launch(encoded_name, *grid, *block, pointers, threads)
    if status != 0:
        raise RuntimeError(f"sru_cupy host backend: kernel {kernel_name!r} is not in the library "
                           f"{lib.path}")


def empty(shape, dtype):
    return np.empty(shape, dtype=dtype)


def array_module(array=None):
    return np


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def block_size(threads):
    """BLOCK_SIZE, or smaller so that there are BLOCKS_PER_CORE blocks per core to share out."""
    return max(1, min(BLOCK_SIZE, -(-threads // (BLOCKS_PER_CORE * _cores()))))


def columns_per_thread():
    return COLUMNS_PER_THREAD


def check_same_device(array, reference, argname):
    """NumPy arrays all live in host memory."""


def device_guard(array):
    return contextlib.nullcontext()


def scalar_argument(value):
    """A scalar kernel argument (a NumPy float32/float64/int32/int64 scalar) as ``launch`` takes
    it: its ctypes value, made once per problem by the launch layer and reused."""
    return as_ctypes_scalar(value)
