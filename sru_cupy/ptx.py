"""Device-free PTX build of the SRU kernels with pynvrtc, and the loader for the PTX folder it writes.

Nothing here needs a GPU, a CUDA driver or CuPy: NVRTC (the runtime compilation library) turns the
kernel source into PTX text on any machine, here through pynvrtc's ``NVRTCInterface``.

Building
--------
``python -m sru_cupy compile --arch sm_80 --arch sm_90 --out DIR`` (or :func:`build`) compiles every
instantiation in :func:`sru_cupy.kernels.all_kernel_names` for each architecture and writes into DIR:

- ``sru_recurrence.sm_XX.ptx`` per architecture (``--gpu-architecture=compute_XX``), and
- ``manifest.json``: per architecture the PTX file name, its size and SHA-256, the NVRTC version and
  library used, the PTX ISA version (the PTX ``.version`` line), ``min_driver`` (the oldest CUDA
  driver release that loads it), the compile options and log, and the map name expression ->
  lowered (mangled) name; plus the source hash (:func:`sru_cupy.kernels.source_hash`) that the PTX
  was built from.

Every file is written atomically, with explicit modes whatever the umask (0755 folders and 0644 files
to share; 0700 and 0600 in the private kernel cache); the PTX files come first and the manifest last, so a reader sees
either the old manifest or a new one whose files are all in place (a PTX file replaced under an old
manifest is caught by the SHA-256 check). Rebuilding some architectures into a folder whose manifest
has the same source hash keeps that manifest's other architectures.

Which NVRTC: every libnvrtc found is a candidate (``$SRU_CUPY_NVRTC`` if set, an ``os.pathsep``
separated list of library paths, replaces the search): the one ``cuda.pathfinder`` loads, the
``nvidia/*/lib/libnvrtc.so.*`` of the NVIDIA wheels in every ``sys.path`` folder
(``nvidia-cuda-nvrtc`` 13.x installs ``nvidia/cu13/lib``, ``nvidia-cuda-nvrtc-cu12`` installs
``nvidia/cuda_nvrtc/lib``; the two do not clash), and ``$CUDA_PATH``, ``$CUDA_HOME`` and
``/usr/local/cuda``. Each one's supported architectures come from ``nvrtcGetSupportedArchs``.

The driver JIT-compiles PTX and accepts only PTX ISA versions it knows: PTX from NVRTC X.Y needs a
driver for CUDA X.Y or newer (NVRTC 13.5 writes ``.version 9.5``, which a CUDA 13.0 driver rejects
with CUDA_ERROR_UNSUPPORTED_PTX_VERSION; newer drivers JIT older PTX forward). So by default each
architecture is built by the *oldest* NVRTC of the newest CUDA major that supports it, which the
``ptx`` and ``test`` extras pin: NVRTC 13.0 for sm_75 and newer (loads on every CUDA 13 driver),
NVRTC 12.0 for sm_70 (CUDA 13 dropped Volta; loads on every CUDA 12 driver). ``cuda="12.4"``
(``--cuda 12.4``) instead builds for a driver of that release: the newest NVRTC not newer than it.
The manifest records each architecture's ``min_driver``, and the CuPy backend checks the driver
against it before loading (on a mismatch it compiles with CuPy's NVRTC instead, with a warning).

Loading (the CuPy backend, when ``$SRU_CUPY_PTX_DIR`` is set)
-------------------------------------------------------------
::

    from sru_cupy import kernels, ptx

    folder = ptx.ptx_dir_from_env()                  # $SRU_CUPY_PTX_DIR, or None
    if folder is not None:
        device_arch = int(device.compute_capability)  # "86" -> 86
        arch, path, data, lowered = ptx.read_ptx_for_device(folder, device_arch)
        if driver_release >= ptx.required_driver(folder, arch):  # e.g. (13, 0) >= (13, 0)
            module = cupy.cuda.function.Module()
            module.load(data)  # the checked bytes: the file may change after the check
            function = module.get_function(
                lowered[kernels.kernel_name("sru_recurrence_forward", "float32", 3)])

:func:`read_ptx` ``(folder, arch)`` returns ``(path, PTX bytes, {name expression: lowered
name})`` for exactly that architecture (:func:`load_ptx` the same without the bytes), read from
checked descriptors (owner, mode, no link) and hashed as read; :func:`read_ptx_for_device` (and
:func:`load_ptx_for_device`) picks the newest built architecture not above the device's (PTX for
compute_80 runs on sm_86 and sm_89 through the driver's JIT). They raise :class:`PTXManifestError`
with what to do when the folder has no manifest, was built from other sources (source hash mismatch), lacks the architecture or a
kernel, or a PTX file does not match its recorded SHA-256. :func:`required_driver` gives the
oldest driver release that loads an architecture's PTX.

ptxas (optional check)
----------------------
:func:`find_ptxas`, :func:`ptxas_for` and :func:`assemble` run a ptxas whose release matches the
NVRTC that wrote the PTX (``nvidia-cuda-nvcc`` for NVRTC 13, ``nvidia-cuda-nvcc-cu12`` for NVRTC 12)
and report per kernel the registers, stack frame and spill bytes (``ptxas -v``). ``python -m
sru_cupy compile`` prints them per kernel variant when it finds such a ptxas (``--ptxas``: fail
when it finds none; ``--no-ptxas``: do not assemble).
"""

