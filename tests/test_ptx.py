"""The device-free PTX build (sru_cupy.ptx, `python -m sru_cupy compile`): every instantiation
compiles with NVRTC for sm_70, sm_80 and sm_90, each PTX has an entry per kernel, ptxas (where one
matching the NVRTC is installed) assembles it without spills, and the manifest loader rejects stale
or incomplete folders. The default build loads on the oldest driver of each CUDA major (NVRTC 13.0,
PTX ISA 9.0, for sm_80/sm_90, assembled by the ptxas of CUDA 13.0; NVRTC 12.0, PTX ISA 8.0, for
sm_70), ``--cuda`` targets an older driver, and the manifest records the minimum driver.

Needs pynvrtc and libnvrtc (the `test` extras install both, with NVRTC 12 for sm_70); skipped with
the reason where they are missing. Each architecture is compiled once per session."""

import contextlib
import ctypes
import importlib
import io
import json
import locale
import os
import re
import shutil
import subprocess
import sys

import pytest

from sru_cupy import kernels, ptx
from sru_cupy.__main__ import main
from sru_cupy.errors import KernelCompileError

from child_env import child_env

ARCHS = (70, 80, 90)
# NVRTC 12 warns for every pre-Turing target; any other warning is a finding about the source.
KNOWN_WARNING = re.compile(r"Architectures prior to .* are deprecated")


def _nvrtc_unavailable_reason():
    try:
        importlib.import_module("pynvrtc.interface")
    except ImportError as exc:
        return f"pynvrtc is not installed ({exc}); pip install -e '.[test]'"
    usable, rejected = ptx.survey_nvrtc()
    if not usable:
        return "no libnvrtc found; pip install -e '.[test]'" + "".join(f"; {r}" for r in rejected)
    return None


@pytest.fixture(scope="module")
def nvrtc():
    """Skips (with the reason) where pynvrtc or libnvrtc is not installed."""
    reason = _nvrtc_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def built(nvrtc, tmp_path_factory):
    """Compiles all ARCHS once through the command line; (folder, stdout, manifest)."""
    folder = str(tmp_path_factory.mktemp("ptx"))
    argv = ["compile", "--out", folder]
    for arch, spelling in zip(ARCHS, ("sm_70", "80", "compute_90")):
        argv += ["--arch", spelling]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 0, f"compile failed:\n{out.getvalue()}\n{err.getvalue()}"
    return folder, out.getvalue(), ptx.read_manifest(folder)


def _ptx_text(folder, manifest, arch):
    with open(os.path.join(folder, manifest["archs"][f"sm_{arch}"]["file"]), encoding="utf-8") as f:
        return f.read()


def test_cli_reports_every_arch(built):
    folder, out, manifest = built
    assert sorted(manifest["archs"]) == [f"sm_{arch}" for arch in ARCHS]
    names = kernels.all_kernel_names()
    for arch in ARCHS:
        entry = manifest["archs"][f"sm_{arch}"]
        line = next(l for l in out.splitlines() if l.startswith(f"sm_{arch}:"))
        assert f"NVRTC {entry['nvrtc_version']}" in line
        assert f"{entry['size']} bytes" in line and f"{len(names)} kernels" in line
    assert manifest["source_hash"] == kernels.source_hash()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_instantiation_has_an_entry(built, arch):
    folder, _, manifest = built
    entry = manifest["archs"][f"sm_{arch}"]
    text = _ptx_text(folder, manifest, arch)
    assert f".target sm_{arch}" in text
    assert ptx.ptx_isa_version(text) == entry["ptx_isa"]
    lowered = entry["lowered_names"]
    assert sorted(lowered) == sorted(kernels.all_kernel_names())
    assert len(set(lowered.values())) == len(lowered)
    entries = re.findall(r"^(?:\.visible |\.weak )?\.entry (\S+)\(", text, re.MULTILINE)
    assert sorted(entries) == sorted(lowered.values())
    # The kernels compile cleanly: nothing in the log but NVRTC 12's pre-Turing notice.
    unexpected = [l for l in entry["log"].splitlines() if l.strip() and not KNOWN_WARNING.search(l)]
    assert not unexpected, entry["log"]


