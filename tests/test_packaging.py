"""Packaging checks: the wheel ships the CUDA sources, and importing sru_cupy is inert.

The CUDA sources live in the top-level cuda/ folder; setup.cfg maps that folder into
the wheel as the data-only package ``sru_cupy.cuda`` (package_dir + package_data).
Nothing is compiled at install or import time.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "cuda"
CUDA_SUFFIXES = (".cu", ".cuh", ".h")

# Not copied into the scratch source tree the wheel is built from.
_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    "out",
    "*.so",
    "*.ptx",
)


def _checkout_cuda_sources():
    return sorted(p.name for p in CUDA_DIR.iterdir() if p.is_file() and p.suffix in CUDA_SUFFIXES)


def _checkout_python_modules():
    pkg = REPO / "sru_cupy"
    return sorted(
        p.relative_to(REPO).as_posix()
        for p in pkg.rglob("*.py")
        if "__pycache__" not in p.parts
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build a wheel from a copy of the checkout, offline and without dependencies."""
    if not (CUDA_DIR / "sru_recurrence.cu").is_file():
        pytest.skip("cuda/sru_recurrence.cu is not in the checkout yet")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_COPY_IGNORE)
    out = tmp / "dist"
    cmd = [
        sys.executable, "-m", "pip", "wheel",
        "--no-deps", "--no-build-isolation", "--no-cache-dir",
        "--disable-pip-version-check", "-q",
        "-w", str(out), str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed (needs setuptools>=64 and wheel in this environment):\n"
        f"{proc.stdout}\n{proc.stderr}"
    )
    wheels = list(out.glob("sru_cupy-*.whl"))
    assert len(wheels) == 1, f"expected one sru_cupy wheel, got {sorted(os.listdir(out))}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel_names(wheel):
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_contains_cuda_sources(wheel_names):
    assert "sru_cupy/cuda/sru_recurrence.cu" in wheel_names
    assert "sru_cupy/cuda/sru_host_emulation.h" in wheel_names
    expected = {f"sru_cupy/cuda/{name}" for name in _checkout_cuda_sources()}
    missing = sorted(expected - wheel_names)
    assert not missing, f"CUDA sources missing from the wheel: {missing}"
    # Headers (.h / .cuh) are what #include resolves against at compile time.
    assert any(n.startswith("sru_cupy/cuda/") and n.endswith((".h", ".cuh")) for n in wheel_names)


def test_wheel_contains_all_python_modules(wheel_names):
    missing = sorted(set(_checkout_python_modules()) - wheel_names)
    assert not missing, (
        f"modules missing from the wheel: {missing} "
        "(a new sru_cupy subpackage must be added to `packages` in setup.cfg)"
    )


def test_wheel_layout(wheel, wheel_names):
    # cuda/ ships only inside sru_cupy; a top-level cuda/ would collide with the
    # `cuda` namespace of cuda-python / cuda-pathfinder.
    assert not any(n.startswith("cuda/") for n in wheel_names)
    with zipfile.ZipFile(wheel) as zf:
        dist_info = next(n.split("/")[0] for n in wheel_names if n.endswith(".dist-info/METADATA"))
        top_level = {n for n in wheel_names if "/" not in n}
        assert not top_level, f"unexpected top-level files in the wheel: {sorted(top_level)}"
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert "sru-cupy = sru_cupy.__main__:main" in entry_points
    assert "Requires-Dist: numpy>=1.22" in metadata
    # No compiled artefacts: nothing is built at install time.
    assert not [n for n in wheel_names if n.endswith((".so", ".pyd", ".ptx", ".cubin"))]


