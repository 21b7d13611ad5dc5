"""sru_cupy.SRU on CUDA against the same model on the CPU: batch_first, PackedSequence, layer_norm,
bidirectional, projection, and autocast bfloat16; outputs and every parameter gradient. Skipped,
with the reason, where CuPy or a GPU is missing (tests/conftest.py)."""

import copy

import pytest

torch = pytest.importorskip("torch")

from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from sru_cupy import SRU  # noqa: E402

pytestmark = pytest.mark.gpu

CONFIGS = {
    "bi-layer_norm": dict(bidirectional=True, layer_norm=True),
    "batch_first-bi": dict(batch_first=True, bidirectional=True),
    "layer_norm_after-projection": dict(layer_norm=True, normalize_after=True, projection_size=5),
    "tanh-rescale-v1": dict(use_tanh=True, rescale=True, v1=True),
    "nn_rnn_compatible-bi": dict(bidirectional=True, nn_rnn_compatible_return=True),
}


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("gpu: this torch build has no CUDA device")
    yield torch.device("cuda")
    torch.cuda.synchronize()


def _pair(options, input_size=6, hidden_size=8, num_layers=2, seed=0):
    torch.manual_seed(seed)
    cpu = SRU(input_size, hidden_size, num_layers=num_layers, **options)
    return cpu, copy.deepcopy(cpu).cuda()


def _inputs(batch_first, L=9, B=4, n_in=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, L, n_in) if batch_first else (L, B, n_in)
    return torch.randn(shape, generator=g)


def _close(name, got, want, tol):
    torch.testing.assert_close(got.detach().float().cpu(), want.detach().float(), rtol=tol,
                               atol=tol, msg=lambda m: f"{name}: {m}")


def _compare_grads(cpu, gpu, tol):
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p_cpu.grad is None:
            assert p_gpu.grad is None, name
            continue
        _close(f"grad {name}", p_gpu.grad, p_cpu.grad, tol)


def _check_cuda_against_cpu(cpu, gpu, x, run):
    """``run(model, x, device) -> (h, c)`` on both models; h, c, dL/dx and every parameter
    gradient of loss = sum(h^2) + sum(c) agree."""
    results = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        # detach: x itself must stay a leaf that needs no grad for the second model's copy
        xi = x.detach().to(device).requires_grad_()
        h, c = run(model, xi, device)
        (h.pow(2).sum() + c.sum()).backward()
        results.append((h, c, xi.grad))
    for label, got, want in zip(("h", "c", "grad x"), results[1], results[0]):
        _close(label, got, want, 1e-4)
    _compare_grads(cpu, gpu, 1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sru_on_cuda_matches_cpu(cuda, name):
    options = CONFIGS[name]
    cpu, gpu = _pair(options)
    batch_first = options.get("batch_first", False)
    x = _inputs(batch_first)
    B = x.shape[0] if batch_first else x.shape[1]
    mask_pad = torch.zeros(x.shape[:2], dtype=torch.bool)
    if batch_first:
        mask_pad[1, 6:] = True
    else:
        mask_pad[6:, 1] = True
    c0 = torch.randn(2, B, cpu.output_size)
    _check_cuda_against_cpu(cpu, gpu, x, lambda model, xi, device: model(
        xi, c0.to(device), mask_pad=mask_pad.to(device)))


def test_packed_sequence_on_cuda_matches_cpu(cuda):
    cpu, gpu = _pair(dict(bidirectional=True, layer_norm=True))
    x = _inputs(False, L=10, B=5)
    lengths = torch.tensor([10, 7, 7, 3, 1])

    def packed_call(model, xi, device):
        h_packed, c = model(pack_padded_sequence(xi, lengths, enforce_sorted=True))
        h, out_lengths = pad_packed_sequence(h_packed)
        assert torch.equal(out_lengths, lengths)
        return h, c
    _check_cuda_against_cpu(cpu, gpu, x, packed_call)


def test_autocast_bfloat16_on_cuda_matches_float32_cpu(cuda):
    """Under autocast(bfloat16) on CUDA the GEMMs and the recurrence storage are bfloat16: outputs
    and gradients within bfloat16 rounding (relative RMS) of the float32 CPU model."""
    cpu, gpu = _pair(dict(bidirectional=True, layer_norm=True, batch_first=True))
    x = _inputs(True, L=16, B=4)
    h_cpu, c_cpu = cpu(x)
    (h_cpu.pow(2).mean() + c_cpu.pow(2).mean()).backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h, c = gpu(x.cuda())
        loss = h.float().pow(2).mean() + c.float().pow(2).mean()
    assert h.dtype == torch.bfloat16
    loss.backward()

    def rel_rms(got, want):
        got, want = got.detach().float().cpu(), want.detach().float()
        return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12))
    assert rel_rms(h, h_cpu) < 2e-2 and rel_rms(c, c_cpu) < 2e-2
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p_cpu.grad is not None:
            assert p_gpu.grad.dtype == p_gpu.dtype == torch.float32, name
            assert rel_rms(p_gpu.grad, p_cpu.grad) < 5e-2, name