@pytest.mark.parametrize("arch", ARCHS)
def test_default_nvrtc_is_the_oldest_of_the_newest_major(built, arch):
    _, _, manifest = built
    supporting = [n.version for n in ptx.available_nvrtcs() if n.supports(arch)]
    assert supporting, f"no NVRTC supports sm_{arch}; the test extras install NVRTC 12 and 13"
    newest_major = max(v[0] for v in supporting)
    oldest = min(v for v in supporting if v[0] == newest_major)
    entry = manifest["archs"][f"sm_{arch}"]
    assert entry["nvrtc_version"] == "%d.%d" % oldest
    assert entry["min_driver"] == entry["nvrtc_version"]


# The oldest driver of each CUDA major must load the default build: PTX ISA 9.0 is what a CUDA 13.0
# driver knows, 8.0 what a CUDA 12.0 driver knows. The test extras pin NVRTC 13.0.x and 12.0.x.
DEFAULT_BUILD = {70: ("12.0", "8.0"), 80: ("13.0", "9.0"), 90: ("13.0", "9.0")}


@pytest.mark.parametrize("arch", ARCHS)
def test_default_ptx_loads_on_the_oldest_driver_of_its_major(built, arch):
    folder, out, manifest = built
    entry = manifest["archs"][f"sm_{arch}"]
    min_driver, isa = DEFAULT_BUILD[arch]
    assert (entry["min_driver"], entry["ptx_isa"]) == (min_driver, isa), (
        f"sm_{arch}: the default build needs a driver for CUDA {entry['min_driver']} (PTX ISA "
        f"{entry['ptx_isa']}); install the pinned NVRTC: pip install -e '.[test]'")
    assert ptx.required_driver(folder, arch) == tuple(int(p) for p in min_driver.split("."))
    line = next(l for l in out.splitlines() if l.startswith(f"sm_{arch}:"))
    assert f"drivers for CUDA {min_driver} and newer" in line


def test_default_command_output_assembles_with_the_oldest_ptxas_of_each_major(nvrtc, tmp_path):
    """`python -m sru_cupy compile` with no options: ptxas of CUDA 13.0 assembles its sm_80 and
    sm_90 PTX, a CUDA 12 ptxas its sm_70 PTX (the system's or the nvidia-cuda-nvcc wheels')."""
    tools = ptx.find_ptxas()
    ptxas_13_0 = [t for t in tools if t.version == (13, 0)]
    ptxas_12 = [t for t in tools if t.version[0] == 12]
    if not ptxas_13_0 or not ptxas_12:
        found = ", ".join(f"{t.version_string} at {t.path}" for t in tools) or "none"
        pytest.skip(f"needs ptxas 13.0 and a ptxas 12.x (pip install -e '.[test]' installs "
                    f"nvidia-cuda-nvcc==13.0.* and nvidia-cuda-nvcc-cu12); found: {found}")
    out = tmp_path / "default"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["compile", "--out", str(out)]) == 0
    manifest = ptx.read_manifest(str(out))
    assert sorted(manifest["archs"]) == [f"sm_{a}" for a in ptx.DEFAULT_ARCHS]
    for arch, tool in ((80, ptxas_13_0[0]), (90, ptxas_13_0[0]), (70, ptxas_12[0])):
        result = ptx.assemble(out / manifest["archs"][f"sm_{arch}"]["file"], arch, tool)
        assert result.returncode == 0, f"ptxas {tool.version_string} sm_{arch}:\n{result.output}"


