"""benchmarks/per_call_trees.py: two trees side by side in alternating fresh processes, a table
of medians and ratios; a folder without the package is refused, naming it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from child_env import child_env

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "per_call_trees.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env=child_env(), cwd=ROOT)


def test_same_tree_twice_prints_every_function_with_its_ratio():
    done = _run(str(ROOT), str(ROOT), "--processes", "1", "--rounds", "1", "--calls", "2")
    assert done.returncode == 0, done.stderr
    processes = re.findall(r"^process (\d) (before|after): (.*)$", done.stdout, re.M)
    assert [(p, label) for p, label, _ in processes] == [("1", "before"), ("1", "after")]
    rows = dict((m.group(1), m.groups()[1:]) for m in re.finditer(
        r"^(\w+) +([\d.]+) +([\d.]+) +([\d.]+)$", done.stdout, re.M))
    assert list(rows) == ["forward", "step", "op", "lstm_forward", "lstm_step"]
    for name, (before, after, ratio) in rows.items():
        assert float(before) > 0 and float(after) > 0, name
        assert float(ratio) == pytest.approx(float(after) / float(before), abs=0.006), name


def test_folder_without_the_package_is_refused(tmp_path):
    done = _run(str(tmp_path), str(ROOT))
    assert done.returncode == 2
    assert f"before: expected a folder holding sru_cupy/__init__.py, got {tmp_path}" in done.stderr
