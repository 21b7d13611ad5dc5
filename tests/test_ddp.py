"""examples/ddp_train.py: 2-process DistributedDataParallel training of sru_cupy.SRU on the CPU
(gloo), started by torch.multiprocessing.spawn and by torchrun, in a subprocess with a timeout."""

import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from child_env import child_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ddp_train.py"
TIMEOUT = 90

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


@pytest.fixture(scope="module", autouse=True)
def warm_kernel_cache():
    """Builds the CPU kernels once here, so the worker processes find them in the cache instead
    of each compiling them."""
    from sru_cupy import SRU
    SRU(4, 4)(torch.randn(2, 1, 4))[0].sum().backward()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args):
    env = child_env(OMP_NUM_THREADS=1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def _check_success(result, steps):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = re.findall(r"^step (\d+) loss (\S+) grads agree across 2 ranks", result.stdout,
                       flags=re.M)
    assert [int(s) for s, _ in lines] == list(range(steps)), output  # rank 0 only, each step
    losses = [float(v) for _, v in lines]
    assert all(math.isfinite(v) and v > 0 for v in losses), losses
    done = re.search(r"^done: (\d+) steps on 2 ranks, .* steps (\S+), of the last .* steps (\S+)$",
                     result.stdout, flags=re.M)
    assert done and int(done.group(1)) == steps, output
    return losses, float(done.group(2)), float(done.group(3))


def test_spawn_two_processes_gradients_agree_and_loss_falls():
    steps = 8
    result = _run([str(SCRIPT), "--nproc", "2", "--steps", str(steps), "--check-grads"])
    losses, first, last = _check_success(result, steps)
    assert last < first, losses


def test_torchrun_two_processes():
    steps = 3
    result = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   str(SCRIPT), "--steps", str(steps), "--check-grads"])
    _check_success(result, steps)


def test_gradient_check_fails_without_sync():
    """--no-sync skips DDP's all-reduce: the ranks' gradients differ, the check must say so and
    the script must exit non-zero."""
    result = _run([str(SCRIPT), "--nproc", "2", "--steps", "2", "--check-grads", "--no-sync"])
    assert result.returncode != 0, result.stdout + result.stderr
    assert "gradients differ across ranks" in result.stderr, result.stderr
    assert "grads agree" not in result.stdout