import contextlib
import ctypes
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from . import kernels
from .errors import KernelCompileError
from . import cache
from .cache import write_atomic

#: Environment variable naming a folder written by :func:`build`, for the CuPy backend to load.
PTX_DIR_ENV_VAR = "SRU_CUPY_PTX_DIR"
#: Environment variable listing libnvrtc paths (``os.pathsep`` separated) to use instead of a search.
NVRTC_ENV_VAR = "SRU_CUPY_NVRTC"

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
#: Architectures built when none are given.
DEFAULT_ARCHS = (70, 80, 90)
#: NVRTC options besides the architecture, shared by this build and the CuPy backend's. No fast-math
#: flags, and float32 subnormals are kept (``-ftz=false``, NVRTC's default, said explicitly): the
#: same IEEE division, square root and subnormals as the host build. ``cupy.RawModule`` would append
#: ``-ftz=true`` after these (NVRTC takes the last one), which is why the CuPy backend compiles
#: through ``cupy.cuda.compiler.compile_using_nvrtc`` with exactly these options instead.
#: ``--fmad=true`` (also the default, chosen on purpose): a * b + c contracts into one fused
#: multiply-add, faster and rounded once. The host build does not contract (``-ffp-contract=off``),
#: so GPU and host results differ by a few ulps per step; compare them with a tolerance.
BASE_OPTIONS = ("-std=c++17", "-ftz=false", "--fmad=true")

_PROGRAM_NAME = kernels.SOURCE_FILE
_ARCH_PATTERN = re.compile(r"^(?:sm_?|compute_?)?(\d{2,3})$", re.IGNORECASE)
_PTX_VERSION = re.compile(r"^\s*\.version\s+(\d+\.\d+)\s*$", re.MULTILINE)
if sys.platform == "win32":
    _NVRTC_NAME = re.compile(r"^nvrtc64_\d+(_\d+)?\.dll$", re.IGNORECASE)
    _WHEEL_NVRTC_GLOBS = (os.path.join("nvidia", "*", "bin", "nvrtc64_*.dll"),
                          os.path.join("nvidia", "*", "bin", "*", "nvrtc64_*.dll"))
    _TOOLKIT_NVRTC_GLOBS = (os.path.join("bin", "nvrtc64_*.dll"), os.path.join("bin", "x64", "nvrtc64_*.dll"))
    _PTXAS = "ptxas.exe"
else:
    _NVRTC_NAME = re.compile(r"^libnvrtc\.so(\.\d+)*$")  # not libnvrtc.alt.so.* nor the builtins
    _WHEEL_NVRTC_GLOBS = (os.path.join("nvidia", "*", "lib", "libnvrtc.so*"),)
    _TOOLKIT_NVRTC_GLOBS = (os.path.join("lib64", "libnvrtc.so*"), os.path.join("lib", "libnvrtc.so*"))
    _PTXAS = "ptxas"


class PTXError(RuntimeError):
    """The PTX build or load cannot go on (no NVRTC, an unsupported architecture, a bad folder)."""


class NVRTCNotFoundError(PTXError):
    """No usable libnvrtc (or pynvrtc) is installed."""


class UnsupportedArchError(PTXError):
    """No NVRTC found supports the requested architecture."""


