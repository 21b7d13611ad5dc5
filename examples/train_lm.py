"""A character-level language model on text shipped with Python: sru_cupy's SRU and SRU++ vs
PyTorch's LSTM.

Each model is an embedding, a stack of recurrent layers (``sru_cupy.SRU``, ``sru_cupy.SRUpp`` or
``torch.nn.LSTM``, the same hidden size and number of layers) and a linear layer to the next
character's logits. SRU++ layers make U with single-head causal self-attention over the window
(attention width ``--proj``, half the hidden size by default, which gives it about the SRU's size).
All are trained with Adam on the same random windows of the training text, for the same share of
a time budget, then scored on the held-out text. The default corpus needs no download: it is the source
of a fixed list of standard library modules of the running Python (see ``corpus.py``); the last 10%
is held out. ``--data PATH`` trains on a text file instead.

    python examples/train_lm.py                     # SRU, SRU++ and LSTM, about 3 minutes
    python examples/train_lm.py --model srupp --proj 64
    python examples/train_lm.py --model sru --device cuda --precision bf16 --time-budget 60
    python examples/train_lm.py --data book.txt --hidden 512 --layers 3 --steps 2000
    python examples/train_lm.py --short             # a few seconds (what the tests run)

The default sizes (hidden 256, windows of 128 characters x 32) suit a small CPU; on a GPU they
leave it mostly idle, so compare there with larger ones, e.g. ``--hidden 1024 --batch 128``.

At the end it prints a table: model, parameters, optimizer steps done, training bits per
character (first step -> mean of the last steps), held-out bits per character, training
throughput in characters per second (excluding the held-out scoring), and the device. The
uniform baseline is log2(vocabulary size) bits. The exit status is 1 when a model diverged (a
non-finite loss), else 0. Throughput on a CPU shared with other busy processes varies a lot
between runs (OpenMP threads wait for each other); compare runs made on an otherwise idle
machine.

``--device auto`` takes CUDA when PyTorch sees a GPU, else the CPU. On CUDA, sru_cupy needs CuPy
(``pip install sru_cupy[cuda12]`` or ``[cuda13]``). ``--precision bf16|fp16`` trains under
autocast (fp16 with a gradient scaler, CUDA only); on the CPU only bf16 is offered.
"""

import argparse
import contextlib
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402  (the sibling module, found through the line above)

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None

MODELS = ("sru", "srupp", "lstm")
LABELS = {"sru": "SRU", "srupp": "SRU++", "lstm": "LSTM"}
CHOICES = {"all": MODELS, "both": ("sru", "lstm"), **{kind: (kind,) for kind in MODELS}}
LN2 = math.log(2.0)


