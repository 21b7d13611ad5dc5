"""SRU++ (``sru_cupy.srupp``): SRUpp, SRUppCell, SRUppAttention, SRUppProjectedLinear.

Shapes, attention placement, layouts (batch_first, PackedSequence), masks, incremental decoding,
autocast, torch.compile, TorchScript, gradcheck, argument errors, and the CUDA path (GPU-marked).
Parity with ``sru`` 3.0.0.dev6 itself is in test_srupp_parity.py; ONNX and torch.export in
test_export.py.
"""

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from parity_helpers import padding_mask, perturb
from sru_cupy import SRUpp, SRUppAttention, SRUppCell, SRUppProjectedLinear

F64 = torch.float64


def _model(*args, dtype=F64, seed=0, train=False, **kwargs):
    """A SRUpp with every parameter (alpha included) moved off its initial value."""
    torch.manual_seed(seed)
    model = SRUpp(*args, **kwargs).to(dtype)
    perturb(model, seed + 1)
    return model.train(train)


def _memory(model, M, B, dtype=F64, seed=5, batch_first=False):
    g = torch.Generator().manual_seed(seed)
    sizes = [layer.input_size for layer in model.rnn_lst]
    shape = (lambda n: (B, M, n)) if batch_first else (lambda n: (M, B, n))
    return [torch.randn(shape(n), generator=g, dtype=dtype) for n in sizes]