class PTXManifestError(PTXError):
    """A PTX folder cannot be used: no manifest, other sources, a missing architecture or file."""


# ---------------------------------------------------------------------------------------------
# Architectures


def parse_arch(value):
    """An architecture as an int: accepts ``90``, ``"90"``, ``"sm_90"``, ``"sm90"``, ``"compute_90"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = _ARCH_PATTERN.match(str(value).strip())
        if match is None:
            raise ValueError(f"architecture: expected e.g. 'sm_80', '80' or 'compute_80', got {value!r}")
        number = int(match.group(1))
    if number < 10:
        raise ValueError(f"architecture: expected a compute capability such as 80, got {value!r}")
    return number


def arch_key(arch):
    """The manifest key of an architecture: ``"sm_80"``."""
    return f"sm_{parse_arch(arch)}"


def ptx_file_name(arch):
    """The PTX file name of an architecture: ``sru_recurrence.sm_80.ptx``."""
    stem = os.path.splitext(kernels.SOURCE_FILE)[0]
    return f"{stem}.{arch_key(arch)}.ptx"


def compile_options(arch, extra_options=()):
    """The NVRTC options for one architecture."""
    return [f"--gpu-architecture=compute_{parse_arch(arch)}", *BASE_OPTIONS, *extra_options]


def parse_cuda_version(value):
    """A CUDA release as ``(major, minor)``: accepts ``"12.4"``, ``"13"``, ``(12, 4)`` or a driver
    version number such as ``12040`` (what ``cudaDriverGetVersion`` returns)."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1000:
        return value // 1000, (value % 1000) // 10
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?\s*$", str(value))
    if match is None or not 9 <= int(match.group(1)) <= 99:
        raise ValueError(f"cuda: expected a CUDA release such as '12.4' or '13.0', got {value!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def ptx_isa_version(ptx):
    """The PTX ISA version of a PTX text (its ``.version`` line), e.g. ``"9.5"``; None if absent."""
    match = _PTX_VERSION.search(ptx)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# Finding NVRTC


@dataclasses.dataclass(frozen=True)
class NVRTC:
    """One loadable libnvrtc: its path, version (major, minor) and supported architectures."""

    path: str
    version: tuple
    archs: tuple

    @property
    def version_string(self):
        return "%d.%d" % self.version

    def supports(self, arch):
        return parse_arch(arch) in self.archs

    def describe(self):
        archs = f"sm_{self.archs[0]}..sm_{self.archs[-1]}" if self.archs else "no architectures"
        return f"NVRTC {self.version_string} ({self.path}; {archs})"

    def interface(self):
        """pynvrtc's ``NVRTCInterface`` on this library (one per library and process)."""
        return _interface(self.path)


_interfaces = {}


def _interface(path):
    if path not in _interfaces:
        try:
            from pynvrtc.interface import NVRTCInterface
        except ImportError as exc:
            raise NVRTCNotFoundError(
                f"pynvrtc is not installed ({exc}); install the PTX build's extras: "
                "pip install 'sru_cupy[ptx]' (pynvrtc==9.2 is a yanked sdist and must be pinned)"
            ) from exc
        _interfaces[path] = NVRTCInterface(path)
    return _interfaces[path]


def _pathfinder_nvrtc():
    """The libnvrtc that cuda.pathfinder loads (the wheel's, or CUDA_PATH's), or None."""
    try:
        from cuda import pathfinder
    except ImportError:
        return None
    try:
        return pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # DynamicLibNotFoundError and friends: fall back to the search below
        return None


def _toolkit_roots():
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    if sys.platform != "win32":
        roots.append("/usr/local/cuda")
    return [root for root in roots if root]


def find_nvrtc_libraries():
    """Paths of every libnvrtc candidate, in search order, without duplicates (same real file)."""
    if os.environ.get(NVRTC_ENV_VAR):
        candidates = [p for p in os.environ[NVRTC_ENV_VAR].split(os.pathsep) if p]
    else:
        candidates = [_pathfinder_nvrtc()]
        for entry in sys.path:
            if entry and os.path.isdir(entry):
                for pattern in _WHEEL_NVRTC_GLOBS:
                    candidates.extend(sorted(glob.glob(os.path.join(entry, pattern))))
        for root in _toolkit_roots():
            for pattern in _TOOLKIT_NVRTC_GLOBS:
                candidates.extend(sorted(glob.glob(os.path.join(root, pattern))))
        candidates = [p for p in candidates if p and _NVRTC_NAME.match(os.path.basename(p))]
    paths, seen = [], set()
    for path in candidates:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            paths.append(os.path.abspath(path))
    return paths


_probed = {}


def _probe(path):
    """An :class:`NVRTC` for a library path, or the reason it cannot be used (a str)."""
    if path not in _probed:
        try:
            lib = ctypes.CDLL(path)
            major, minor = ctypes.c_int(), ctypes.c_int()
            if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
                raise OSError("nvrtcVersion failed")
            count = ctypes.c_int()
            # nvrtcGetNumSupportedArchs / nvrtcGetSupportedArchs exist from NVRTC 11.2 on.
            if lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)) != 0:
                raise OSError("nvrtcGetNumSupportedArchs failed")
            archs = (ctypes.c_int * count.value)()
            if count.value and lib.nvrtcGetSupportedArchs(archs) != 0:
                raise OSError("nvrtcGetSupportedArchs failed")
            _probed[path] = NVRTC(path, (major.value, minor.value), tuple(sorted(archs)))
        except (OSError, AttributeError) as exc:
            _probed[path] = f"{path}: unusable ({exc})"
    return _probed[path]


