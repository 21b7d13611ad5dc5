"""Data-parallel training of a small ``sru_cupy.SRU`` with DistributedDataParallel on the CPU.

Two processes (the gloo backend, no GPU needed) train an SRU classifier on a synthetic sequence
task: is the running sum of the first input channel positive at the end of the sequence? Each rank
draws its own batches; DDP averages the gradients, so after every backward all ranks hold the same
gradients and take the same optimizer step.

Run it with torchrun (it reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT):

    torchrun --nproc_per_node 2 examples/ddp_train.py --steps 20 --check-grads

or directly; it then starts its workers itself with torch.multiprocessing.spawn:

    python examples/ddp_train.py --nproc 2 --steps 20 --check-grads

With --check-grads every rank, after backward, gathers all ranks' flattened gradients and
checks that they agree to 1e-6; the script exits non-zero if they do not. Rank 0 prints the loss
of each step. --no-sync skips DDP's gradient averaging (model.no_sync()), which makes the ranks
disagree: it exists to show that --check-grads catches that.
"""

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sru_cupy import SRU

GRAD_TOLERANCE = 1e-6


class GradientMismatch(RuntimeError):
    pass


class Classifier(nn.Module):
    def __init__(self, input_size=4, hidden_size=16, num_layers=2):
        super().__init__()
        self.rnn = SRU(input_size, hidden_size, num_layers=num_layers, bidirectional=True,
                       layer_norm=True, batch_first=True)
        self.head = nn.Linear(2 * hidden_size, 1)

    def forward(self, x):                 # x (B, L, input_size)
        h, _ = self.rnn(x)                # h (B, L, 2 * hidden_size)
        return self.head(h[:, -1]).squeeze(-1)


def make_batch(generator, batch_size, length, input_size):
    x = torch.randn(batch_size, length, input_size, generator=generator)
    y = (x[:, :, 0].sum(1) > 0).float()
    return x, y


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def check_gradients(model, rank, world_size, step):
    """All ranks gather every rank's gradients and compare them with rank 0's; all reach the same
    verdict, so on a mismatch all raise together (nobody is left waiting in a collective)."""
    mine = flat_grads(model)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    diff = max((g - gathered[0]).abs().max().item() for g in gathered)
    if diff > GRAD_TOLERANCE:
        raise GradientMismatch(f"step {step}: gradients differ across ranks by {diff:.3e} "
                               f"(tolerance {GRAD_TOLERANCE:g})")
    return diff


def train(rank, world_size, args, store=None):
    """One rank's training. ``store``: the rendezvous store (None: MASTER_ADDR/MASTER_PORT)."""
    dist.init_process_group("gloo", rank=rank, world_size=world_size, store=store)
    try:
        torch.manual_seed(args.seed)      # the same initial weights everywhere (DDP also
        model = Classifier()              # broadcasts rank 0's at construction)
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)
        data = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own data
        loss_fn = nn.BCEWithLogitsLoss()
        losses = []
        for step in range(args.steps):
            x, y = make_batch(data, args.batch_size, args.length, 4)
            optimizer.zero_grad(set_to_none=True)
            if args.no_sync:
                with ddp.no_sync():
                    loss = loss_fn(ddp(x), y)
                    loss.backward()
            else:
                loss = loss_fn(ddp(x), y)
                loss.backward()
            # the mean loss over all ranks, for the report
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss = mean_loss.item() / world_size
            losses.append(mean_loss)
            message = f"step {step} loss {mean_loss:.4f}"
            if args.check_grads:
                diff = check_gradients(model, rank, world_size, step)
                message += f" grads agree across {world_size} ranks (max diff {diff:.1e})"
            if rank == 0:
                print(message, flush=True)
            optimizer.step()
        if rank == 0:
            n = max(1, len(losses) // 4)
            first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
            print(f"done: {args.steps} steps on {world_size} ranks, mean loss of the first "
                  f"{n} steps {first:.4f}, of the last {n} steps {last:.4f}", flush=True)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def _exit_worker():
    """Ends a worker that finished cleanly without running interpreter shutdown. After
    destroy_process_group, a gloo worker thread may still be releasing finished collectives; their
    tensors' Python objects need the GIL, and taking it during shutdown aborts the process
    (std::terminate, seen in about 1 run of 30)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawned(rank, world_size, args, port):
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], port, world_size, is_master=False)
    train(rank, world_size, args, store)
    _exit_worker()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2,
                        help="processes to spawn when not started by torchrun (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-grads", action="store_true",
                        help="after each backward, check that all ranks hold the same gradients")
    parser.add_argument("--no-sync", action="store_true",
                        help="skip DDP's gradient averaging (to see --check-grads fail)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # several processes share the machine
    try:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
            train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
            _exit_worker()
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            port = int(os.environ.get("MASTER_PORT") or free_port())
            # The rendezvous store lives here, as torchrun's does in its agent, and outlives the
            # workers: hosted by rank 0, it went away when rank 0 exited while another rank was
            # still tearing its group down, which could abort that rank.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], port, is_master=True,
                                  wait_for_workers=False)
            mp.spawn(_spawned, args=(args.nproc, args, port), nprocs=args.nproc, join=True)
            del store
    except GradientMismatch as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except mp.ProcessRaisedException as exc:
        reason = str(exc).strip().splitlines()[-1]
        print(f"error: a worker failed: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