# -- options ---------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Character-level LM: sru_cupy.SRU and SRUpp vs torch.nn.LSTM on text shipped "
                    "with Python.")
    p.add_argument("--data", metavar="PATH", help="a UTF-8 text file to train on instead of the "
                   "standard library sources")
    p.add_argument("--model", choices=tuple(CHOICES), default="all",
                   help="all (the default): SRU, SRU++ and LSTM; both: SRU and LSTM")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size, also the embedding size (default: 256, 128 with --short)")
    p.add_argument("--layers", type=int, default=2, help="recurrent layers (default: 2)")
    p.add_argument("--proj", type=int, default=None,
                   help="SRU++ attention width (default: half the hidden size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="characters per training window (default: 128, 64 with --short)")
    p.add_argument("--batch", type=int, default=None,
                   help="windows per step (default: 32, 16 with --short)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, decaying linearly "
                   "to a tenth over the run (default: 0.003)")
    p.add_argument("--steps", type=int, default=None,
                   help="stop each model after this many steps (default: only the time budget)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="training time for all models together, split evenly between them "
                   "(default: 150, or 90 with --short)")
    p.add_argument("--eval-chars", type=int, default=None,
                   help="score at most this many held-out characters (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (the default): cuda if PyTorch sees a GPU, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (the default), or autocast to bf16 or fp16 (fp16 on CUDA only)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--short", action="store_true",
                   help="a few seconds (for tests): hidden 128, windows of 64 x 16, 150 steps "
                   "per model, 16384 held-out characters, the time budget only a cap against a "
                   "stalled machine; options given explicitly win")
    args = p.parse_args(argv)
    presets = (dict(hidden=128, seq_len=64, batch=16, steps=150, eval_chars=16384, time_budget=90.0)
               if args.short else dict(hidden=256, seq_len=128, batch=32, time_budget=150.0))
    for name, value in presets.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.proj is None:
        args.proj = max(1, args.hidden // 2)
    for name in ("hidden", "layers", "proj", "seq_len", "batch", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if args.eval_chars is not None and args.eval_chars < 2:
        p.error(f"--eval-chars: expected at least 2 (an input and a target), got {args.eval_chars}")
    if args.time_budget <= 0:
        p.error("--time-budget: expected a positive number of seconds")
    return args


# -- device and precision (also used by classify.py) -----------------------------------------------

def pick_device(name: str) -> torch.device:
    """'auto' -> cuda if PyTorch sees a GPU, else cpu; 'cuda' fails clearly when there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no CUDA device (a CPU-only build, or no GPU)")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def check_precision(device: torch.device, precision: str):
    """Exits with a message for a precision the device cannot autocast to."""
    if device.type == "cpu" and precision == "fp16":
        sys.exit("--precision fp16: autocast to float16 is for CUDA; use bf16 on the CPU")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        sys.exit("--precision bf16: this GPU has no bfloat16 support; use fp16")


def check_sru_backend(device: torch.device):
    """On CUDA, sru_cupy runs its kernels through CuPy: say how to get it if it is missing."""
    if device.type == "cuda" and importlib.util.find_spec("cupy") is None:
        sys.exit("sru_cupy on CUDA needs CuPy: pip install 'sru_cupy[cuda12]' (or [cuda13]), "
                 "or run with --model lstm / --device cpu")


def autocast(device: torch.device, precision: str):
    """The autocast context for the chosen precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    """A GradScaler for fp16 (whose small range needs loss scaling), else None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class CausalSRUpp(nn.Module):
    """sru_cupy.SRUpp for a language model: forward(x (L, B, n), c0) -> (h, c), each step
    attending to itself and the earlier steps of the window only (a causal attn_mask)."""

    def __init__(self, input_size: int, hidden: int, layers: int, proj: int):
        super().__init__()
        from sru_cupy import SRUpp
        self.srupp = SRUpp(input_size, hidden, proj, num_layers=layers)

    def forward(self, x, c0=None):
        mask = self.srupp.causal_attn_mask(x.shape[0], device=x.device)
        h, c, _ = self.srupp(x, c0, attn_mask=mask)
        return h, c


def make_rnn(kind: str, input_size: int, hidden: int, layers: int, proj: int = 0) -> nn.Module:
    """sru_cupy.SRU, sru_cupy.SRUpp (causal; attention width ``proj``, default hidden / 2) or
    torch.nn.LSTM, time-major (L, B, n) input; each returns (h, state)."""
    if kind == "sru":
        from sru_cupy import SRU
        return SRU(input_size, hidden, num_layers=layers)
    if kind == "srupp":
        return CausalSRUpp(input_size, hidden, layers, proj or max(1, hidden // 2))
    return nn.LSTM(input_size, hidden, num_layers=layers)


# -- the model -------------------------------------------------------------------------------------

class CharLM(nn.Module):
    """Embedding -> SRU, SRU++ or LSTM -> linear; forward(x (L, B), state) -> (logits (L, B, V),
    state).

    ``state`` is what the recurrent layer returns and takes back: c (layers, B, hidden) for the SRU
    and SRU++, (h, c) for the LSTM; None starts from zeros. (SRU++ carries c from one window to
    the next but attends within the window only, as in training.)
    """

    def __init__(self, kind: str, vocab_size: int, hidden: int, layers: int, proj: int = 0):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab_size, hidden)
        self.rnn = make_rnn(kind, hidden, hidden, layers, proj)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x, state=None):
        h, state = self.rnn(self.embed(x), state)
        return self.out(h), state


def bits_per_char(logits, targets, reduction="mean"):
    """Cross-entropy in bits (computed in float32 whatever the autocast type)."""
    nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction=reduction)
    return nats / LN2


# -- data ------------------------------------------------------------------------------------------

class WindowSampler:
    """Random training windows: (inputs (L, B), targets (L, B)), the targets shifted by one.

    Offsets come from a private seeded generator, so every model sees the same batches.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch: int, seed: int,
                 device: torch.device):
        if len(data) < seq_len + 2:
            raise ValueError(f"training text of {len(data)} characters is shorter than one window "
                             f"({seq_len + 1}); lower --seq-len")
        self.data = data.to(device)
        self.seq_len, self.batch = seq_len, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = torch.arange(seq_len + 1).unsqueeze(1).to(device)

    def sample(self):
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (1, self.batch),
                               generator=self.generator).to(self.data.device)
        window = self.data[starts + self.steps]  # (L + 1, B)
        return window[:-1], window[1:]


# -- training and evaluation -----------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    chars: int = 0
    first_bpc: float = float("nan")
    last_bpc: float = float("nan")
    diverged: bool = False
    history: List[float] = field(default_factory=list)

    @property
    def chars_per_second(self) -> float:
        return self.chars / self.seconds if self.seconds > 0 else float("nan")


def learning_rate(base: float, progress: float, warmup_progress: float = 0.02) -> float:
    """A short linear warm-up, then a linear decay to a tenth of ``base`` at progress 1."""
    if progress < warmup_progress:
        return base * max(progress / warmup_progress, 0.05)
    return base * (1.0 - 0.9 * min(progress, 1.0))


def training_step(model, optimizer, scaler, inputs, targets, device, precision):
    """One optimizer step; returns the batch loss in bits per character (a device tensor)."""
    with autocast(device, precision):
        logits, _ = model(inputs)
    loss = bits_per_char(logits, targets)
    optimize(model, optimizer, scaler, loss)
    return loss.detach()


def optimize(model, optimizer, scaler, loss, max_norm=1.0):
    """Backward of ``loss``, gradient clipping and an optimizer step (through the GradScaler when
    one is given)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()


def warm_up(model, sampler, device, precision):
    """One untimed forward and backward: compiles sru_cupy's kernels on first use, allocates."""
    inputs, targets = sampler.sample()
    with autocast(device, precision):
        logits, _ = model(inputs[:8, :2])
    bits_per_char(logits, targets[:8, :2]).backward()
    model.zero_grad(set_to_none=True)
    synchronize(device)


def progress_bar(label: str):
    """A tqdm bar over 0..1000 (per mille of the step or time limit), or None without tqdm."""
    if tqdm is None:
        return None
    return tqdm(total=1000, desc=f"{label:>4}", leave=True, dynamic_ncols=True, mininterval=0.5,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
                disable=None)  # None: no bar when stderr is not a terminal (logs, tests)


def train(model, sampler, args, device, budget: float, label: str) -> TrainResult:
    """Trains until ``args.steps`` steps or ``budget`` seconds, whichever comes first."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = grad_scaler(device, args.precision)
    model.train()
    warm_up(model, sampler, device, args.precision)
    result = TrainResult()
    bar = progress_bar(label)
    # Reading the loss synchronizes the GPU: do it every 10 steps there, every step on the CPU.
    read_every = 1 if device.type == "cpu" else 10
    pending = []
    start = time.perf_counter()
    progress = 0.0
    while progress < 1.0:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, progress)
        inputs, targets = sampler.sample()
        pending.append(training_step(model, optimizer, scaler, inputs, targets, device,
                                     args.precision))
        result.steps += 1
        elapsed = time.perf_counter() - start
        progress = max(elapsed / budget, result.steps / args.steps if args.steps else 0.0)
        if len(pending) >= read_every or progress >= 1.0:
            result.history.extend(torch.stack(pending).tolist())
            pending.clear()
            if not math.isfinite(result.history[-1]):
                result.diverged = True
                break
            if bar is not None:
                chars_per_second = result.steps * sampler.seq_len * sampler.batch / elapsed
                bar.n = min(int(progress * 1000), 1000)
                bar.set_postfix_str(f"step {result.steps}, {result.history[-1]:.2f} bpc, "
                                    f"{chars_per_second:,.0f} chars/s", refresh=True)
    synchronize(device)
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    result.history.extend(torch.stack(pending).tolist() if pending else [])
    result.chars = result.steps * sampler.seq_len * sampler.batch
    result.first_bpc = result.history[0]
    tail = result.history[-max(1, min(50, len(result.history) // 5)):]
    result.last_bpc = sum(tail) / len(tail)
    result.diverged = result.diverged or not all(math.isfinite(v) for v in tail)
    return result


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, device: torch.device, precision: str,
             streams: int = 32) -> float:
    """Held-out bits per character.

    The text is cut into ``streams`` contiguous pieces read side by side, ``seq_len`` characters at
    a time, carrying the recurrent state from one chunk to the next (as a model reading the text
    from the start of its piece would).
    """
    model.eval()
    streams = max(1, min(streams, (len(data) - 1) // max(seq_len, 1)))
    length = (len(data) - 1) // streams
    columns = data[:streams * length + 1].to(device)
    inputs = columns[:-1].view(streams, length).t()
    targets = columns[1:].view(streams, length).t()
    state, total_bits = None, 0.0
    for t in range(0, length, seq_len):
        with autocast(device, precision):
            logits, state = model(inputs[t:t + seq_len], state)
        total_bits += float(bits_per_char(logits, targets[t:t + seq_len], reduction="sum"))
    model.train()
    return total_bits / (streams * length)


# -- one model, all models, the table --------------------------------------------------------------

@dataclass
class Row:
    label: str
    params: int
    result: TrainResult
    held_out_bpc: float
    device: str


def run_model(kind: str, vocab_size: int, train_ids, held_out_ids, args, device,
              budget: float) -> Row:
    label = LABELS[kind]
    torch.manual_seed(args.seed)  # the same embedding and output initialisation for both
    model = CharLM(kind, vocab_size, args.hidden, args.layers, args.proj).to(device)
    params = count_parameters(model)
    limit = f"{args.steps} steps or {budget:.0f} s" if args.steps else f"{budget:.0f} s"
    width = f" (attention {args.proj})" if kind == "srupp" else ""
    print(f"{label}: {args.layers} layers x {args.hidden}{width}, {params:,} parameters; training "
          f"for {limit}", flush=True)
    sampler = WindowSampler(train_ids, args.seq_len, args.batch, args.seed, device)
    result = train(model, sampler, args, device, budget, label)
    held_out_bpc = float("nan")
    if not result.diverged:
        held_out_bpc = evaluate(model, held_out_ids, args.seq_len, device, args.precision)
        result.diverged = not math.isfinite(held_out_bpc)
    print(f"{label}: {result.steps} steps in {result.seconds:.1f} s, train {result.first_bpc:.2f}"
          f" -> {result.last_bpc:.2f} bpc, held-out {held_out_bpc:.3f} bpc"
          f"{'  DIVERGED' if result.diverged else ''}", flush=True)
    return Row(label, params, result, held_out_bpc, device.type)


def format_table(rows: List[Row], vocab_size: int) -> str:
    header = (f"{'model':<6}{'params':>11}{'steps':>8}{'train bpc':>18}{'held-out bpc':>14}"
              f"{'chars/s':>11}  device")
    lines = [header, "-" * len(header)]
    for row in rows:
        r = row.result
        train_bpc = f"{r.first_bpc:.2f} -> {r.last_bpc:.2f}"
        held_out = "diverged" if r.diverged else f"{row.held_out_bpc:.3f}"
        lines.append(f"{row.label:<6}{row.params:>11,}{r.steps:>8}{train_bpc:>18}{held_out:>14}"
                     f"{r.chars_per_second:>11,.0f}  {row.device}")
    lines.append(f"uniform baseline: log2({vocab_size}) = {math.log2(vocab_size):.3f} bpc")
    base = rows[-1]
    others = [row for row in rows[:-1] if math.isfinite(row.result.chars_per_second)]
    if others and math.isfinite(base.result.chars_per_second):
        speed = base.result.chars_per_second
        ratios = ", ".join(f"{row.label} {row.result.chars_per_second / speed:.2f}x"
                           for row in others)
        lines.append(f"training throughput / {base.label}: {ratios}")
    return "\n".join(lines)


def load_corpus(args):
    try:
        text, description = corpus.file_corpus(args.data) if args.data else corpus.stdlib_corpus()
    except (OSError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")
    vocab = corpus.Vocabulary(text)
    train_ids, held_out_ids = corpus.split(vocab.encode(text), held_out_fraction=0.1)
    if args.eval_chars:
        held_out_ids = held_out_ids[:args.eval_chars]
    print(f"corpus: {description}")
    print(f"        {len(text):,} characters, {vocab.size} distinct; training on the first "
          f"{len(train_ids):,}, scoring {len(held_out_ids):,} held-out characters from the last "
          f"10%")
    return vocab, train_ids, held_out_ids


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    check_precision(device, args.precision)
    kinds = CHOICES[args.model]
    if "sru" in kinds or "srupp" in kinds:
        check_sru_backend(device)
    vocab, train_ids, held_out_ids = load_corpus(args)
    budget = args.time_budget / len(kinds)
    print(f"device: {describe_device(device)}, precision {args.precision}, seed {args.seed}; "
          f"hidden {args.hidden}, {args.layers} layers, windows of {args.seq_len} x {args.batch}",
          flush=True)
    rows = [run_model(kind, vocab.size, train_ids, held_out_ids, args, device, budget)
            for kind in kinds]
    print()
    print(format_table(rows, vocab.size))
    if any(row.result.diverged for row in rows):
        print("error: training diverged (a non-finite loss)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