def survey_nvrtc(libraries=None):
    """``(usable, rejected)``: the :class:`NVRTC` s found (newest first) and why others were not.

    ``libraries`` (paths) replaces the search of :func:`find_nvrtc_libraries`.
    """
    paths = find_nvrtc_libraries() if libraries is None else [os.path.abspath(p) for p in libraries]
    usable, rejected = [], []
    for path in paths:
        result = _probe(path)
        (usable if isinstance(result, NVRTC) else rejected).append(result)
    usable.sort(key=lambda nvrtc: nvrtc.version, reverse=True)  # stable: search order among equals
    return usable, rejected


def available_nvrtcs(libraries=None):
    """The usable :class:`NVRTC` s, newest first."""
    return survey_nvrtc(libraries)[0]


def _not_found_message(rejected):
    lines = ["no usable NVRTC library (libnvrtc) found; install the PTX build's extras: "
             "pip install 'sru_cupy[ptx]' (nvidia-cuda-nvrtc, and nvidia-cuda-nvrtc-cu12 for sm_70), "
             f"or set CUDA_PATH or ${NVRTC_ENV_VAR}"]
    lines += [f"  {reason}" for reason in rejected]
    return "\n".join(lines)


def _nvrtc_wheel(version):
    """The pip requirement of the NVRTC wheel of a CUDA release, e.g. nvidia-cuda-nvrtc==13.0.*."""
    name = "nvidia-cuda-nvrtc" if version[0] >= 13 else f"nvidia-cuda-nvrtc-cu{version[0]}"
    return f"{name}=={version[0]}.{version[1]}.*"


def select_nvrtc(arch, nvrtcs=None, cuda=None):
    """The NVRTC in ``nvrtcs`` (default: all found) that builds ``arch``.

    With ``cuda`` (a release such as ``"12.4"``): the newest NVRTC that supports ``arch`` and is not
    newer than that release, so that its driver loads the PTX. Without: the oldest NVRTC of the
    newest CUDA major that supports ``arch``, so that every driver of that major loads it.
    """
    arch = parse_arch(arch)
    target = None if cuda is None else parse_cuda_version(cuda)
    rejected = []
    if nvrtcs is None:
        nvrtcs, rejected = survey_nvrtc()
    if not nvrtcs:
        raise NVRTCNotFoundError(_not_found_message(rejected))
    supporting = sorted((n for n in nvrtcs if n.supports(arch)), key=lambda n: n.version)
    found = "\n".join(f"  {nvrtc.describe()}" for nvrtc in nvrtcs)
    if not supporting:
        hint = ""
        if arch < 75:
            hint = ("\nCUDA 13 dropped architectures before sm_75: install an NVRTC 12 "
                    "(pip install 'nvidia-cuda-nvrtc-cu12==12.0.*')")
        raise UnsupportedArchError(f"no NVRTC found supports sm_{arch}; found:\n{found}{hint}")
    if target is not None:
        fitting = [n for n in supporting if n.version <= target]
        if not fitting:
            raise UnsupportedArchError(
                f"no NVRTC found supports sm_{arch} and is not newer than CUDA "
                f"{target[0]}.{target[1]} (a driver of that release rejects newer PTX); found:\n"
                f"{found}\ninstall one: pip install '{_nvrtc_wheel(target)}'")
        return fitting[-1]
    newest_major = supporting[-1].version[0]
    return next(n for n in supporting if n.version[0] == newest_major)


