"""Train an SRU in pure array code (NumPy on the CPU, CuPy on the GPU) with Adam written in arrays.

Task: a stream of +1/-1 inputs; at every step predict whether more +1 than -1 have been seen so far
(the sign of the running sum, "running majority"). A model without memory is at chance (~50%); the
SRU has to integrate its input over the whole sequence, which its forget gate (c_t = f c_{t-1} +
(1 - f) u_t) learns to do.

    python examples/cupy_train.py --device cpu --short     # < 30 s on 2 cores, checks it learned
    python examples/cupy_train.py --device cuda --steps 2000

Nothing here imports torch: the model is ``sru_cupy.arrays.SRU`` (GEMMs with xp.matmul, recurrence
through the sru_cupy kernels), the read-out, the loss and the optimiser are a few lines of arrays.
Exits with status 1 when the final loss is not at most a quarter of the initial one or the accuracy
is under 90%.
"""

import argparse
import os
import sys
import time

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _limit_cpu_threads(argv):
    """Applies --cpu-threads (default 1) to the BLAS and OpenMP thread counts. These are read when
    NumPy's BLAS and the host kernels load, so this runs before NumPy is imported. For a model this
    small, thread start-up and hand-off cost more than they bring (several times slower on 2 busy
    cores). --cpu-threads 0 leaves the environment alone; without the option a value already in
    the environment is kept."""
    threads, explicit = "1", False
    for i, arg in enumerate(argv):
        if arg == "--cpu-threads" and i + 1 < len(argv):
            threads, explicit = argv[i + 1], True
        elif arg.startswith("--cpu-threads="):
            threads, explicit = arg.split("=", 1)[1], True
    if threads.strip() == "0":
        return
    for name in _THREAD_VARIABLES:
        if explicit:
            os.environ[name] = threads
        else:
            os.environ.setdefault(name, threads)


if __name__ == "__main__":
    _limit_cpu_threads(sys.argv[1:])

import numpy as np  # noqa: E402  (after the thread limits)


def make_batch(xp, rng, length, batch):
    """-> x (L, B, 2) one-hot of the +1/-1 symbol, y (L, B) 1.0 where the running sum is > 0."""
    signs = xp.where(rng.random(size=(length, batch)) < 0.5, -1.0, 1.0)
    x = xp.stack([signs > 0, signs < 0], axis=-1).astype(xp.float32)
    y = (xp.cumsum(signs, axis=0) > 0).astype(xp.float32)
    return x, y


class Readout:
    """logits = h W + b, one logit per step; binary cross-entropy with logits."""

    def __init__(self, xp, features, rng):
        bound = 1.0 / np.sqrt(features)
        self.params = {"readout.weight": xp.asarray(
            rng.uniform(-bound, bound, size=(features, 1)).astype(np.float32)),
            "readout.bias": xp.zeros((1,), dtype=xp.float32)}
        self.xp = xp

    def loss(self, h, y):
        """-> (mean BCE loss (0-d array), accuracy (0-d array), grad_h, grads)."""
        xp = self.xp
        z = xp.matmul(h, self.params["readout.weight"])[..., 0] + self.params["readout.bias"][0]
        loss = (xp.logaddexp(0.0, z) - y * z).mean()  # softplus(z) - y z
        accuracy = ((z > 0) == (y > 0.5)).astype(xp.float32).mean()
        grad_z = (1.0 / (1.0 + xp.exp(-z)) - y) / z.size
        grads = {"readout.weight": xp.matmul(h.reshape(-1, h.shape[-1]).T,
                                             grad_z.reshape(-1, 1)),
                 "readout.bias": grad_z.sum(keepdims=True).reshape(1)}
        grad_h = grad_z[..., None] * self.params["readout.weight"][:, 0]
        return loss, accuracy, grad_h, grads


