"""The command line (sru_cupy.__main__): commands, help, and how failures reach the user (exit code
1 with ``python -m sru_cupy COMMAND: error: ...``, 2 for argparse errors). The commands' own work
is tested with their modules: compile in test_ptx, clear-cache in test_cache, bench in test_bench,
info in test_info; here also compile's folder modes in the kernel cache and the cache command."""

import json
import os
import subprocess
import sys
import time
import warnings

import pytest

from sru_cupy.__main__ import COMMANDS, main

from child_env import child_env


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert COMMANDS[name].help in capsys.readouterr().out


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    for name in COMMANDS:
        assert name in err


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_info_prints_the_report(capsys):
    from sru_cupy import info
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == info.report()[0]
    assert "Backends:" in out


@pytest.mark.parametrize("args,message", [
    (["--config", "L1-B1-d1"], "configs: expected names among"),
    (["--dtype", "int8"], "dtypes: expected names among"),
    (["--device", "tpu"], "device: expected auto, cpu or cuda[:N], got 'tpu'"),
    (["--repeats", "0"], "--repeats must be >= 1 and --warmup >= 0, got 0, 5"),
], ids=["config", "dtype", "device", "repeats"])
def test_bench_argument_errors_exit_1_with_the_reason(capsys, tmp_path, args, message):
    pytest.importorskip("torch", reason="bench needs torch to check its device")
    assert main(["bench", "--out", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m sru_cupy bench: error: ") and message in err, err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_help_does_not_import_heavy_modules():
    """``--help`` and importing the command line stay fast: no torch, CuPy or kernels loaded."""
    code = ("import sys; from sru_cupy.__main__ import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'cupy', 'sru_cupy.ops', 'sru_cupy.backends.host') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- compile into the cache, and the cache command -------------------------------------------------


def test_compile_under_umask_002_leaves_a_cache_that_later_runs_accept(tmp_path, monkeypatch,
                                                                       capsys):
    """`compile` with no --out writes into the kernel cache: under umask 002 it must still create
    every level 0700 (a group-writable folder would be refused by every later run, forever)."""
    from sru_cupy import cache, kernels, ptx
    nvrtc = ptx.NVRTC("/fake/libnvrtc.so.13", (13, 0), (80, 90))
    monkeypatch.setattr(ptx, "survey_nvrtc", lambda libraries=None: ([nvrtc], []))
    monkeypatch.setattr(ptx, "compile_arch", lambda arch, chosen=None, extra_options=(): (
        ptx.CompiledPTX(arch, ".version 9.0\n", {n: "_l" for n in kernels.all_kernel_names()},
                        nvrtc, ptx.compile_options(arch), "")))
    root = tmp_path / "home" / ".cache" / "sru_cupy"
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(root))
    before = os.umask(0o002)
    try:
        assert main(["compile", "--arch", "sm_80", "--no-ptxas"]) == 0
    finally:
        os.umask(before)
    for folder in (tmp_path / "home", tmp_path / "home" / ".cache", root, root / "ptx"):
        assert folder.stat().st_mode & 0o777 == 0o700, (folder, oct(folder.stat().st_mode))
    for path in (root / "ptx").iterdir():
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    assert cache.unsafe_reason(str(root)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused cache warns
        assert cache.cache_dir("host") == str(root / "host")
    assert str(root / "ptx") in capsys.readouterr().out


def _entry_files(root, source_hash, stem="sru_host_" + "0" * 24, age=0):
    """A host library and its record for ``source_hash``, last changed ``age`` seconds ago."""
    host = root / "host"
    host.mkdir(parents=True, exist_ok=True, mode=0o700)
    (host / f"{stem}.so").write_bytes(b"\0" * 300_000)
    (host / f"{stem}.json").write_text(json.dumps({"key": "k", "sha256": "s",
                                                   "source_hash": source_hash}))
    for path in (host / f"{stem}.so", host / f"{stem}.json"):
        os.utime(path, (time.time() - age, time.time() - age))
    return host / f"{stem}.so"


def test_cache_command_lists_clears_and_prunes(tmp_path, monkeypatch, capsys):
    from sru_cupy import cache, kernels
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("SRU_CUPY_CACHE_DIR", str(root))
    current = _entry_files(root, kernels.source_hash(), "sru_host_" + "1" * 24, age=7200)
    old = _entry_files(root, "another source version", "sru_host_" + "2" * 24, age=3 * 86400)
    stale = root / "host" / ".tmp-xyzsru_host_3.so"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - cache.STALE_SECONDS - 60,) * 2)
    unheld = root / "host" / ("sru_host_" + "4" * 24 + ".so.lock")
    unheld.write_text("")
    held = root / "host" / ("sru_host_" + "1" * 24 + ".so.lock")
    with cache.build_lock(str(current)):  # a build running now: its lock is kept
        assert main(["cache"]) == 0
        listing = capsys.readouterr().out
        assert listing.startswith(f"{root}: ")
        lines = {line.split()[0]: line for line in listing.splitlines()[1:]}
        assert "host library, 0.3 MB, 2 h old, current kernels" in lines[f"host/{current.stem}"]
        assert "3 d old, other kernel sources" in lines[f"host/{old.stem}"]
        assert "temporary file" in lines[f"host/{stale.name}"]

        assert main(["cache", "--prune"]) == 0
        pruned = capsys.readouterr().out
        assert f"removed host/{old.stem} (host library" in pruned, pruned
        assert not old.exists() and not old.with_suffix(".json").exists()
        assert not stale.exists() and not unheld.exists(), pruned
        assert current.exists() and held.exists()

    assert main(["cache", "--clear"]) == 0
    assert f"removed 3 files from {root}" in capsys.readouterr().out  # library, record, lock
    assert list(root.iterdir()) == []
    assert main(["clear-cache"]) == 0  # the old spelling still works
