"""Per-call host cost on the GPU of one sru_cupy tree (argv[1]); prints one JSON line."""
import json, statistics, sys, time
import os
ROOT = os.path.abspath(sys.argv[1])
sys.path.insert(0, ROOT)
import torch
import sru_cupy
assert sru_cupy.__file__.startswith(ROOT), sru_cupy.__file__
import os
dev = os.environ.get("DEV", "cuda")
if dev == "cpu":
    torch.cuda.synchronize = lambda: None
torch.manual_seed(0)
m = sru_cupy.SRU(32, 32, num_layers=1).to(dev)
lstm = torch.nn.LSTM(32, 32, num_layers=1).to(dev)
x = torch.randn(1, 1, 32, device=dev)
xg = x.clone().requires_grad_()
U = torch.randn(4, 2, 96, device=dev); xx = torch.randn(4, 2, 32, device=dev)
b = torch.zeros(64, device=dev); wc = torch.zeros(64, device=dev)
def fwd():
    with torch.no_grad():
        m(x)
def step():
    h, c = m(xg); h.sum().backward()
def op():
    sru_cupy.recurrence(U, xx, wc, b, hidden_size=32)
def lstm_fwd():
    with torch.no_grad():
        lstm(x)
def lstm_step():
    h, _ = lstm(xg); h.sum().backward()
fns = (fwd, step, op, lstm_fwd, lstm_step)
for f in fns:
    for _ in range(100): f()
torch.cuda.synchronize()
res = {}
N = 100
for r in range(9):
    for f in fns:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(N): f()
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        res.setdefault(f.__name__, []).append(host / N * 1e6)
print(json.dumps({k: [round(statistics.median(v), 1), round(min(v), 1)] for k, v in res.items()}))
if len(sys.argv) > 2:
    import cProfile, pstats, io
    for f in (op, step):
        pr = cProfile.Profile(); pr.enable()
        for _ in range(2000): f()
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
        print(f"== profile {f.__name__} (2000 calls)"); print(s.getvalue()[-6000:])