def _forward_backward(model, x, **kwargs):
    """h, c, saved inputs and the gradients of x, the memory and the parameters after backward
    of a fixed random linear functional of h and c."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    memory = kwargs.pop("memory", None)
    if memory is not None:
        memory = [m.detach().clone().requires_grad_(True) for m in memory]
    h, c, state = model(x, memory=memory, **kwargs)
    g = torch.Generator().manual_seed(9)
    h_time_major = h.transpose(0, 1) if model.batch_first else h
    # the weights drawn in float64 on the CPU whatever h is: the same loss for every device, dtype
    loss = (h_time_major * torch.randn(h_time_major.shape, generator=g, dtype=F64).to(h)).sum()
    loss = loss + (c * torch.randn(c.shape, generator=g, dtype=F64).to(c)).sum()
    loss.backward()
    return {"h": h.detach(), "c": c.detach(), "saved": [s.detach() for s in state["saved_inputs"]],
            "grad_x": x.grad, "grad_memory": None if memory is None else [m.grad for m in memory],
            # (a compiled module's parameter names start with "_orig_mod.")
            "grads": {n.replace("_orig_mod.", ""): p.grad.clone()
                      for n, p in model.named_parameters()}}


def _assert_results_close(a, b, transpose=False, **tol):
    """Compares two _forward_backward results (b batch-first when ``transpose``)."""
    t = (lambda v: v.transpose(0, 1)) if transpose else (lambda v: v)
    torch.testing.assert_close(a["h"], t(b["h"]), **tol)
    torch.testing.assert_close(a["c"], b["c"], **tol)
    torch.testing.assert_close(a["grad_x"], t(b["grad_x"]), **tol)
    for sa, sb in zip(a["saved"], b["saved"]):
        torch.testing.assert_close(sa, t(sb), **tol)
    if a["grad_memory"] is not None:
        for ma, mb in zip(a["grad_memory"], b["grad_memory"]):
            torch.testing.assert_close(ma, t(mb), **tol)
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], **tol,
                                   msg=lambda m: f"grad of {name}: {m}")


def _causal(L, M=0, dtype=F64):
    return torch.triu(torch.full((L, M + L), float("-inf"), dtype=dtype), diagonal=M + 1)


# -- construction ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("input_size, proj_first", [(6, False), (7, False), (7, True)],
                         ids=["k3", "k4", "proj_input_to_hidden_first"])
def test_shapes_and_layer_sizes(bidirectional, input_size, proj_first):
    hidden = 3 if bidirectional else 6  # output size 6 either way
    model = _model(input_size, hidden, 4, num_layers=3, num_heads=2, bidirectional=bidirectional,
                   proj_input_to_hidden_first=proj_first)
    L, B = 5, 2
    x = torch.randn(L, B, input_size, dtype=F64)
    h, c, state = model(x)
    assert h.shape == (L, B, 6) and c.shape == (3, B, 6)
    first = 6 if proj_first else input_size
    assert [s.shape for s in state["saved_inputs"]] == [(L, B, first), (L, B, 6), (L, B, 6)]
    assert (model.input_to_hidden is not None) == (proj_first and input_size != 6)
    expected_k = [3 if first == 6 else 4, 3, 3]
    assert [layer.num_matrices for layer in model.rnn_lst] == expected_k
    assert [layer.transform_module.out_features for layer in model.rnn_lst] == \
        [6 * k for k in expected_k]
    torch.testing.assert_close(state["saved_inputs"][0], x if first == input_size
                               else model.input_to_hidden(x))
    assert model[1] is model.rnn_lst[1]


@pytest.mark.parametrize("num_layers, kwargs, attention", [
    (3, {}, [True, True, True]),
    (8, dict(attention_every_n_layers=4), [False, False, False, True] * 2),
    (5, dict(attention_every_n_layers=2), [False, True, False, True, False]),
    (5, dict(attention_last_n_layers=2), [False, False, False, True, True]),
    (3, dict(attention_last_n_layers=0), [False, False, False]),
    (2, dict(attention_last_n_layers=5), [True, True]),
], ids=["every", "every-4th", "every-2nd", "last-2", "last-0", "last-more-than-layers"])
def test_attention_placement(num_layers, kwargs, attention):
    model = SRUpp(4, 4, 4, num_layers=num_layers, **kwargs)
    kinds = [isinstance(layer.transform_module, SRUppAttention) for layer in model.rnn_lst]
    assert kinds == attention
    assert all(isinstance(layer.transform_module, SRUppProjectedLinear)
               for layer, a in zip(model.rnn_lst, attention) if not a)
    h, _, _ = model(torch.randn(3, 2, 4))
    assert torch.isfinite(h).all()


def test_constructor_defaults_follow_sru3():
    model = SRUpp(4, 4, 2)
    layer = model.rnn_lst[0]
    assert model.num_layers == 2 and layer.highway_bias == -2.0
    assert layer.layer_norm is None and layer.rescale is False and layer.dropout == 0.0
    attention = layer.transform_module
    assert attention.layer_norm is not None and attention.normalize_after is True
    assert attention.alpha.tolist() == [0.0]
    assert layer.weight_c.abs().max() <= 1.0
    # SRUppCell alone: sru 3.0's SRUCell defaults (post layer norm, no rescale)
    cell = SRUppCell(4, 4, transform_module=SRUppProjectedLinear(4, 12, 2), layer_norm=True)
    assert cell.normalize_after is True and cell.rescale is False
    assert cell.layer_norm.normalized_shape == (4,)


def test_projected_linear_and_attention_by_hand():
    """SRUppProjectedLinear: linear2(LN(linear1 x)). SRUppAttention, one head, no mask, pre and
    post layer norm: the formula written out with softmax."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=F64)
    lin = SRUppProjectedLinear(3, 8, 4, layer_norm=True).double()
    perturb(lin, 1)
    torch.testing.assert_close(lin(x), lin.linear2(lin.layer_norm(lin.linear1(x))))
    for normalize_after in (True, False):
        att = SRUppAttention(3, 8, 4, layer_norm=True, normalize_after=normalize_after).double()
        perturb(att, 2)
        z = att.linear1(x)
        zn = z if normalize_after else att.layer_norm(z)
        k, v = att.linear2(zn).chunk(2, dim=-1)
        weights = torch.softmax(torch.einsum("lbd,sbd->bls", zn, k) / 2.0, dim=-1)
        out = torch.einsum("bls,sbd->lbd", weights, v) * att.alpha + z
        if normalize_after:
            out = att.layer_norm(out)
        torch.testing.assert_close(att(x), att.linear3(out))


# -- layouts and masks -----------------------------------------------------------------------------

