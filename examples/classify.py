"""Sequence classification: handwritten digits read row by row (or pixel by pixel), SRU vs LSTM.

The data is scikit-learn's bundled ``load_digits`` (1,797 images of 8x8 pixels, ten classes; no
download). Each image becomes a sequence: 8 steps of one 8-pixel row (``--mode row``, the default:
quick) or 64 steps of one pixel (``--mode pixel``: a small "sequential MNIST", harder and eight
times longer; give it a GPU or time, e.g. ``--epochs 30``). A recurrent stack reads the sequence
and a linear layer classifies its last hidden state. The same split (80% train, 20% test,
stratified, fixed by ``--seed``), batches and epochs are used for ``sru_cupy.SRU`` and
``torch.nn.LSTM``.

    pip install scikit-learn
    python examples/classify.py                    # both models, row by row, 10 epochs
    python examples/classify.py --mode pixel --epochs 30 --device cuda
    python examples/classify.py --short            # a few seconds (what the tests run)

Prints a table: model, parameters, epochs, test accuracy, training time and sequences per second.
Chance is 10%. The exit status is 1 when a model diverged (a non-finite loss).
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_lm import (autocast, check_precision, check_sru_backend, count_parameters,  # noqa: E402
                      describe_device, grad_scaler, make_rnn, optimize, pick_device,
                      synchronize)

LABELS = {"sru": "SRU", "lstm": "LSTM"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Digits read row by row (or pixel by pixel): sru_cupy.SRU vs torch.nn.LSTM.")
    p.add_argument("--model", choices=("sru", "lstm", "both"), default="both",
                   help="both (the default): SRU, then LSTM")
    p.add_argument("--mode", choices=("row", "pixel"), default="row",
                   help="row (the default): 8 steps of an 8-pixel row; pixel: 64 steps of 1 pixel "
                   "(harder, slower)")
    p.add_argument("--hidden", type=int, default=None, help="default: 128, or 64 with --short")
    p.add_argument("--layers", type=int, default=2, help="recurrent layers (default: 2)")
    p.add_argument("--epochs", type=int, default=None, help="default: 10, or 3 with --short")
    p.add_argument("--batch", type=int, default=32, help="default: 32")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="Adam learning rate, with a cosine decay (default: 0.003)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (the default): cuda if PyTorch sees a GPU, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (the default), or autocast to bf16 or fp16 (fp16 on CUDA only)")
    p.add_argument("--seed", type=int, default=0,
                   help="also fixes the train/test split (default: 0)")
    p.add_argument("--short", action="store_true",
                   help="a few seconds: hidden 64, 3 epochs (for tests); explicit options win")
    args = p.parse_args(argv)
    if args.hidden is None:
        args.hidden = 64 if args.short else 128
    if args.epochs is None:
        args.epochs = 3 if args.short else 10
    for name in ("hidden", "layers", "epochs", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer")
    return args


# -- data ------------------------------------------------------------------------------------------

def load_sequences(mode: str, seed: int):
    """((x_train, y_train), (x_test, y_test)): x (N, L, n) in [0, 1], L x n = 64 x 1 or 8 x 8."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this example needs scikit-learn for its bundled digits: pip install scikit-learn")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8), values 0..16
    x = images.reshape(len(images), 64, 1) if mode == "pixel" else images
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, random_state=seed,
                                           stratify=digits.target)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


# -- the model -------------------------------------------------------------------------------------

class SequenceClassifier(nn.Module):
    """SRU or LSTM over (B, L, n) sequences -> linear layer on the last step's hidden state."""

    def __init__(self, kind: str, input_size: int, hidden: int, layers: int, classes: int = 10):
        super().__init__()
        self.rnn = make_rnn(kind, input_size, hidden, layers)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h, _ = self.rnn(x.transpose(0, 1))  # time-major (L, B, n)
        return self.out(h[-1])


# -- training and evaluation -----------------------------------------------------------------------