# ---------------------------------------------------------------------------------------------
# Compiling


@dataclasses.dataclass(frozen=True)
class CompiledPTX:
    """The result of one NVRTC compile."""

    arch: int
    ptx: str
    lowered_names: dict  # name expression -> lowered (mangled) name
    nvrtc: NVRTC
    options: list
    log: str  # NVRTC's log: warnings, empty when there are none

    @property
    def ptx_isa(self):
        return ptx_isa_version(self.ptx)


def compile_source(source, name_expressions, arch, nvrtc=None, extra_options=(), program_name=_PROGRAM_NAME):
    """Compiles ``source`` to PTX for ``arch``, lowering each name expression (a __global__ function
    or template instantiation). Raises :class:`KernelCompileError` with NVRTC's log and the options
    when NVRTC rejects the options or the source."""
    arch = parse_arch(arch)
    nvrtc = nvrtc if nvrtc is not None else select_nvrtc(arch)
    options = compile_options(arch, extra_options)
    iface = nvrtc.interface()
    from pynvrtc.interface import NVRTCException

    what = f"NVRTC {nvrtc.version_string} compile of {program_name} for sm_{arch}"
    with keeping_thread_locale():
        try:
            prog = iface.nvrtcCreateProgram(source, program_name, [], [])
        except NVRTCException as exc:
            raise KernelCompileError(f"{what} ({exc})", "", options) from None
        try:
            for name in name_expressions:
                iface.nvrtcAddNameExpression(prog, name)
            try:
                iface.nvrtcCompileProgram(prog, options)
            except NVRTCException as exc:
                raise KernelCompileError(f"{what} ({exc})", _program_log(iface, prog),
                                         options) from None
            log = _program_log(iface, prog)
            ptx = iface.nvrtcGetPTX(prog)
            lowered = {name: iface.nvrtcGetLoweredName(prog, name) for name in name_expressions}
        finally:
            iface.nvrtcDestroyProgram(prog)
    return CompiledPTX(arch, ptx, lowered, nvrtc, options, log)


_uselocale = None  # libc's uselocale once looked up, or False where there is none


def _libc_uselocale():
    global _uselocale
    if _uselocale is None:
        _uselocale = False
        if sys.platform != "win32":
            try:
                function = ctypes.CDLL(None).uselocale
            except (OSError, AttributeError):
                pass
            else:
                function.restype = ctypes.c_void_p
                function.argtypes = [ctypes.c_void_p]
                _uselocale = function
    return _uselocale or None


@contextlib.contextmanager
def keeping_thread_locale():
    """Restores the calling thread's C locale (POSIX ``uselocale``) on exit if the body changed it.

    ``nvrtcCompileProgram`` of NVRTC 12.0 switches the calling thread to the "C" locale and leaves
    it there. Python's default text encoding (``locale.getpreferredencoding(False)``, what
    ``open()`` uses without ``encoding=``) follows the thread's locale, so afterwards every such
    read of a UTF-8 file fails with an 'ascii' codec error: PyTorch's inductor loads its kernel
    templates that way, and ``torch.compile``, ``opcheck`` and AOT autograd break for the rest of
    the process. The global locale (``setlocale``) is not touched by NVRTC and so not by this.
    """
    uselocale = _libc_uselocale()
    saved = uselocale(None) if uselocale is not None else None  # NULL: query, change nothing
    try:
        yield
    finally:
        if uselocale is not None and uselocale(None) != saved:
            uselocale(saved)


def _program_log(iface, prog):
    try:
        return iface.nvrtcGetProgramLog(prog).strip()
    except Exception as exc:  # the log itself failed: say so rather than hide the first error
        return f"(no log: {exc})"


def compile_arch(arch, nvrtc=None, extra_options=()):
    """Compiles the package's kernel source with every instantiation for one architecture."""
    return compile_source(kernels.assembled_source(), kernels.all_kernel_names(), arch, nvrtc, extra_options)