def test_batch_first_equals_time_major():
    kwargs = dict(num_layers=2, num_heads=2, bidirectional=True)
    tm = _model(5, 3, 4, **kwargs)
    bf = _model(5, 3, 4, batch_first=True, **kwargs)
    L, B, M = 4, 3, 2
    x = torch.randn(L, B, 5, dtype=F64)
    memory = _memory(tm, M, B)
    mask_pad = padding_mask([4, 2, 3], L)
    memory_mask_pad = torch.tensor([[True, False, False], [False, False, True]])
    attn_mask = torch.randn(L, M + L, dtype=F64)
    a = _forward_backward(tm, x, mask_pad=mask_pad, memory=memory, attn_mask=attn_mask,
                          memory_mask_pad=memory_mask_pad)
    b = _forward_backward(bf, x.transpose(0, 1), mask_pad=mask_pad.t(),
                          memory=[m.transpose(0, 1) for m in memory], attn_mask=attn_mask,
                          memory_mask_pad=memory_mask_pad.t())
    _assert_results_close(a, b, transpose=True)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_sequence_equals_each_sequence_alone(bidirectional):
    model = _model(4, 3, 4, num_layers=2, num_heads=2, bidirectional=bidirectional)
    lengths = [5, 2, 4]
    xs = [torch.randn(n, 4, dtype=F64) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(xs)
    packed = pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=False)
    h, c, state = model(packed)
    h, out_lengths = pad_packed_sequence(h)
    assert out_lengths.tolist() == lengths
    for b, x in enumerate(xs):
        h_alone, c_alone, _ = model(x.unsqueeze(1))
        torch.testing.assert_close(h[:lengths[b], b], h_alone[:, 0])
        torch.testing.assert_close(c[:, b], c_alone[:, 0])
    # and the same as padding with mask_pad
    h_pad, c_pad, _ = model(padded, mask_pad=padding_mask(lengths, 5))
    torch.testing.assert_close(h_pad, h)
    torch.testing.assert_close(c_pad, c)


def test_padded_keys_do_not_matter():
    """What sits at padded input steps and padded memory steps changes nothing at the other
    steps; neither does a memory step whose attention mask column is -inf."""
    model = _model(4, 4, 4, num_layers=2, num_heads=2)
    L, B, M = 5, 2, 3
    x = torch.randn(L, B, 4, dtype=F64)
    memory = _memory(model, M, B)
    mask_pad = padding_mask([5, 3], L)
    memory_mask_pad = torch.tensor([[True, False], [False, False], [False, True]])
    h, c, _ = model(x, mask_pad=mask_pad, memory=memory, memory_mask_pad=memory_mask_pad)
    x2 = x.clone()
    x2[3:, 1] = 100.0
    memory2 = [m.clone() for m in memory]
    for m in memory2:
        m[0, 0] = -50.0
        m[2, 1] = 70.0
    h2, c2, _ = model(x2, mask_pad=mask_pad, memory=memory2, memory_mask_pad=memory_mask_pad)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(c2, c)
    assert (h[3:, 1] == 0).all()  # padded steps give h = 0
    # without the memory padding the memory does matter
    h3, _, _ = model(x, mask_pad=mask_pad, memory=memory2)
    assert not torch.allclose(h3, h)


def test_fully_masked_query_rows_give_zero_attention():
    """A query whose keys are all masked (here by attn_mask) gets attention 0: U = linear3(LN(z)),
    finite, with finite gradients (sru 3.0 gives NaN: see test_srupp_parity.py)."""
    torch.manual_seed(0)
    att = SRUppAttention(3, 6, 4, num_heads=2, layer_norm=True).double()
    perturb(att, 1)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    mask = torch.zeros(4, 4, dtype=F64)
    mask[2] = float("-inf")
    u = att(x, attn_mask=mask)
    torch.testing.assert_close(u[2], att.linear3(att.layer_norm(att.linear1(x[2]))))
    u.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(att.alpha.grad).all()
    assert torch.autograd.gradcheck(lambda t: att(t, attn_mask=mask), (x,))


