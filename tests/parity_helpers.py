"""Helpers shared by the parity tests against the ``sru`` package (2.6 for SRU, 3.0 for SRU++),
also imported by the oracle script that runs ``sru`` 3.0 in a child process."""

import torch


def perturb(module, seed):
    """Moves every trainable parameter away from its initial value (layer norm weights, biases,
    alpha, the input_to_hidden Linear included) so that each one matters for the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def assert_close(actual, expected, what, dtype):
    """float64: rtol 1e-9, atol 1e-10; other dtypes: rtol 2e-5, atol 2e-6; ``what`` names the
    quantity in the failure message."""
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def padding_mask(lengths, L):
    """(L, B) bool, True at padding (the end of each sequence)."""
    steps = torch.arange(L).unsqueeze(1)
    return steps >= torch.tensor(lengths).unsqueeze(0)