# ---------------------------------------------------------------------------------------------
# Writing and reading a PTX folder


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


#: (folder mode, file mode) of a PTX folder to share, and of one in the private kernel cache.
PUBLIC_MODES = (0o755, 0o644)
PRIVATE_MODES = (0o700, 0o600)


def _make_folders(path, mode):
    """Creates ``path`` and any missing parent, each with ``mode`` whatever the umask (makedirs
    would give the parents the umask's mode: group-writable under umask 002)."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:  # made meanwhile by another process, or a file: the write says
            continue
        os.chmod(folder, mode)


def build(out_dir, archs=DEFAULT_ARCHS, libraries=None, extra_options=(), cuda=None,
          private=False):
    """Compiles every instantiation for each architecture and writes the PTX files and manifest
    into ``out_dir``. Returns the manifest (a dict).

    The NVRTC for every architecture is chosen (:func:`select_nvrtc`, with ``cuda`` the target
    driver release or None for the default) before anything is compiled, and nothing is written
    unless every architecture compiled. ``libraries`` (libnvrtc paths) replaces the NVRTC search.
    Folders it creates and the files it writes get explicit modes whatever the umask: readable by
    everyone (0755/0644, ``PUBLIC_MODES``), or private (0700/0600, ``PRIVATE_MODES``: a folder in
    the kernel cache).
    """
    archs = sorted({parse_arch(arch) for arch in archs})
    if not archs:
        raise ValueError("build: no architectures given")
    usable, rejected = survey_nvrtc(libraries)
    if not usable:
        raise NVRTCNotFoundError(_not_found_message(rejected))
    chosen = {arch: select_nvrtc(arch, usable, cuda) for arch in archs}
    results = [compile_arch(arch, chosen[arch], extra_options) for arch in archs]

    source_hash = kernels.source_hash()
    folder_mode, file_mode = PRIVATE_MODES if private else PUBLIC_MODES
    _make_folders(out_dir, folder_mode)
    manifest = {
        "format": MANIFEST_FORMAT,
        "generator": "sru_cupy.ptx",
        "source": kernels.SOURCE_FILE,
        "source_hash": source_hash,
        "archs": {},
    }
    previous = _read_manifest_or_none(out_dir)
    if previous is not None and previous.get("source_hash") == source_hash:
        for key, entry in previous.get("archs", {}).items():
            if os.path.isfile(os.path.join(out_dir, os.path.basename(str(entry.get("file", ""))))):
                manifest["archs"][key] = entry
    for result in results:
        data = result.ptx.encode()
        name = ptx_file_name(result.arch)
        write_atomic(os.path.join(out_dir, name), data, mode=file_mode)
        manifest["archs"][arch_key(result.arch)] = {
            "arch": result.arch,
            "file": name,
            "size": len(data),
            "sha256": _sha256(data),
            "ptx_isa": result.ptx_isa,
            "nvrtc_version": result.nvrtc.version_string,
            "nvrtc_library": result.nvrtc.path,
            # The driver JIT accepts PTX of its own release or older: this NVRTC's release.
            "min_driver": result.nvrtc.version_string,
            "options": result.options,
            "log": result.log,
            "lowered_names": result.lowered_names,
        }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    write_atomic(os.path.join(out_dir, MANIFEST_FILE), text.encode(), mode=file_mode)
    return manifest


def _read_manifest_or_none(folder):
    try:
        return read_manifest(folder)
    except PTXManifestError:
        return None


def read_manifest(folder):
    """The manifest of a PTX folder (a dict); raises :class:`PTXManifestError` if unreadable."""
    path = os.path.join(folder, MANIFEST_FILE)
    try:
        manifest = json.loads(cache.read_trusted(path))
    except FileNotFoundError:
        raise PTXManifestError(
            f"{path} not found: {folder!r} is not a PTX folder; build one with "
            f"`python -m sru_cupy compile --out {folder}`") from None
    except (OSError, ValueError) as exc:
        raise PTXManifestError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("archs"), dict):
        raise PTXManifestError(f"{path}: not a sru_cupy PTX manifest of format {MANIFEST_FORMAT}; rebuild it "
                               f"with `python -m sru_cupy compile --out {folder}`")
    return manifest


def ptx_dir_from_env():
    """The PTX folder named by ``$SRU_CUPY_PTX_DIR``, or None when it is unset or empty."""
    return os.environ.get(PTX_DIR_ENV_VAR) or None


def built_archs(folder):
    """The architectures a PTX folder holds (sorted ints)."""
    return sorted(int(entry["arch"]) for entry in read_manifest(folder)["archs"].values())


def load_ptx(folder, arch):
    """``(path, {name expression: lowered name})`` of one architecture's PTX in ``folder`` (see
    :func:`read_ptx`, which also gives the checked bytes: load those, not the path)."""
    path, _, lowered = read_ptx(folder, arch)
    return path, lowered


def read_ptx(folder, arch):
    """``(path, PTX bytes, {name expression: lowered name})`` of one architecture's PTX in
    ``folder``.

    Checks that the folder was built from the current kernel sources (source hash), that it holds
    ``arch`` and every instantiation, and that the PTX file is the one the manifest describes: the
    manifest and the PTX are read from descriptors checked as the kernel cache's files are
    (:func:`sru_cupy.cache.open_trusted`: a regular file, not a link, owned by this user or root,
    not writable by group or others), and the SHA-256 is of the bytes returned, so what is loaded
    is what was checked. Raises :class:`PTXManifestError` otherwise.
    """
    arch = parse_arch(arch)
    manifest = read_manifest(folder)
    rebuild = f"rebuild with `python -m sru_cupy compile --out {folder}`"
    current = kernels.source_hash()
    if manifest.get("source_hash") != current:
        raise PTXManifestError(
            f"PTX in {folder!r} was built from other kernel sources (source hash "
            f"{str(manifest.get('source_hash'))[:16]}..., the installed sources hash to {current[:16]}...); "
            f"{rebuild}")
    entry = manifest["archs"].get(arch_key(arch))
    if entry is None:
        have = ", ".join(sorted(manifest["archs"])) or "none"
        raise PTXManifestError(f"PTX in {folder!r} has no sm_{arch} (it has: {have}); "
                               f"build it with `python -m sru_cupy compile --arch sm_{arch} --out {folder}`")
    name = str(entry.get("file", ""))
    if not name or os.path.basename(name) != name:
        raise PTXManifestError(f"{folder!r}: manifest entry sm_{arch} names a bad file {name!r}; {rebuild}")
    path = os.path.abspath(os.path.join(folder, name))
    try:
        data = cache.read_trusted(path)
    except OSError as exc:
        raise PTXManifestError(f"{path}: cannot read the PTX of sm_{arch} ({exc}); {rebuild}") from None
    if _sha256(data) != entry.get("sha256"):
        raise PTXManifestError(f"{path} does not match its manifest (SHA-256 differs); {rebuild}")
    lowered = dict(entry.get("lowered_names") or {})
    missing = [name for name in kernels.all_kernel_names() if name not in lowered]
    if missing:
        raise PTXManifestError(f"PTX in {folder!r} for sm_{arch} lacks {', '.join(missing)}; {rebuild}")
    return path, data, lowered


def required_driver(folder, arch):
    """The oldest CUDA driver release ``(major, minor)`` that loads the PTX of ``arch`` in ``folder``
    (the manifest's ``min_driver``; for folders written before it was recorded, the NVRTC
    release)."""
    entry = read_manifest(folder)["archs"].get(arch_key(arch)) or {}
    value = entry.get("min_driver") or entry.get("nvrtc_version")
    if not value:
        raise PTXManifestError(f"PTX in {folder!r} records no NVRTC release for sm_{parse_arch(arch)}; "
                               f"rebuild with `python -m sru_cupy compile --out {folder}`")
    return parse_cuda_version(value)


def load_ptx_for_device(folder, device_arch):
    """``(arch, path, names)`` for a device of compute capability ``device_arch`` (e.g. 86): the
    newest architecture in ``folder`` not above it, through :func:`load_ptx`."""
    arch, path, _, names = read_ptx_for_device(folder, device_arch)
    return arch, path, names


def read_ptx_for_device(folder, device_arch):
    """``(arch, path, PTX bytes, names)`` for a device of compute capability ``device_arch``: the
    newest architecture in ``folder`` not above it, through :func:`read_ptx`."""
    device_arch = parse_arch(device_arch)
    archs = built_archs(folder)
    fitting = [arch for arch in archs if arch <= device_arch]
    if not fitting:
        have = ", ".join(f"sm_{arch}" for arch in archs) or "none"
        raise PTXManifestError(
            f"PTX in {folder!r} has no architecture a sm_{device_arch} device can run (it has: {have}); "
            f"build it with `python -m sru_cupy compile --arch sm_{device_arch} --out {folder}`")
    arch = fitting[-1]
    path, data, names = read_ptx(folder, arch)
    return arch, path, data, names


# ---------------------------------------------------------------------------------------------
# ptxas (optional check)


@dataclasses.dataclass(frozen=True)
class Ptxas:
    """A ptxas executable and its release (major, minor)."""

    path: str
    version: tuple

    @property
    def version_string(self):
        return "%d.%d" % self.version


_ptxas_versions = {}


def _ptxas_version(path):
    if path not in _ptxas_versions:
        version = None
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
            match = re.search(r"release (\d+)\.(\d+)", out)
            if match:
                version = (int(match.group(1)), int(match.group(2)))
        except (OSError, subprocess.SubprocessError):
            pass
        _ptxas_versions[path] = version
    return _ptxas_versions[path]


def find_ptxas():
    """Every ptxas found (cuda.pathfinder's, the NVIDIA wheels' ``nvidia/*/bin``, CUDA_PATH,
    CUDA_HOME, /usr/local/cuda, PATH), one per real file, with its release."""
    candidates = []
    try:
        from cuda import pathfinder
        candidates.append(pathfinder.find_nvidia_binary_utility("ptxas"))
    except Exception:  # not installed, or an unsupported platform
        pass
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            candidates.extend(sorted(glob.glob(os.path.join(entry, "nvidia", "*", "bin", _PTXAS))))
    candidates += [os.path.join(root, "bin", _PTXAS) for root in _toolkit_roots()]
    candidates.append(shutil.which("ptxas"))
    found, seen = [], set()
    for path in candidates:
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            continue
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        version = _ptxas_version(path)
        if version is not None:
            found.append(Ptxas(os.path.abspath(path), version))
    return found


def ptxas_for(nvrtc_version, ptxas_tools=None):
    """The ptxas to assemble PTX from an NVRTC of ``nvrtc_version`` ((major, minor) or "13.5"): the
    same release, else the oldest newer release of the same major version (a newer major may have
    dropped the architecture). None if there is none."""
    if isinstance(nvrtc_version, str):
        nvrtc_version = tuple(int(part) for part in nvrtc_version.split(".")[:2])
    tools = find_ptxas() if ptxas_tools is None else ptxas_tools
    fitting = sorted((tool for tool in tools
                      if tool.version[0] == nvrtc_version[0] and tool.version >= tuple(nvrtc_version)),
                     key=lambda tool: tool.version)
    return fitting[0] if fitting else None


@dataclasses.dataclass(frozen=True)
class AssembleResult:
    returncode: int
    output: str  # ptxas's stdout and stderr
    functions: dict  # lowered name -> {"registers", "stack", "spill_stores", "spill_loads"} (ints)
    command: list


def parse_ptxas_verbose(text):
    """Per function, from ``ptxas -v`` output: registers, stack frame and spill bytes."""
    functions, current = {}, None
    for line in text.splitlines():
        match = re.search(r"Compiling entry function '([^']+)'", line) or \
            re.search(r"Function properties for (\S+)", line)
        if match:
            current = functions.setdefault(match.group(1), {})
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            current.update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
        match = re.search(r"Used (\d+) registers", line)
        if match:
            current["registers"] = int(match.group(1))
    return functions


def assemble(ptx_path, arch, ptxas, extra_args=()):
    """Runs ``ptxas -arch=sm_XX -v`` on a PTX file (the cubin is discarded)."""
    arch = parse_arch(arch)
    with tempfile.TemporaryDirectory(prefix="sru_cupy_ptxas_") as tmp:
        command = [ptxas.path if isinstance(ptxas, Ptxas) else str(ptxas), f"-arch=sm_{arch}", "-v",
                   *extra_args, str(ptx_path), "-o", os.path.join(tmp, "out.cubin")]
        proc = subprocess.run(command, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    return AssembleResult(proc.returncode, output, parse_ptxas_verbose(output), command)