@dataclass
class Result:
    label: str
    params: int
    epochs: int
    accuracy: float
    seconds: float
    sequences: int
    diverged: bool
    device: str


def warm_up(model, x, y, device, precision):
    """One untimed forward and backward: compiles sru_cupy's kernels on first use, allocates."""
    with autocast(device, precision):
        logits = model(x.to(device))
    F.cross_entropy(logits.float(), y.to(device)).backward()
    model.zero_grad(set_to_none=True)
    synchronize(device)


def train_epoch(model, optimizer, scheduler, scaler, x, y, batch, generator, device, precision):
    """One pass over the training set in a random order; returns the mean loss."""
    order = torch.randperm(len(y), generator=generator).to(device)
    total = 0.0
    for i in range(0, len(y), batch):
        idx = order[i:i + batch]
        inputs, targets = x[idx], y[idx]
        with autocast(device, precision):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        optimize(model, optimizer, scaler, loss)
        scheduler.step()
        total += float(loss.detach()) * len(idx)
    return total / len(y)


@torch.no_grad()
def accuracy(model, x, y, device, precision, batch=256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        with autocast(device, precision):
            logits = model(x[i:i + batch].to(device))
        correct += int((logits.argmax(-1) == y[i:i + batch].to(device)).sum())
    model.train()
    return correct / len(y)


def run_model(kind, train_set, test_set, args, device) -> Result:
    (x_train, y_train), (x_test, y_test) = train_set, test_set
    x_train, y_train = x_train.to(device), y_train.to(device)  # small: all on the device at once
    label = LABELS[kind]
    torch.manual_seed(args.seed)
    model = SequenceClassifier(kind, x_train.shape[-1], args.hidden, args.layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(y_train) / args.batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    scaler = grad_scaler(device, args.precision)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    warm_up(model, x_train[:4], y_train[:4], device, args.precision)
    start = time.perf_counter()
    diverged = False
    for epoch in range(1, args.epochs + 1):
        loss = train_epoch(model, optimizer, scheduler, scaler, x_train, y_train, args.batch,
                           generator, device, args.precision)
        print(f"{label:>4} epoch {epoch:>2}: loss {loss:.3f}", flush=True)
        if not math.isfinite(loss):
            diverged = True
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    acc = float("nan") if diverged else accuracy(model, x_test, y_test, device, args.precision)
    return Result(label, count_parameters(model), epoch, acc, seconds, epoch * len(y_train),
                  diverged, device.type)


def format_table(results) -> str:
    header = (f"{'model':<6}{'params':>10}{'epochs':>8}{'test accuracy':>15}{'train time':>12}"
              f"{'seq/s':>9}  device")
    lines = [header, "-" * len(header)]
    for r in results:
        acc = "diverged" if r.diverged else f"{100 * r.accuracy:.1f}%"
        lines.append(f"{r.label:<6}{r.params:>10,}{r.epochs:>8}{acc:>15}{r.seconds:>11.1f}s"
                     f"{r.sequences / r.seconds:>9,.0f}  {r.device}")
    lines.append("chance: 10.0%")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    check_precision(device, args.precision)
    kinds = ("sru", "lstm") if args.model == "both" else (args.model,)
    if "sru" in kinds:
        check_sru_backend(device)
    train_set, test_set = load_sequences(args.mode, args.seed)
    steps, width = train_set[0].shape[1:]
    print(f"digits: {len(train_set[1])} train / {len(test_set[1])} test images, read as "
          f"{steps} steps of {width} pixel{'s' if width > 1 else ''}")
    print(f"device: {describe_device(device)}, precision {args.precision}, seed {args.seed}; "
          f"hidden {args.hidden}, {args.layers} layers, batch {args.batch}", flush=True)
    results = [run_model(kind, train_set, test_set, args, device) for kind in kinds]
    print()
    print(format_table(results))
    return 1 if any(r.diverged for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