class Adam:
    """Adam with global gradient-norm clipping, updating the parameter arrays in place."""

    def __init__(self, xp, params, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, clip=1.0):
        self.xp, self.params, self.lr = xp, params, lr
        self.betas, self.eps, self.clip = betas, eps, clip
        self.m = {k: xp.zeros_like(v) for k, v in params.items()}
        self.v = {k: xp.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads):
        xp = self.xp
        self.t += 1
        norm = xp.sqrt(sum((g * g).sum() for g in grads.values()))
        scale = xp.minimum(1.0, self.clip / (norm + 1e-12))
        b1, b2 = self.betas
        correction1, correction2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for name, g in grads.items():
            g = g * scale
            self.m[name] *= b1
            self.m[name] += (1 - b1) * g
            self.v[name] *= b2
            self.v[name] += (1 - b2) * g * g
            update = (self.m[name] / correction1) / (xp.sqrt(self.v[name] / correction2) + self.eps)
            self.params[name] -= (self.lr * update).astype(self.params[name].dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (NumPy) or cuda / cuda:N (CuPy)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500, "
                        "150 with --short)")
    parser.add_argument("--short", action="store_true", help="small and quick (< 30 s on 2 CPU "
                        "cores); checks that the model learned")
    parser.add_argument("--length", type=int, default=None, help="sequence length")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="BLAS and OpenMP threads on the CPU (default 1, or the environment's "
                        "OMP_NUM_THREADS; 0 leaves the environment alone); applied at start-up")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (150 if args.short else 1500)
    length = args.length if args.length is not None else (20 if args.short else 40)
    hidden = args.hidden if args.hidden is not None else (32 if args.short else 128)

    from sru_cupy.arrays import SRU

    model = SRU(2, hidden, num_layers=args.layers, dropout=args.dropout, device=args.device,
                seed=args.seed)
    xp = model.xp
    with model.device_guard():
        rng = xp.random.default_rng(args.seed + 1)
        readout = Readout(xp, model.output_size, np.random.default_rng(args.seed + 2))
        # The trainable arrays themselves (not scale_x): Adam updates them in place.
        params = {**{k: model.params[k] for k in model.trainable_names()}, **readout.params}
        optimizer = Adam(xp, params, lr=args.lr)
        x_eval, y_eval = make_batch(xp, rng, length, 256)

        def evaluate():
            h, _, _ = model.forward(x_eval, training=False, keep_cache=False)
            loss, accuracy, _, _ = readout.loss(h, y_eval)
            return float(loss), float(accuracy)

        initial_loss, initial_accuracy = evaluate()
        print(f"device {model.device}, SRU(2, {hidden}, num_layers={args.layers}), length {length},"
              f" batch {args.batch}, {steps} steps")
        print(f"initial: loss {initial_loss:.4f} accuracy {initial_accuracy:.3f}")
        start = time.perf_counter()
        for step in range(1, steps + 1):
            x, y = make_batch(xp, rng, length, args.batch)
            h, _, cache = model.forward(x, training=True)
            loss, accuracy, grad_h, grads = readout.loss(h, y)
            _, _, model_grads = model.backward(cache, grad_h)
            grads.update(model_grads)
            optimizer.step(grads)
            if step % max(1, steps // 10) == 0 or step == steps:
                print(f"step {step:5d}: train loss {float(loss):.4f} accuracy {float(accuracy):.3f}"
                      f" ({time.perf_counter() - start:.1f} s)")
        final_loss, final_accuracy = evaluate()
    print(f"final: loss {final_loss:.4f} accuracy {final_accuracy:.3f} "
          f"(initial loss {initial_loss:.4f}, accuracy {initial_accuracy:.3f}; "
          f"loss ratio {initial_loss / max(final_loss, 1e-12):.1f}x)")
    learned = final_loss <= initial_loss / 4 and final_accuracy >= 0.9
    print("learned: yes" if learned else "learned: NO (loss did not fall 4x or accuracy < 0.9)")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
