"""The command line (sru_cupy.__main__): commands, help, and how failures reach the user (exit code
1 with ``python -m sru_cupy COMMAND: error: ...``, 2 for argparse errors). The commands' own work
is tested with their modules: compile in test_ptx, clear-cache in test_cache, bench in test_bench,
info in test_info."""

import subprocess
import sys

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