def _softmax_attention(q, k, v, attn_mask=None, dropout_p=0.0, **kwargs):
    """softmax(q k^T / sqrt(head_dim) + mask) v written out: NaN where every key of a query is
    blocked, as some CUDA attention kernels (and ONNX's softmax) give, NaN gradients behind it."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return torch.softmax(scores, dim=-1) @ v


def _check_left_padding_with_causal_mask(model, device, dtype, **tol):
    """Left padding under a causal attn_mask: a padded query sees only padded keys, so its
    attention row is fully blocked. h, c and every gradient (x, c0, parameters) must be finite
    and equal those of each sequence run alone without its padding (h = 0 at padded steps, no
    gradient to them); gradients as the sum over the alone runs of the same loss."""
    model = model.to(device=device, dtype=dtype)
    L, B, pads = 5, 3, [0, 2, 4]
    g = torch.Generator().manual_seed(3)
    randn = lambda *shape: torch.randn(shape, generator=g, dtype=dtype).to(device)  # noqa: E731
    x = randn(L, B, model.input_size).requires_grad_(True)
    c0 = randn(model.num_layers, B, model.output_size).requires_grad_(True)
    weight_h, weight_c = randn(L, B, model.output_size), randn(model.num_layers, B,
                                                               model.output_size)
    mask_pad = (torch.arange(L).unsqueeze(1) < torch.tensor(pads).unsqueeze(0)).to(device)
    model.zero_grad(set_to_none=True)
    h, c, _ = model(x, c0, mask_pad=mask_pad, attn_mask=model.causal_attn_mask(L, dtype=dtype))
    ((h * weight_h).sum() + (c * weight_c).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.isfinite(h).all() and torch.isfinite(c).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(c0.grad).all()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"grad of {name} is not finite"

    model.zero_grad(set_to_none=True)  # the alone runs accumulate their gradients
    for b, p in enumerate(pads):
        x_b = x.detach()[p:, b:b + 1].clone().requires_grad_(True)
        c0_b = c0.detach()[:, b:b + 1].clone().requires_grad_(True)
        h_b, c_b, _ = model(x_b, c0_b, attn_mask=model.causal_attn_mask(L - p, dtype=dtype))
        ((h_b * weight_h[p:, b:b + 1]).sum() + (c_b * weight_c[:, b:b + 1]).sum()).backward()
        assert (h[:p, b] == 0).all() and (x.grad[:p, b] == 0).all()
        torch.testing.assert_close(h[p:, b], h_b[:, 0], **tol)
        torch.testing.assert_close(c[:, b], c_b[:, 0], **tol)
        torch.testing.assert_close(x.grad[p:, b], x_b.grad[:, 0], **tol)
        torch.testing.assert_close(c0.grad[:, b], c0_b.grad[:, 0], **tol)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, **tol,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("attention", ["sdpa", "nan_for_blocked_rows"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_left_padding_with_causal_mask_matches_unpadded(attention, bidirectional, monkeypatch):
    """See _check_left_padding_with_causal_mask; with ``nan_for_blocked_rows`` the attention
    kernel gives NaN for fully blocked rows (as CUDA's efficient and cuDNN kernels may), which
    must reach neither the results nor the gradients."""
    if attention == "nan_for_blocked_rows":
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            _softmax_attention)
    model = _model(5, 4, 4, num_layers=2, num_heads=2, bidirectional=bidirectional)
    _check_left_padding_with_causal_mask(model, "cpu", F64)


def test_all_padding_sequence_gives_h_zero_c0_and_finite_gradients():
    """A sequence that is padding from end to end, memory included: h = 0, c = c0, finite
    gradients everywhere; the other sequences are as if run alone."""
    model = _model(4, 4, 4, num_layers=2, num_heads=2, bidirectional=True)
    L, B, M = 4, 3, 2
    x = torch.randn(L, B, 4, dtype=F64)
    c0 = torch.randn(2, B, 8, dtype=F64)
    memory = _memory(model, M, B)
    mask_pad = padding_mask([4, 0, 3], L)
    memory_mask_pad = torch.tensor([[False, True, False], [False, True, True]])
    result = _forward_backward(model, x, c0=c0, mask_pad=mask_pad, memory=memory,
                               memory_mask_pad=memory_mask_pad)
    assert (result["h"][:, 1] == 0).all()
    torch.testing.assert_close(result["c"][:, 1], c0[:, 1])
    assert all(torch.isfinite(g).all() for g in result["grads"].values())
    assert torch.isfinite(result["grad_x"]).all()
    for b in (0, 2):
        h, c, _ = model(x[:, b:b + 1], c0[:, b:b + 1], mask_pad=mask_pad[:, b:b + 1],
                        memory=[m[:, b:b + 1] for m in memory],
                        memory_mask_pad=memory_mask_pad[:, b:b + 1])
        torch.testing.assert_close(result["h"][:, b], h[:, 0].detach())
        torch.testing.assert_close(result["c"][:, b], c[:, 0].detach())


def test_memory_entry_none_and_memory_mask_pad_without_memory():
    model = _model(4, 4, 4, num_layers=2)
    x = torch.randn(3, 2, 4, dtype=F64)
    memory = _memory(model, 2, 2)
    h_partial, _, _ = model(x, memory=[None, memory[1]])
    h_second, _, _ = model(x, memory=[torch.zeros(0, 2, 4, dtype=F64), memory[1]])
    torch.testing.assert_close(h_partial, h_second)  # None: the same as no memory steps
    # memory_mask_pad is ignored where a layer has no memory (as in sru 3.0)
    h, _, _ = model(x)
    h_ignored, _, _ = model(x, memory=[None, None], memory_mask_pad=torch.ones(2, 2, dtype=bool))
    torch.testing.assert_close(h_ignored, h)


# -- incremental decoding --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(num_layers=3, num_heads=2),
    dict(num_layers=4, attention_every_n_layers=2, layer_norm=True, normalize_after=True,
         proj_input_to_hidden_first=True, rescale=True),
    dict(num_layers=2, attention_last_n_layers=1, attn_layer_norm=False, batch_first=True),
], ids=["attention-every-layer", "every-2nd-post-norm", "last-1-batch-first"])
@pytest.mark.parametrize("segments", [[1] * 7, [3, 1, 2, 1]], ids=["token-by-token", "segments"])
def test_incremental_decoding_equals_one_causal_call(kwargs, segments):
    """The recipe of the module docstring: c and the layers' inputs carried between calls, a
    causal mask over [memory; input]; the concatenated h equal one call over everything."""
    model = _model(5, 6, 4, **kwargs)
    batch_first = kwargs.get("batch_first", False)
    L, B = sum(segments), 3
    x = torch.randn(B, L, 5, dtype=F64) if batch_first else torch.randn(L, B, 5, dtype=F64)
    time_axis = 1 if batch_first else 0
    with torch.no_grad():
        h_full, c_full, _ = model(x, attn_mask=model.causal_attn_mask(L, dtype=F64))
        memory, c, pieces, start = None, None, [], 0
        for n in segments:
            segment = x.narrow(time_axis, start, n)
            mask = model.causal_attn_mask(n, model.memory_length(memory))
            h, c, state = model(segment, c0=c, attn_mask=mask, memory=memory)
            memory = model.extend_memory(memory, state["saved_inputs"])
            pieces.append(h)
            start += n
    assert model.memory_length(memory) == L
    torch.testing.assert_close(torch.cat(pieces, dim=time_axis), h_full)
    torch.testing.assert_close(c, c_full)


def test_causal_mask_and_extend_memory():
    model = SRUpp(4, 4, 4, num_layers=2)
    mask = model.causal_attn_mask(3, 2)
    assert mask.shape == (3, 5) and mask.dtype == torch.float32
    allowed = mask == 0
    assert allowed.tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                                [True] * 5]
    assert model.memory_length(None) == 0
    saved = [torch.randn(3, 2, 4, requires_grad=True) for _ in range(2)]
    memory = model.extend_memory(None, saved)
    assert all(not m.requires_grad for m in memory)  # no graph kept across calls
    more = [torch.randn(4, 2, 4) for _ in range(2)]
    memory = model.extend_memory(memory, more, max_length=5)
    assert model.memory_length(memory) == 5
    torch.testing.assert_close(memory[0], torch.cat([saved[0][2:], more[0]]).detach())


# -- modes, autocast, compile, gradcheck -----------------------------------------------------------

def test_dropout_only_in_training():
    model = _model(4, 4, 4, num_layers=2, dropout=0.2, attn_dropout=0.3)
    x = torch.randn(5, 3, 4, dtype=F64)
    with torch.no_grad():
        e1, _, _ = model.eval()(x)
        e2, _, _ = model(x)
        torch.testing.assert_close(e1, e2)
        t1, _, _ = model.train()(x)
        t2, _, _ = model(x)
    assert not torch.allclose(t1, e1) and not torch.allclose(t1, t2)
    # attention dropout alone also acts in training
    att = SRUppAttention(4, 12, 4, attn_dropout=0.5).double().train()
    with torch.no_grad():
        att.alpha.fill_(1.0)
        assert not torch.allclose(att(x), att.eval()(x))


@pytest.mark.parametrize("amp_recurrence_fp16, expected", [(True, torch.bfloat16),
                                                           (False, torch.float32)])
def test_cpu_autocast_bf16(amp_recurrence_fp16, expected):
    torch.manual_seed(0)
    model = SRUpp(6, 8, 8, num_layers=2, num_heads=2)
    for layer in model.rnn_lst:
        layer.amp_recurrence_fp16 = amp_recurrence_fp16
    x = torch.randn(7, 3, 6)
    memory = _memory(model, 2, 3, dtype=torch.float32)
    mask = model.causal_attn_mask(7, 2)
    ref_h, ref_c, _ = model(x, memory=memory, attn_mask=mask, mask_pad=padding_mask([7, 5, 6], 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c, _ = model(x, memory=memory, attn_mask=mask, mask_pad=padding_mask([7, 5, 6], 7))
    assert h.dtype == expected and c.dtype == expected
    torch.testing.assert_close(h.float(), ref_h, rtol=0.05, atol=0.05)
    torch.testing.assert_close(c.float(), ref_c, rtol=0.05, atol=0.05)
    h.float().sum().backward()
    grad = model.rnn_lst[0].transform_module.linear1.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(dynamo, backend):
    model = _model(5, 4, 4, num_layers=2, num_heads=2, bidirectional=True, dtype=torch.float32,
                   train=True, attention_every_n_layers=2)
    L, B, M = 6, 3, 2
    x = torch.randn(L, B, 5)
    kwargs = dict(mask_pad=padding_mask([6, 4, 5], L), attn_mask=_causal(L, M, torch.float32),
                  memory=_memory(model, M, B, dtype=torch.float32),
                  memory_mask_pad=torch.tensor([[True, False, False], [False, False, False]]))
    eager = _forward_backward(model, x, **dict(kwargs))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    result = _forward_backward(compiled, x, **dict(kwargs))
    _assert_results_close(eager, result, rtol=1e-5, atol=1e-6)



#: name -> (SRUpp kwargs, forward arguments given, train)
SCRIPT_CASES = {
    "bi-3layers-every2-c0-pad": (dict(num_layers=3, bidirectional=True,
                                      attention_every_n_layers=2), "c0 pad", False),
    "causal-memory-mempad-heads2-prenorm": (dict(num_layers=2, num_heads=2, layer_norm=True,
                                                 normalize_after=False),
                                            "causal memory mempad", False),
    "batch-first-compat-proj-first-pad-memory": (dict(
        num_layers=2, batch_first=True, nn_rnn_compatible_return=True, bidirectional=True,
        proj_input_to_hidden_first=True), "pad memory", False),
    "train-dropout-attn-dropout-causal": (dict(num_layers=2, dropout=0.2, attn_dropout=0.3),
                                          "causal pad", True),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
@pytest.mark.filterwarnings("ignore:The TorchScript type system")
@pytest.mark.parametrize("name", list(SCRIPT_CASES))
def test_torchscript_matches_eager(name):
    """torch.jit.script(SRUpp): h, c, saved inputs and gradients equal eager mode's, and again
    after torch.jit.save / load; in eval mode on a second call too (TorchScript's optimised graph).
    In training the first call makes the same dropout draws from the same seed; from the second
    call on, the optimised graph draws nn.Dropout's masks (in the transform modules) its own way."""
    import io
    kwargs, given, train = SCRIPT_CASES[name]
    model = _model(7, 4, 4, train=train, **kwargs)
    first = model.batch_first
    L, B, M = 5, 3, 2
    x = torch.randn((B, L, 7) if first else (L, B, 7), dtype=F64)
    call = {}
    if "c0" in given:
        call["c0"] = torch.randn(kwargs["num_layers"], B, model.output_size, dtype=F64)
    if "pad" in given:
        mask = padding_mask([5, 3, 0], L)
        call["mask_pad"] = mask.t() if first else mask
    if "causal" in given:
        call["attn_mask"] = _causal(L, M if "memory" in given else 0)
    if "memory" in given:
        call["memory"] = _memory(model, M, B, batch_first=first)
    if "mempad" in given:
        call["memory_mask_pad"] = torch.tensor([[True, False, False], [False, False, True]])
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    results = []
    for module in (model, scripted, loaded):
        for _ in range(1 if train else 2):
            torch.manual_seed(3)
            results.append(_forward_backward(module, x, **dict(call)))
    for result in results[1:]:
        _assert_results_close(results[0], result, rtol=1e-10, atol=1e-12)


def test_gradcheck_small():
    """Input, c0 and memory gradients by finite differences (float64), with every mask."""
    model = _model(3, 2, 2, num_layers=2, num_heads=2, bidirectional=True, layer_norm=True,
                   attention_every_n_layers=2, proj_input_to_hidden_first=True)
    L, B, M = 3, 2, 2
    x = torch.randn(L, B, 3, dtype=F64, requires_grad=True)
    c0 = torch.randn(2, B, 4, dtype=F64, requires_grad=True)
    memory = [m.requires_grad_(True) for m in _memory(model, M, B)]
    mask_pad = padding_mask([3, 2], L)
    memory_mask_pad = torch.tensor([[False, True], [False, False]])
    attn_mask = torch.randn(L, M + L, dtype=F64)

    def fn(x, c0, m0, m1):
        h, c, _ = model(x, c0, mask_pad=mask_pad, attn_mask=attn_mask, memory=[m0, m1],
                        memory_mask_pad=memory_mask_pad)
        return h, c

    assert torch.autograd.gradcheck(fn, (x, c0, *memory))


def test_cell_one_step_and_memory():
    """SRUppCell alone: rank-2 input is one step; memory and c0 carry a sequence along."""
    torch.manual_seed(0)
    cell = SRUppCell(4, 4, transform_module=SRUppAttention(4, 12, 4, num_heads=2),
                     layer_norm=True).double()
    perturb(cell, 1)
    x = torch.randn(3, 2, 4, dtype=F64)
    h_full, c_full = cell(x, attn_mask=_causal(3))
    memory, c = None, None
    for t in range(3):
        mask = _causal(1, t)
        h, c = cell(x[t], c, attn_mask=mask, memory=memory)
        assert h.shape == (2, 4)
        torch.testing.assert_close(h, h_full[t])
        memory = x[:t + 1]
    torch.testing.assert_close(c, c_full)


def test_state_dict_round_trip():
    model = _model(5, 4, 4, num_layers=3, attention_every_n_layers=2, layer_norm=True)
    other = SRUpp(5, 4, 4, num_layers=3, attention_every_n_layers=2, layer_norm=True).double()
    other.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 2, 5, dtype=F64)
    torch.testing.assert_close(other(x)[0], model(x)[0])


# -- argument errors -------------------------------------------------------------------------------

BAD_CALLS = {
    "input": lambda m: m(torch.randn(3, 2, 5)),
    "input rank": lambda m: m(torch.randn(3, 4)),
    "c0": lambda m: m(torch.randn(3, 2, 4), c0=torch.zeros(1, 2, 4)),
    "attn_mask shape": lambda m: m(torch.randn(3, 2, 4), attn_mask=torch.zeros(3, 4)),
    "attn_mask bool": lambda m: m(torch.randn(3, 2, 4), attn_mask=torch.ones(3, 3, dtype=bool)),
    "memory count": lambda m: m(torch.randn(3, 2, 4), memory=[torch.zeros(2, 2, 4)]),
    "memory type": lambda m: m(torch.randn(3, 2, 4), memory=torch.zeros(2, 2, 4)),
    "memory shape": lambda m: m(torch.randn(3, 2, 4), memory=[torch.zeros(2, 3, 4)] * 2),
    "memory_mask_pad": lambda m: m(torch.randn(3, 2, 4), memory=[torch.zeros(2, 2, 4)] * 2,
                                   memory_mask_pad=torch.zeros(3, 2, dtype=bool)),
    "mask_pad": lambda m: m(torch.randn(3, 2, 4), mask_pad=torch.zeros(2, 3, dtype=bool)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_forward_arguments_name_the_argument(case):
    model = SRUpp(4, 4, 4, num_layers=2)
    argument = case.split()[0]
    with pytest.raises((ValueError, TypeError), match=argument):
        BAD_CALLS[case](model)


BAD_CONSTRUCTORS = {
    "proj_features, num_heads": lambda: SRUpp(4, 4, 6, num_heads=4),
    "attention_every_n_layers, attention_last_n_layers":
        lambda: SRUpp(4, 4, 4, attention_every_n_layers=2, attention_last_n_layers=1),
    "num_layers": lambda: SRUpp(4, 4, 4, num_layers=0),
    "proj_size": lambda: SRUpp(4, 4, 0),
    "attn_dropout": lambda: SRUpp(4, 4, 4, attn_dropout=1.0),
    "transform_module": lambda: SRUppCell(4, 4),
}


@pytest.mark.parametrize("argument", list(BAD_CONSTRUCTORS))
def test_bad_constructor_arguments_name_the_argument(argument):
    with pytest.raises(ValueError, match=argument):
        BAD_CONSTRUCTORS[argument]()


def test_dropout_is_checked_by_the_stack():
    with pytest.raises(ValueError, match=r"^dropout: expected a probability in \[0, 1\)"):
        SRUpp(4, 4, 4, num_layers=1, dropout=1.5)


def test_srupp_imports_no_private_name_of_another_module():
    """srupp.py builds on modules.py and layout.py through their public names only."""
    import ast
    import inspect

    from sru_cupy import srupp
    private = [f"from .{node.module} import {alias.name}"
               for node in ast.walk(ast.parse(inspect.getsource(srupp)))
               if isinstance(node, ast.ImportFrom) and node.level > 0
               for alias in node.names if alias.name.startswith("_")]
    assert not private


def test_stack_shares_sru_layer_access_and_reset():
    """SRUpp and SRU share their stack base: layer access and reset_parameters (SRUpp's
    input_to_hidden is re-drawn Xavier-uniform, as in sru 3.0)."""
    from sru_cupy.modules import SRU, LayerStack
    model = SRUpp(5, 4, 4, num_layers=2, proj_input_to_hidden_first=True)
    assert isinstance(model, LayerStack) and issubclass(SRU, LayerStack)
    assert model[1] is model.rnn_lst[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    model.reset_parameters()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert "input_to_hidden.weight" in changed and "rnn_lst.0.weight_c" in changed
    bound = math.sqrt(6 / (5 + 4))  # Xavier-uniform, not nn.Linear's 1/sqrt(5)
    weight = model.input_to_hidden.weight
    assert weight.abs().max() <= bound and weight.abs().max() > 1 / math.sqrt(5)


# -- CUDA ------------------------------------------------------------------------------------------

def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("gpu: this torch build has no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_gpu_matches_cpu(bidirectional):
    """float32 on CUDA (the CuPy kernels, scaled_dot_product_attention's GPU kernels) against the
    CPU in float64: outputs and every gradient."""
    _need_cuda()
    model = _model(6, 8, 8, num_layers=3, num_heads=2, bidirectional=bidirectional, train=True,
                   attention_every_n_layers=2, layer_norm=True)
    L, B, M = 9, 4, 3
    x = torch.randn(L, B, 6, dtype=F64)
    kwargs = dict(mask_pad=padding_mask([9, 4, 7, 1], L), attn_mask=_causal(L, M),
                  memory=_memory(model, M, B),
                  memory_mask_pad=torch.tensor([[True, False, False, True]] + [[False] * 4] * 2))
    cpu = _forward_backward(model, x, **dict(kwargs))
    gpu_model = model.float().cuda()
    moved = {k: ([m.float().cuda() for m in v] if isinstance(v, list) else
                 v.float().cuda() if v.is_floating_point() else v.cuda())
             for k, v in kwargs.items()}
    gpu = _forward_backward(gpu_model, x.float().cuda(), **moved)
    def on_cpu(v):  # tensors in float64 on the CPU, in lists and dicts too; None stays None
        if isinstance(v, list):
            return [on_cpu(t) for t in v]
        if isinstance(v, dict):
            return {n: on_cpu(t) for n, t in v.items()}
        return v.double().cpu() if isinstance(v, torch.Tensor) else v
    gpu = on_cpu(gpu)
    _assert_results_close(cpu, gpu, rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_gpu_left_padding_with_causal_mask_matches_unpadded(bidirectional):
    """_check_left_padding_with_causal_mask in float32 on CUDA, where the fused attention
    kernels run (and may give NaN for fully blocked rows)."""
    _need_cuda()
    model = _model(5, 4, 4, num_layers=2, num_heads=2, bidirectional=bidirectional)
    _check_left_padding_with_causal_mask(model, "cuda", torch.float32, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_gpu_autocast_and_fully_masked_rows(dtype):
    """Under autocast the fused attention kernels run; a sequence that is all padding gives
    finite results (h = 0) and the others match float32."""
    _need_cuda()
    torch.manual_seed(0)
    model = SRUpp(64, 64, 64, num_layers=2, num_heads=4).cuda()
    with torch.no_grad():
        for layer in model.rnn_lst:  # alpha starts at 0: give the attention a part in U
            layer.transform_module.alpha.fill_(0.5)
    x = torch.randn(32, 4, 64, device="cuda")
    mask_pad = padding_mask([32, 0, 20, 7], 32).cuda()
    ref, _, _ = model(x, mask_pad=mask_pad, attn_mask=model.causal_attn_mask(32))
    with torch.autocast("cuda", dtype=dtype):
        h, c, _ = model(x, mask_pad=mask_pad, attn_mask=model.causal_attn_mask(32))
        h.float().sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(c).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (h[:, 1] == 0).all()
    error = (h.float() - ref).norm() / ref.norm()
    assert error < 5e-2, f"relative error {error:.3g} under {dtype} autocast"
