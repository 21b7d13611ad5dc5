"""The PyTorch implementation of the recurrence (sru_cupy/torch_fallback.py): the vectorized loop
that CPU tensors run where no C++ compiler exists (tested against the kernels in test_ops.py, which
runs every CPU test with both implementations), and the scan over time that ONNX export writes as a
Scan node, here against the op."""

import pytest
import torch

from sru_cupy import ops, torch_fallback, tracing
from sru_cupy.call import RecurrenceCall
from sru_cupy.modules import SRU


SCAN_CASES = [
    dict(bidirectional=False, k=3, skip=True, tanh=False, c0=True, mh=True, pad=True, V=False),
    dict(bidirectional=True, k=4, skip=True, tanh=True, c0=False, mh=False, pad=True, V=True),
    dict(bidirectional=True, k=3, skip=False, tanh=False, c0=True, mh=True, pad=False, V=True),
    dict(bidirectional=False, k=4, skip=True, tanh=True, c0=True, mh=False, pad=False, V=False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "-".join(k for k, v in c.items() if v))
def test_recurrence_scan_equals_the_op(case, dtype):
    L, B, d = 7, 3, 5
    D = d * (2 if case["bidirectional"] else 1)
    g = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    mask_pad = None
    if case["pad"]:
        mask_pad = torch.zeros(L, B, dtype=torch.bool)
        mask_pad[4:, 1] = True
        mask_pad[:, 2] = True
    args = (randn(L, B, D * case["k"]), randn(L, B, D) if case["k"] == 3 and case["skip"] else None,
            randn(2 * D), randn(2 * D), randn(B, D) if case["c0"] else None,
            (randn(B, D) > 0).to(dtype) / 0.5 if case["mh"] else None, mask_pad)
    options = (d, case["bidirectional"], case["skip"], case["tanh"], 1.3, True)
    V = randn(L, B, 2 * D) if case["V"] else None
    expected = ops.recurrence_forward_op(*args, *options, V)
    call = RecurrenceCall.describe(args[0].shape, str(dtype).split(".")[1], d,
                                   case["bidirectional"], case["skip"], case["tanh"], 1.3,
                                   with_v=V is not None)
    names = ("U", "x", "weight_c", "bias", "c0", "mask_h", "mask_pad")
    got = torch_fallback.recurrence_scan(call, dict(zip(names, args), V=V))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("h", "c", "c_last"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def test_the_layers_use_the_op_outside_onnx_export(monkeypatch):
    assert not tracing.onnx_exporting()
    calls = []
    real = torch_fallback.recurrence_scan
    monkeypatch.setattr(torch_fallback, "recurrence_scan",
                        lambda *a: calls.append(a) or real(*a))
    SRU(5, 4)(torch.randn(3, 2, 5))
    assert calls == []
    monkeypatch.setattr(tracing, "onnx_exporting", lambda: True)  # as inside torch.onnx.export
    h, c = SRU(5, 4, num_layers=1)(torch.randn(3, 2, 5))
    assert len(calls) == 1 and h.shape == (3, 2, 4) and c.shape == (1, 2, 4)


def test_a_torch_without_the_scan_operator_gets_a_clear_error(monkeypatch):
    """The ONNX route uses PyTorch's private scan operator: where a PyTorch lacks it, the error
    says what is missing and what to do instead."""
    import sys
    import types
    monkeypatch.setitem(sys.modules, "torch._higher_order_ops.scan",
                        types.ModuleType("torch._higher_order_ops.scan"))
    L, B, d = 3, 2, 4
    arrays = dict(U=torch.randn(L, B, 3 * d), x=torch.randn(L, B, d), weight_c=torch.randn(2 * d),
                  bias=torch.randn(2 * d), c0=torch.randn(B, d))
    call = RecurrenceCall.describe((L, B, 3 * d), "float32", d)
    with pytest.raises(RuntimeError, match=r"needs torch\._higher_order_ops\.scan\.scan_op, which "
                                           r"torch .* lacks .*upgrade torch, or deploy with "
                                           r"torch\.export or TorchScript"):
        torch_fallback.recurrence_scan(call, arrays)
