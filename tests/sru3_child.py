"""Running ``sru`` 3.0.0.dev6 (the oracle of SRU++ and of 3.0's SRU checkpoints) in a child
process: it cannot be imported beside the ``sru`` 2.6 of the test extra, so it lives in a folder
of its own (``make venv`` puts it in ``.venv/sru3``; otherwise the first use installs it there with
pip) and runs one of the oracle scripts (srupp_oracle.py, sru3_oracle.py) from there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from child_env import REPO, child_env

SRU3_VERSION = "3.0.0.dev6"
ORACLE_TIMEOUT_S = 900


def _is_sru3(folder):
    version = Path(folder) / "sru" / "version.py"
    return version.is_file() and SRU3_VERSION in version.read_text()


def sru3_folder():
    """The folder holding sru 3.0.0.dev6: $SRU_CUPY_SRU3_DIR, <venv>/sru3 (make venv) or
    .venv/sru3 in the checkout; installed into the last with pip when none has it."""
    candidates = [os.environ.get("SRU_CUPY_SRU3_DIR"), os.path.join(sys.prefix, "sru3"),
                  str(REPO / ".venv" / "sru3")]
    for folder in candidates:
        if folder and _is_sru3(folder):
            return folder
    target = REPO / ".venv" / "sru3"
    partial = target.with_name(f"sru3.partial-{os.getpid()}")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
               str(partial), "--pre", f"sru=={SRU3_VERSION}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        result = None
    if result is None or result.returncode != 0 or not _is_sru3(partial):
        why = "timed out" if result is None else (result.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the parity oracle sru {SRU3_VERSION} is not installed and pip could "
                    f"not install it ({why}); run make venv, or pip install --no-deps --target "
                    f".venv/sru3 --pre sru=={SRU3_VERSION}")
    try:
        os.replace(partial, target)  # atomic; another process may have won the race
    except OSError:
        pass
    return str(target) if _is_sru3(target) else str(partial)


def run_oracle(script, configs, work):
    """Runs ``script`` (``python script SRU3_DIR CONFIGS.json OUT.pt``) with sru 3.0 on
    ``configs`` in the folder ``work``; returns what it saved."""
    folder = sru3_folder()
    work = Path(work)
    (work / "configs.json").write_text(json.dumps(configs))
    bin_dir = os.path.dirname(sys.executable)  # ninja, which sru's JIT extension build needs
    env = child_env(TORCH_EXTENSIONS_DIR=os.path.join(folder, "torch_extensions"),
                    PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    result = subprocess.run([sys.executable, str(script), folder, str(work / "configs.json"),
                             str(work / "out.pt")], capture_output=True, text=True, env=env,
                            timeout=ORACLE_TIMEOUT_S)
    assert result.returncode == 0, f"the sru {SRU3_VERSION} oracle failed:\n{result.stderr}"
    return torch.load(work / "out.pt", weights_only=True)