def test_cuda_target_picks_the_newest_nvrtc_not_newer(nvrtc, tmp_path, capsys):
    nvrtcs = ptx.available_nvrtcs()
    versions = sorted({n.version for n in nvrtcs if n.supports(80)})
    target = versions[0]
    out = tmp_path / "target"
    assert main(["compile", "--arch", "sm_80", "--cuda", "%d.%d" % target, "--out", str(out)]) == 0
    entry = ptx.read_manifest(str(out))["archs"]["sm_80"]
    assert entry["nvrtc_version"] == entry["min_driver"] == "%d.%d" % target
    assert main(["compile", "--arch", "sm_80", "--cuda", "11.0", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "not newer than CUDA 11.0" in err and "nvidia-cuda-nvrtc-cu11==11.0.*" in err
    with pytest.raises(SystemExit) as info:
        main(["compile", "--cuda", "thirteen"])
    assert info.value.code == 2


def _fake(version, archs):
    return ptx.NVRTC(f"/fake/libnvrtc.{version[0]}.{version[1]}", version, tuple(archs))


FAKE_NVRTCS = [_fake((12, 0), (50, 70, 75, 80, 90)), _fake((12, 9), (50, 70, 75, 80, 90, 100)),
               _fake((13, 0), (75, 80, 90, 100)), _fake((13, 5), (75, 80, 90, 100, 120))]


@pytest.mark.parametrize("arch, cuda, expected", [
    (80, None, (13, 0)), (90, None, (13, 0)), (70, None, (12, 0)), (120, None, (13, 5)),
    (80, "12.4", (12, 0)), (80, "12.9", (12, 9)), (80, "13.2", (13, 0)), (80, (13, 5), (13, 5)),
    (70, "13.5", (12, 9)), (100, 12090, (12, 9)),
], ids=lambda v: str(v))
def test_select_nvrtc_rules(arch, cuda, expected):
    assert ptx.select_nvrtc(arch, FAKE_NVRTCS, cuda).version == expected


def test_select_nvrtc_for_too_old_a_target_names_the_wheel():
    with pytest.raises(ptx.UnsupportedArchError, match=r"nvidia-cuda-nvrtc==13\.1\.\*"):
        ptx.select_nvrtc(120, FAKE_NVRTCS, "13.1")


@pytest.mark.parametrize("value, expected", [("12.4", (12, 4)), ("13", (13, 0)), (13000, (13, 0)),
                                             (12090, (12, 9)), ((12, 2), (12, 2)), (" 13.1 ", (13, 1))])
def test_parse_cuda_version(value, expected):
    assert ptx.parse_cuda_version(value) == expected


@pytest.mark.parametrize("value", ["twelve", "", "1.2", "12.x", "sm_80"])
def test_parse_cuda_version_rejects(value):
    with pytest.raises(ValueError, match="cuda: expected"):
        ptx.parse_cuda_version(value)


def test_required_driver_of_an_older_manifest_is_its_nvrtc_release(built, tmp_path):
    folder = _copy(built[0], tmp_path)
    _edit_manifest(folder, lambda m: m["archs"]["sm_90"].pop("min_driver"))
    nvrtc_version = ptx.read_manifest(folder)["archs"]["sm_90"]["nvrtc_version"]
    assert ptx.required_driver(folder, 90) == ptx.parse_cuda_version(nvrtc_version)


@pytest.fixture(scope="module")
def ptxas_tools():
    return ptx.find_ptxas()


@pytest.mark.parametrize("arch", ARCHS)
def test_ptxas_assembles_without_spills(built, ptxas_tools, arch):
    folder, _, manifest = built
    entry = manifest["archs"][f"sm_{arch}"]
    tool = ptx.ptxas_for(entry["nvrtc_version"], ptxas_tools)
    if tool is None:
        found = ", ".join(f"{t.version_string} at {t.path}" for t in ptxas_tools) or "none"
        pytest.skip(f"no ptxas matching NVRTC {entry['nvrtc_version']} (PTX ISA {entry['ptx_isa']}); "
                    f"found: {found}")
    result = ptx.assemble(os.path.join(folder, entry["file"]), arch, tool)
    assert result.returncode == 0, f"{' '.join(result.command)}\n{result.output}"
    for name, lowered in entry["lowered_names"].items():
        info = result.functions.get(lowered)
        assert info is not None, f"ptxas -v says nothing about {name} ({lowered}):\n{result.output}"
        assert "registers" in info and "spill_stores" in info, f"{name}: {info}\n{result.output}"
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{name} spills on sm_{arch}: {info}"


_VARIANT_LINE = re.compile(r"^    (\S.*?)\s+(\d+) registers, spills (\d+) bytes stored (\d+) loaded, "
                           r"stack (\d+) bytes$")


def _arch_section(out, arch):
    """The lines `compile` printed for one architecture (up to the next one or the manifest)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"sm_{arch}:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return lines[start + 1:end]


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_reports_registers_and_spills_per_variant(built, ptxas_tools, arch):
    """By default `compile` assembles each architecture's PTX with the matching ptxas and prints
    one line per kernel variant (with and without V) with the figures ptxas -v gives for it."""
    folder, out, manifest = built
    entry = manifest["archs"][f"sm_{arch}"]
    section = _arch_section(out, arch)
    tool = ptx.ptxas_for(entry["nvrtc_version"], ptxas_tools)
    if tool is None:  # the command says why it reports nothing
        assert any(f"ptxas: none matching NVRTC {entry['nvrtc_version']}" in l for l in section)
        pytest.skip(f"no ptxas matching NVRTC {entry['nvrtc_version']}; the note was checked")
    rows = {m.group(1): tuple(int(g) for g in m.groups()[1:])
            for m in map(_VARIANT_LINE.match, section) if m}
    assert sorted(rows) == sorted(kernels.all_kernel_names()), "\n".join(section)
    assert {name.split(", ")[2] for name in rows} == {"false", "true"}
    result = ptx.assemble(os.path.join(folder, entry["file"]), arch, tool)
    for name, lowered in entry["lowered_names"].items():
        info = result.functions[lowered]
        assert rows[name] == (info["registers"], info["spill_stores"], info["spill_loads"],
                              info["stack"]), name


def _compile_output(built, monkeypatch, capsys, *options):
    """`compile` over the already built folder (ptx.build reads its manifest instead of building
    again): (exit code, stdout, stderr)."""
    folder, _, manifest = built
    monkeypatch.setattr(ptx, "build", lambda out, archs, **kwargs: ptx.read_manifest(out))
    argv = ["compile", "--out", folder, *options]
    for arch in ARCHS:
        argv += ["--arch", f"sm_{arch}"]
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_without_a_matching_ptxas_says_so_and_fails_only_with_ptxas(built, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(ptx, "find_ptxas", lambda: [])
    rc, out, _ = _compile_output(built, monkeypatch, capsys)
    assert rc == 0
    for arch in ARCHS:
        section = _arch_section(out, arch)
        assert any("ptxas: none matching NVRTC" in line for line in section), out
        assert not any(_VARIANT_LINE.match(line) for line in section), out
    rc, out, err = _compile_output(built, monkeypatch, capsys, "--ptxas")
    assert rc == 1 and "ptxas did not assemble" in err and "ptxas: none matching" in out


def test_cli_no_ptxas_skips_the_report(built, monkeypatch, capsys):
    def no_search():
        raise AssertionError("--no-ptxas looked for ptxas")

    monkeypatch.setattr(ptx, "find_ptxas", no_search)
    rc, out, _ = _compile_output(built, monkeypatch, capsys, "--no-ptxas")
    assert rc == 0 and "ptxas" not in out and not any(map(_VARIANT_LINE.match, out.splitlines()))
    with pytest.raises(SystemExit) as info:
        main(["compile", "--ptxas", "--no-ptxas"])
    assert info.value.code == 2


def test_fused_multiply_add_is_chosen_explicitly(built):
    """Both GPU builds pass --fmad=true: NVRTC contracts a * b + c into one fma (the host build
    does not: -ffp-contract=off), and the option is in every architecture's manifest entry."""
    assert "--fmad=true" in ptx.BASE_OPTIONS
    _, _, manifest = built
    for entry in manifest["archs"].values():
        assert "--fmad=true" in entry["options"]
    source = 'extern "C" __global__ void axpy(float* p) { p[0] = p[1] * p[2] + p[3]; }\n'
    contracted = ptx.compile_source(source, [], 80).ptx
    assert re.search(r"\bfma\.rn\.f32", contracted), contracted
    separate = ptx.compile_source(source, [], 80, extra_options=("--fmad=false",)).ptx
    assert not re.search(r"\bfma\.", separate) and re.search(r"\bmul\.rn\.f32", separate)


def test_parse_ptxas_verbose():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, 360 bytes cmem[0]
"""
    assert ptx.parse_ptxas_verbose(text) == {
        "_Z1kPf": {"stack": 8, "spill_stores": 4, "spill_loads": 12, "registers": 40}}


@pytest.mark.parametrize("spelling", [80, "80", "sm_80", "SM80", "compute_80"])
def test_manifest_round_trip(built, spelling):
    folder, _, manifest = built
    path, names = ptx.load_ptx(folder, spelling)
    entry = manifest["archs"]["sm_80"]
    assert os.path.isfile(path) and os.path.samefile(path, os.path.join(folder, entry["file"]))
    assert names == entry["lowered_names"]
    assert set(names) == set(kernels.all_kernel_names())


@pytest.mark.parametrize("device, expected", [(70, 70), (75, 70), (86, 80), (89, 80), (90, 90), (120, 90)])
def test_load_for_device_picks_newest_not_above(built, device, expected):
    folder = built[0]
    arch, path, names = ptx.load_ptx_for_device(folder, device)
    assert arch == expected
    assert (path, names) == ptx.load_ptx(folder, expected)


def _copy(folder, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(folder, target)
    return target


def _edit_manifest(folder, edit):
    path = os.path.join(folder, ptx.MANIFEST_FILE)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def test_source_hash_mismatch_is_detected(built, tmp_path, monkeypatch):
    folder = _copy(built[0], tmp_path)
    _edit_manifest(folder, lambda m: m.update(source_hash="0" * 64))
    with pytest.raises(ptx.PTXManifestError, match="other kernel sources"):
        ptx.load_ptx(folder, 80)
    # And the other way round: the installed sources change under an intact folder.
    monkeypatch.setattr(kernels, "source_hash", lambda *extra: "f" * 64)
    with pytest.raises(ptx.PTXManifestError, match="other kernel sources"):
        ptx.load_ptx(built[0], 80)


def test_missing_arch_manifest_and_file_are_reported(built, tmp_path):
    folder = built[0]
    with pytest.raises(ptx.PTXManifestError, match=r"no sm_75 \(it has: sm_70, sm_80, sm_90\)"):
        ptx.load_ptx(folder, 75)
    with pytest.raises(ptx.PTXManifestError, match="no architecture a sm_61 device can run"):
        ptx.load_ptx_for_device(folder, 61)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ptx.PTXManifestError, match="not a PTX folder"):
        ptx.load_ptx(str(empty), 80)
    copy = _copy(folder, tmp_path)
    with open(os.path.join(copy, ptx.ptx_file_name(90)), "a", encoding="utf-8") as f:
        f.write("// changed\n")
    with pytest.raises(ptx.PTXManifestError, match="SHA-256"):
        ptx.load_ptx(copy, 90)
    os.remove(os.path.join(copy, ptx.ptx_file_name(90)))
    with pytest.raises(ptx.PTXManifestError, match="cannot read"):
        ptx.load_ptx(copy, 90)
    _edit_manifest(copy, lambda m: m["archs"]["sm_80"]["lowered_names"].popitem())
    with pytest.raises(ptx.PTXManifestError, match="lacks"):
        ptx.load_ptx(copy, 80)
    _edit_manifest(copy, lambda m: m.update(format=999))
    with pytest.raises(ptx.PTXManifestError, match="format"):
        ptx.load_ptx(copy, 80)


def test_compile_error_surfaces_the_log(nvrtc):
    broken = "template <typename T> __global__ void broken(T* p) { *p = undeclared_name; }\n"
    with pytest.raises(KernelCompileError) as info:
        ptx.compile_source(broken, ["broken<float>"], 80)
    assert "undeclared_name" in info.value.log
    assert "--gpu-architecture=compute_80" in info.value.options
    assert "undeclared_name" in str(info.value)


def test_bad_option_surfaces_the_log(nvrtc):
    source = 'extern "C" __global__ void fine(float* p) { *p = 1.0f; }\n'
    with pytest.raises(KernelCompileError) as info:
        ptx.compile_source(source, [], 80, extra_options=["--no-such-option"])
    assert "--no-such-option" in info.value.log
    assert "--no-such-option" in info.value.options


def test_rebuilding_one_arch_keeps_the_others(built, tmp_path):
    folder = _copy(built[0], tmp_path)
    before = ptx.read_manifest(folder)
    manifest = ptx.build(folder, [80])
    assert sorted(manifest["archs"]) == ["sm_70", "sm_80", "sm_90"]
    assert manifest["archs"]["sm_70"] == before["archs"]["sm_70"]
    assert ptx.load_ptx(folder, 70)[1] == before["archs"]["sm_70"]["lowered_names"]


def test_unsupported_arch_names_the_nvrtcs(nvrtc):
    with pytest.raises(ptx.UnsupportedArchError) as info:
        ptx.select_nvrtc(20)
    message = str(info.value)
    assert "sm_20" in message
    for nvrtc in ptx.available_nvrtcs():
        assert f"NVRTC {nvrtc.version_string}" in message


def test_cli_failure_exits_nonzero(nvrtc, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "--arch", "sm_20", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "compile: error:" in err and "sm_20" in err
    assert not out.exists()  # nothing is written when an architecture cannot be built
    with pytest.raises(SystemExit) as info:
        main(["compile", "--arch", "volta"])
    assert info.value.code == 2


@pytest.mark.parametrize("value", ["sm_x", "", "sm_", "5", "compute_ab"])
def test_parse_arch_rejects(value):
    with pytest.raises(ValueError):
        ptx.parse_arch(value)


# NVRTC 12.0's nvrtcCompileProgram leaves the calling thread on the "C" locale (uselocale), which
# turns Python's default text encoding to ASCII: inductor's template reads (torch.compile, opcheck)
# then fail for the rest of the process. Run in a child so that a leak cannot spoil this one.
_LOCALE_AFTER_COMPILE = r"""
import ctypes, json, locale, sys
from sru_cupy import ptx
uselocale = ctypes.CDLL(None).uselocale
uselocale.restype, uselocale.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
path = sys.argv[1]
def state():
    with open(path) as f:  # the default encoding, as inductor reads its templates
        try:
            text = f.read()
        except UnicodeDecodeError as exc:
            text = repr(exc)
    return [uselocale(None), locale.getpreferredencoding(False), text]
before = state()
rows = []
for nvrtc in ptx.available_nvrtcs():
    arch = 80 if nvrtc.supports(80) else nvrtc.archs[-1]
    ptx.compile_source('extern "C" __global__ void k(float* p) { *p = 1.0f; }', [], arch, nvrtc)
    rows.append([nvrtc.version_string, before, state()])
print(json.dumps(rows))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uselocale through glibc")
def test_compiling_keeps_the_thread_locale_and_default_encoding(nvrtc, tmp_path):
    sample = tmp_path / "utf8.txt"
    sample.write_text("c\u2032 = (c - u0) f + u0\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", _LOCALE_AFTER_COMPILE, str(sample)],
                            capture_output=True, text=True, env=child_env(LC_ALL="C.UTF-8"),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows, "no NVRTC was exercised"
    for version, before, after in rows:
        assert after == before, f"NVRTC {version} changed (thread locale, encoding, read)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uselocale through glibc")
def test_keeping_thread_locale_undoes_a_switch_to_c():
    libc = ctypes.CDLL(None)
    libc.uselocale.restype, libc.uselocale.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    libc.newlocale.restype = ctypes.c_void_p
    libc.newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    libc.freelocale.argtypes = [ctypes.c_void_p]
    c_locale = libc.newlocale(1 << locale.LC_CTYPE, b"C", None)  # glibc: mask bit = category
    assert c_locale
    before = libc.uselocale(None)
    try:
        with ptx.keeping_thread_locale():
            libc.uselocale(c_locale)  # what NVRTC 12.0's compile does
            assert libc.uselocale(None) == c_locale
        assert libc.uselocale(None) == before
    finally:
        libc.uselocale(before)
        libc.freelocale(c_locale)


# -- file and folder modes, whatever the umask ----------------------------------------------------


@pytest.fixture
def fake_compile(monkeypatch):
    """ptx.build with a stand-in for NVRTC (nothing compiled): each architecture's PTX is a line."""
    nvrtc = _fake((13, 0), (75, 80, 90))
    monkeypatch.setattr(ptx, "survey_nvrtc", lambda libraries=None: ([nvrtc], []))

    def compile_arch(arch, chosen=None, extra_options=()):
        names = kernels.all_kernel_names()
        return ptx.CompiledPTX(arch, f".version 9.0\n// sm_{arch}\n",
                               {n: f"_lowered_{i}" for i, n in enumerate(names)}, nvrtc,
                               ptx.compile_options(arch), "")

    monkeypatch.setattr(ptx, "compile_arch", compile_arch)


@contextlib.contextmanager
def _umask(mask):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


@pytest.mark.parametrize("mask", [0o002, 0o077], ids=["umask-002", "umask-077"])
def test_build_gives_created_folders_and_files_explicit_modes(fake_compile, tmp_path, mask):
    """A PTX folder to share is created (with any missing parent) 0755 and its files 0644 whatever
    the umask: under 002 nothing becomes group-writable, under 077 everyone can still read it;
    private (the kernel cache's folder) is 0700 and 0600."""
    out = tmp_path / "a" / "b" / "ptx"
    with _umask(mask):
        ptx.build(str(out), archs=(80, 90))
        ptx.build(str(tmp_path / "private" / "ptx"), archs=(80,), private=True)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", out):
        assert folder.stat().st_mode & 0o777 == 0o755, (folder, oct(folder.stat().st_mode))
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))
    for folder in (tmp_path / "private", tmp_path / "private" / "ptx"):
        assert folder.stat().st_mode & 0o777 == 0o700, (folder, oct(folder.stat().st_mode))
    for path in (tmp_path / "private" / "ptx").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, (path, oct(path.stat().st_mode))
    assert ptx.load_ptx(str(out), 90)[1] and ptx.load_ptx(str(tmp_path / "private" / "ptx"), 80)[1]