def test_installed_wheel_finds_cuda_sources(wheel, tmp_path):
    """Unpacked as pip installs it, sru_cupy.cuda resolves to the shipped sources."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = textwrap.dedent(
        """
        import importlib.resources, json, sys
        import sru_cupy
        root = importlib.resources.files("sru_cupy.cuda")
        print(json.dumps({
            "pkg": sru_cupy.__file__,
            "cu": root.joinpath("sru_recurrence.cu").is_file(),
            "h": root.joinpath("sru_host_emulation.h").is_file(),
        }))
        """
    )
    # cwd = the unpacked wheel, so it comes first on sys.path (ahead of the checkout).
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=site, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["pkg"]).resolve().is_relative_to(site.resolve()), got
    assert got["cu"] and got["h"], got


_INERT_IMPORT = textwrap.dedent(
    """
    import ctypes, json, os, subprocess, sys

    loaded = []
    _cdll_init = ctypes.CDLL.__init__
    def _record_cdll(self, name, *args, **kwargs):
        loaded.append(str(name))
        return _cdll_init(self, name, *args, **kwargs)
    ctypes.CDLL.__init__ = _record_cdll   # CDLL, PyDLL, cdll.LoadLibrary, ...

    spawned = []
    _popen_init = subprocess.Popen.__init__
    def _record_popen(self, args, *a, **kw):
        spawned.append(str(args))
        return _popen_init(self, args, *a, **kw)
    subprocess.Popen.__init__ = _record_popen

    def maps():
        try:
            with open("/proc/self/maps") as f:
                return {line.split()[-1] for line in f if ".so" in line}
        except OSError:
            return set()

    before = maps()
    import sru_cupy
    new_libs = sorted(maps() - before)

    print(json.dumps({
        "file": sru_cupy.__file__,
        "modules": sorted(
            m for m in sys.modules
            if m.split(".")[0] in ("cupy", "cupy_backends", "cupyx", "torch", "pynvrtc", "cuda")
        ),
        "cdll": loaded,
        "spawned": spawned,
        "cuda_libs": [p for p in new_libs if any(
            k in os.path.basename(p) for k in ("libcuda", "libnvrtc", "libcudart", "sru")
        )],
    }))
    """
)


def test_import_is_inert(tmp_path):
    """`import sru_cupy` loads no GPU stack, no shared library, and creates no cache dir."""
    cache = tmp_path / "cache"
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    env = dict(os.environ)
    env["SRU_CUPY_CACHE_DIR"] = str(cache)
    env["XDG_CACHE_HOME"] = str(xdg)
    env.pop("PYTHONPATH", None)
    # cwd = the checkout, so this tests its sru_cupy whether or not it is installed.
    proc = subprocess.run(
        [sys.executable, "-c", _INERT_IMPORT],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(REPO / "sru_cupy"), got
    assert got["modules"] == [], f"import sru_cupy imported {got['modules']}"
    assert got["cdll"] == [], f"import sru_cupy loaded shared libraries via ctypes: {got['cdll']}"
    assert got["spawned"] == [], f"import sru_cupy started processes: {got['spawned']}"
    assert got["cuda_libs"] == [], f"import sru_cupy mapped CUDA libraries: {got['cuda_libs']}"
    assert not cache.exists(), "import sru_cupy created SRU_CUPY_CACHE_DIR"
    assert list(xdg.iterdir()) == [], f"import sru_cupy wrote to the cache home: {list(xdg.iterdir())}"


# -- the package's structure -------------------------------------------------------------------


def _package_imports():
    """{module: the package modules it imports, at the top or inside a function}."""
    import ast
    root = Path(__file__).resolve().parents[1] / "sru_cupy"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.with_suffix("").relative_to(root.parent).parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found = f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                if found in modules and found != name:
                    imports[name].add(found)
    return imports


def test_no_import_circles_lazy_imports_included():
    imports = _package_imports()
    assert "sru_cupy.ops" in imports["sru_cupy.modules"]  # the reading sees imports

    def reaches(start, goal, seen):
        for other in imports[start]:
            if other == goal or (other not in seen and not seen.add(other)
                                 and reaches(other, goal, seen)):
                return True
        return False

    circles = sorted(name for name in imports if reaches(name, name, set()))
    assert circles == [], f"modules on an import circle: {circles}"


def test_no_private_name_is_imported_across_modules():
    import ast
    root = Path(__file__).resolve().parents[1] / "sru_cupy"
    modules = {path.stem for path in root.rglob("*.py")}
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in modules and node.value.id != path.stem \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert found == []


def _parameter_count(function):
    """Parameters of a def, self or cls left out, *args and **kwargs one each."""
    a = function.args
    names = [p.arg for p in a.posonlyargs + a.args]
    count = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return count - (1 if names and names[0] in ("self", "cls") else 0)


def test_few_functions_outside_constructors_take_twelve_or_more_parameters():
    """A call's arguments travel as one description (sru_cupy.call), not as long signatures
    copied from layer to layer: at most 5 functions other than constructors take 12 or more."""
    import ast
    root = Path(__file__).resolve().parents[1] / "sru_cupy"
    long, seen = [], 0
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                seen += 1
                if node.name != "__init__" and _parameter_count(node) >= 12:
                    long.append(f"{path.name}:{node.lineno} {node.name} "
                                f"({_parameter_count(node)})")
    assert seen > 100, "the reading sees the package's functions"
    assert len(long) <= 5, long


def test_parameter_count_reads_what_a_signature_takes():
    import ast
    function = ast.parse("def f(self, a, /, b, *rest, c, **more): pass").body[0]
    assert _parameter_count(function) == 5
    assert _parameter_count(ast.parse("def g(x): pass").body[0]) == 1
