"""The PyTorch layers ``sru_cupy.SRUCell`` and ``sru_cupy.SRU`` on the CPU.

Constructor handling, layouts (batch_first, PackedSequence, one step), c0, the nn.LSTM-compatible
return, dropout, v1, initialisation, argument errors, serialisation, and the two CPU
implementations (compiled host kernels and the PyTorch fallback). Parity with the ``sru`` package
itself is in test_sru_parity.py.
"""

import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from sru_cupy import cpu_gemm, implementation, ops
from sru_cupy.modules import SRU, SRUCell

pytestmark = [pytest.mark.filterwarnings("ignore:rnn_dropout > 0 is deprecated:UserWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]

F64 = torch.float64


# -- helpers ------------------------------------------------------------------------------------

def _clone(module, **overrides):
    """A module of the same class and config (plus overrides) holding the same weights."""
    other = type(module)(*module._test_args, **{**module._test_kwargs, **overrides})
    other.to(next(module.parameters()).dtype)  # before loading: no rounding through float32
    other.load_state_dict(module.state_dict(), strict=True)
    return other.train(module.training)


def _make(cls, *args, dtype=F64, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = cls(*args, **kwargs).to(dtype)
    module._test_args, module._test_kwargs = args, kwargs
    with torch.no_grad():  # move the layer norm / bias values off their trivial init
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return module


def _forward_backward(module, x, c0=None, mask_pad=None, wh=None, wc=None):
    """Runs forward, backward of sum(h*wh) + sum(c*wc); returns h, c and the gradients."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    c0 = None if c0 is None else c0.detach().clone().requires_grad_(True)
    h, c = module(x, c0, mask_pad=mask_pad)
    g = torch.Generator().manual_seed(99)
    wh = torch.randn(h.shape, generator=g, dtype=h.dtype) if wh is None else wh
    wh = wh.to(h.device)
    wc = torch.randn(c.shape, generator=g, dtype=c.dtype) if wc is None else wc
    wc = wc.to(c.device)
    ((h * wh).sum() + (c * wc).sum()).backward()
    params = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return h.detach(), c.detach(), x.grad, None if c0 is None else c0.grad, params


def _assert_params_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m: f"grad of {name}: {m}", **tol)


def _mask_from_lengths(lengths, L):
    return torch.arange(L).unsqueeze(1) >= torch.tensor(lengths).unsqueeze(0)


# -- constructor ----------------------------------------------------------------------------------

def test_sru_accepts_every_sru_argument():
    m = SRU(5, 4, num_layers=3, dropout=0.1, rnn_dropout=0.1, bidirectional=True,
            projection_size=3, use_tanh=True, layer_norm=True, highway_bias=-1.0,
            has_skip_term=True, rescale=True, v1=False, nn_rnn_compatible_return=True,
            custom_m=None, proj_input_to_hidden_first=True, amp_recurrence_fp16=False,
            normalize_after=True, weight_c_init=0.5, batch_first=True)
    assert (m.num_layers, m.hidden_size, m.output_size, m.num_directions) == (3, 4, 8, 2)
    assert m.input_to_hidden is not None and m.input_to_hidden.weight.shape == (8, 5)
    cell = m.rnn_lst[1]
    assert cell.use_tanh and cell.rescale and cell.normalize_after and cell.bidirectional
    assert cell.layer_norm.normalized_shape == (8,)
    assert (cell.dropout, cell.rnn_dropout) == (0.1, 0.1)
    assert m.rnn_lst[2].dropout == 0.0  # no dropout after the last layer
    assert cell.weight_c.abs().max() <= 0.5
    assert cell.projection_size == 3 and cell.weight_proj.shape == (8, 3)
    h, c = m(torch.randn(2, 6, 5))  # batch_first: (B, L, n_in)
    assert h.shape == (2, 6, 8) and c.shape == (6, 2, 4)


def test_cell_accepts_every_sru_argument():
    cell = SRUCell(5, 4, dropout=0.1, rnn_dropout=0.1, bidirectional=True, n_proj=3,
                   use_tanh=True, highway_bias=-1.0, has_skip_term=True, layer_norm=True,
                   rescale=True, v1=False, custom_m=None, amp_recurrence_fp16=False,
                   normalize_after=False, weight_c_init=0.5, batch_first=True)
    assert cell.projection_size == 3 and cell.num_matrices == 4
    assert cell.weight_proj.shape == (5, 3) and cell.weight.shape == (3, 8 * 4)
    assert cell.layer_norm.normalized_shape == (5,)
    h, c = cell(torch.randn(2, 6, 5))
    assert h.shape == (2, 6, 8) and c.shape == (2, 8)
    assert SRUCell(5, 4, projection_size=3).projection_size == 3  # the 3.x name works too


@pytest.mark.parametrize("n_in, hidden, bidirectional, proj, used", [
    (8, 6, False, 3, True),
    (8, 6, False, 5, True),
    (8, 6, False, 6, False),  # == output size
    (8, 6, False, 7, False),
    (4, 6, False, 4, False),  # == input size
    (4, 6, False, 3, True),
    (8, 3, True, 5, True),  # output 6
    (8, 3, True, 6, False),
    (8, 6, False, 0, False),
])
def test_projection_only_when_smaller(n_in, hidden, bidirectional, proj, used):
    cell = SRUCell(n_in, hidden, bidirectional=bidirectional, n_proj=proj)
    out = hidden * (2 if bidirectional else 1)
    k = cell.num_matrices
    if used:
        assert cell.projection_size == proj
        assert cell.weight_proj.shape == (n_in, proj)
        assert cell.weight.shape == (proj, out * k)
        assert {n for n, _ in cell.named_parameters()} == {"weight_proj", "weight", "weight_c",
                                                           "bias"}
    else:
        assert cell.projection_size == 0 and cell.weight_proj is None
        assert cell.weight.shape == (n_in, out * k)
        assert "weight_proj" not in dict(cell.named_parameters())
    h, _ = cell(torch.randn(3, 2, n_in))
    assert h.shape == (3, 2, out)


@pytest.mark.parametrize("n_in, hidden, bidirectional, skip, k", [
    (5, 4, False, True, 4),
    (4, 4, False, True, 3),
    (8, 4, True, True, 3),
    (4, 4, True, True, 4),
    (5, 4, False, False, 3),
    (4, 4, True, False, 3),
])
def test_num_matrices(n_in, hidden, bidirectional, skip, k):
    cell = SRUCell(n_in, hidden, bidirectional=bidirectional, has_skip_term=skip)
    out = hidden * (2 if bidirectional else 1)
    assert cell.num_matrices == k
    assert cell.weight.shape == (n_in, out * k)
    assert cell.weight_c.shape == cell.bias.shape == (2 * out,)
    assert cell.scale_x.shape == (1,)


def test_sru_layers_num_matrices_and_input_sizes():
    m = SRU(5, 4, num_layers=3, bidirectional=True)
    assert [c.input_size for c in m.rnn_lst] == [5, 8, 8]
    assert [c.num_matrices for c in m.rnn_lst] == [4, 3, 3]
    m = SRU(5, 4, num_layers=2, proj_input_to_hidden_first=True)
    assert [c.num_matrices for c in m.rnn_lst] == [3, 3]
    assert SRU(4, 4, proj_input_to_hidden_first=True).input_to_hidden is None


@pytest.mark.parametrize("build, name", [
    (lambda: SRUCell(0, 4), "input_size"),
    (lambda: SRUCell(5, -1), "hidden_size"),
    (lambda: SRUCell(5, 4, dropout=1.0), "dropout"),
    (lambda: SRUCell(5, 4, rnn_dropout=-0.1), "rnn_dropout"),
    (lambda: SRU(5, 4, num_layers=0), "num_layers"),
    (lambda: SRU(0, 4), "input_size"),
    (lambda: SRUCell(5, 4, custom_m=nn.Linear(5, 16), transform_module=nn.Linear(5, 16)),
     "custom_m"),
])
def test_constructor_rejects_bad_values(build, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        build()


@pytest.mark.parametrize("projection_size", [[3, 0, 4], (3, 0, 4)], ids=["list", "tuple"])
def test_projection_size_per_layer(projection_size):
    """One projection size per layer (sru 3.0's form); each layer projects under 2.6's rule (only
    below min(its input size, output_size)), so layer 2's 4 (= output_size) gives no projection."""
    m = SRU(9, 4, num_layers=3, projection_size=projection_size)
    assert [c.projection_size for c in m.rnn_lst] == [3, 0, 0]
    assert m.rnn_lst[0].weight_proj.shape == (9, 3)
    assert m.rnn_lst[1].weight_proj is None and m.rnn_lst[2].weight_proj is None
    assert m.projection_size == projection_size
    h, c = m(torch.randn(5, 2, 9))
    assert h.shape == (5, 2, 4) and c.shape == (3, 2, 4)
    uniform = SRU(9, 4, num_layers=3, projection_size=3)
    assert [c.projection_size for c in uniform.rnn_lst] == [3, 3, 3]


@pytest.mark.parametrize("projection_size, match", [
    ([3, 2], r"^projection_size: expected an int or one size per layer \(num_layers = 3\), "
             r"got 2 sizes"),
    ([3, -1, 2], r"^projection_size\[1\]: expected an int >= 0"),
    ([3, 2.5, 2], r"^projection_size\[1\]: expected an int >= 0"),
    (-2, r"^projection_size: expected an int >= 0"),
    (True, r"^projection_size: expected an int >= 0"),
    ("3", r"^projection_size: expected an int >= 0 or a list/tuple of 3"),
])
def test_projection_size_errors_name_it(projection_size, match):
    with pytest.raises(ValueError, match=match):
        SRU(9, 4, num_layers=3, projection_size=projection_size)


def test_cell_projection_errors_name_the_argument_given():
    with pytest.raises(ValueError, match=r"^n_proj: expected an int >= 0"):
        SRUCell(9, 4, n_proj=-1)
    with pytest.raises(ValueError, match=r"^projection_size: expected an int >= 0"):
        SRUCell(9, 4, projection_size=[3])


def test_layout_describes_the_parameters():
    """Each layer's ``layout`` (layout.LayerLayout) names and shapes its parameters and buffer as
    its state_dict has them (transform module entries aside)."""
    for cell in [SRUCell(9, 4, n_proj=3, layer_norm=True, bidirectional=True),
                 SRUCell(5, 4, layer_norm=True, normalize_after=True),
                 SRUCell(5, 4, custom_m=nn.Linear(5, 16, bias=False))]:
        state = {k: tuple(v.shape) for k, v in cell.state_dict().items()
                 if not k.startswith("transform_module.")}
        assert state == cell.layout.param_shapes()
        assert list(state) == list(cell.layout.param_shapes())


def test_custom_m_replaces_the_gemm():
    cell = SRUCell(5, 4, custom_m=nn.Linear(5, 4 * 4, bias=False))
    assert cell.weight is None and "weight" not in dict(cell.named_parameters())
    h, c = cell(torch.randn(3, 2, 5))
    assert h.shape == (3, 2, 4)
    bad = SRUCell(5, 4, custom_m=nn.Linear(5, 12))
    with pytest.raises(ValueError, match="transform_module"):
        bad(torch.randn(3, 2, 5))


class _ReturnsUV(nn.Module):
    def __init__(self, u_width, v_width, extra=False):
        super().__init__()
        self.u = nn.Linear(5, u_width, bias=False)
        self.v = nn.Linear(5, v_width)
        self.extra = extra

    def forward(self, x):
        U, V = self.u(x), self.v(x)
        return (U, V, V) if self.extra else (U, V)


def test_custom_m_returning_u_and_v():
    """V offsets weight_c per step. As in sru 2.6, whose V = ret[1] + weight_c adds the flat
    vectors, weight_c's entries are then read in V's layout, (forget, reset) per column: a zero V
    equals no V with weight_c reordered that way. A nonzero V changes h and gets a gradient."""
    cell = SRUCell(5, 4, custom_m=_ReturnsUV(16, 8)).double()
    x = torch.randn(3, 2, 5, dtype=F64)
    with torch.no_grad():
        cell.transform_module.v.weight.zero_()
        cell.transform_module.v.bias.zero_()
    # (constructed first: its reset_parameters re-initialises the shared Linear)
    u_only = SRUCell(5, 4, custom_m=cell.transform_module.u).double()
    h_zero_v, c_zero_v = cell(x)
    u_only.load_state_dict({"weight_c": cell.weight_c.detach().view(4, 2).t().reshape(-1),
                            "bias": cell.bias, "scale_x": cell.scale_x}, strict=False)
    h_u_only, c_u_only = u_only(x)
    torch.testing.assert_close(h_zero_v, h_u_only, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_zero_v, c_u_only, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        cell.transform_module.v.bias.fill_(0.5)
    h, c = cell(x)
    assert not torch.allclose(h, h_zero_v)
    (h.sum() + c.sum()).backward()
    assert cell.transform_module.v.weight.grad.abs().sum() > 0
    assert cell.weight_c.grad.abs().sum() > 0


@pytest.mark.parametrize("module, match", [
    (_ReturnsUV(16, 6), r"^transform_module: expected V"),
    (_ReturnsUV(16, 8, extra=True), r"^transform_module: expected U or \(U, V\)"),
])
def test_custom_m_bad_v_is_rejected(module, match):
    with pytest.raises(ValueError, match=match):
        SRUCell(5, 4, custom_m=module)(torch.randn(3, 2, 5))


def test_state_dict_with_sru_custom_m_keys_loads():
    a = SRUCell(5, 4, custom_m=_ReturnsUV(16, 8))
    state = {k.replace("transform_module.", "custom_m."): v for k, v in a.state_dict().items()}
    b = SRUCell(5, 4, custom_m=_ReturnsUV(16, 8))
    b.load_state_dict(state, strict=True)
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)


# -- sru 3.0 checkpoints ---------------------------------------------------------------------------
# (Against sru 3.0 itself in test_sru_parity.py.)

def _as_sru3(state, prefixes):
    """``state`` in sru 3.0's SRU layout: the weight (and weight_proj) of each layer (the keys
    under each of ``prefixes``) as the transform_module Linear (or Sequential of two) of 3.0."""
    state = dict(state)
    for prefix in prefixes:
        weight = state.pop(prefix + "weight")
        if prefix + "weight_proj" in state:
            state[prefix + "transform_module.0.weight"] = state.pop(prefix + "weight_proj").t()
            state[prefix + "transform_module.1.weight"] = weight.t()
        else:
            state[prefix + "transform_module.weight"] = weight.t()
    return state


@pytest.mark.parametrize("assign", [False, True])
def test_sru3_layout_loads_exactly(assign):
    """sru 3.0's keys (a Linear, a projecting Sequential) load into weight / weight_proj + weight:
    the same outputs, bit for bit; with assign=True the parameters are contiguous."""
    a = _make(SRU, 9, 4, num_layers=2, projection_size=[3, 0], layer_norm=True)
    b = _make(SRU, 9, 4, seed=1, num_layers=2, projection_size=[3, 0], layer_norm=True)
    state = _as_sru3(a.state_dict(), ["rnn_lst.0.", "rnn_lst.1."])
    assert "rnn_lst.0.transform_module.0.weight" in state
    assert "rnn_lst.1.transform_module.weight" in state
    b.load_state_dict(state, strict=True, assign=assign)
    assert all(p.is_contiguous() for p in b.parameters())
    x = torch.randn(5, 3, 9, dtype=F64)
    torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(b(x)[1], a(x)[1], rtol=0, atol=0)


def test_sru3_projection_into_a_layer_without_one_loads_the_product():
    """sru 3.0 projects for any projection_size > 0; 2.6's rule (ours) only below min(n_in, out):
    a layer built with projection_size=6 > out = 4 gets weight = W0^T W1^T, the same U."""
    torch.manual_seed(0)
    n_in, out, k, p = 9, 4, 4, 6
    first = torch.randn(p, n_in, dtype=F64)  # 3.0's transform_module.0.weight
    second = torch.randn(out * k, p, dtype=F64)  # transform_module.1.weight
    ours = _make(SRUCell, n_in, out, n_proj=p)
    assert ours.weight_proj is None
    state = {name: v for name, v in ours.state_dict().items() if name != "weight"}
    state.update({"transform_module.0.weight": first, "transform_module.1.weight": second})
    ours.load_state_dict(state, strict=True)
    x = torch.randn(5, 3, n_in, dtype=F64)
    torch.testing.assert_close(ours.compute_U(x), x @ first.t() @ second.t(), rtol=1e-12,
                               atol=1e-12)


def test_sru3_linear_into_a_projecting_layer_is_an_error():
    a = _make(SRUCell, 9, 4)
    b = _make(SRUCell, 9, 4, n_proj=3)
    state = _as_sru3(a.state_dict(), [""])
    with pytest.raises(RuntimeError, match=r"transform_module.weight: a checkpoint of sru 3.0 "
                                           r"without projection does not load into a layer with "
                                           r"projection_size = 3"):
        b.load_state_dict(state)


def test_sru3_keys_of_a_layer_with_its_own_transform_module_are_its_own():
    """A layer with a transform module keeps ``transform_module.*`` for that module."""
    a = _make(SRUCell, 5, 4, transform_module=nn.Linear(5, 16, bias=False))
    b = _make(SRUCell, 5, 4, seed=1, transform_module=nn.Linear(5, 16, bias=False))
    b.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(b.transform_module.weight, a.transform_module.weight)
    assert b.weight is None


# -- layouts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, args, kwargs", [
    (SRU, (5, 4), dict(num_layers=2, bidirectional=True, layer_norm=True)),
    (SRU, (4, 4), dict(num_layers=3, nn_rnn_compatible_return=True, bidirectional=True)),
    (SRUCell, (5, 4), dict(bidirectional=True)),
    (SRUCell, (4, 4), dict(highway_bias=-1.0)),
], ids=["sru-bi-ln", "sru-3layers-compat", "cell-bi", "cell-k3"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask_pad"])
def test_batch_first_equals_time_major(cls, args, kwargs, mask):
    L, B = 6, 3
    tm = _make(cls, *args, **kwargs)
    bf = _clone(tm, batch_first=True)
    assert bf.batch_first and not tm.batch_first
    x = torch.randn(L, B, args[0], dtype=F64)
    out = tm.output_size
    c0 = torch.randn(*(((tm.num_layers,) if cls is SRU else ()) + (B, out)), dtype=F64)
    mask_pad = _mask_from_lengths([6, 2, 4], L) if mask else None
    with torch.no_grad():
        h_shape, c_shape = (t.shape for t in tm(x, c0, mask_pad=mask_pad))
    wh = torch.randn(h_shape, dtype=F64)
    wc = torch.randn(c_shape, dtype=F64)
    ht, ct, gxt, gct, gpt = _forward_backward(tm, x, c0, mask_pad, wh, wc)
    hb, cb, gxb, gcb, gpb = _forward_backward(
        bf, x.transpose(0, 1).contiguous(), c0, None if mask_pad is None else mask_pad.t(),
        wh.transpose(0, 1), wc)
    assert hb.shape == (B, L, out)
    torch.testing.assert_close(hb, ht.transpose(0, 1))
    torch.testing.assert_close(cb, ct)
    torch.testing.assert_close(gxb, gxt.transpose(0, 1))
    torch.testing.assert_close(gcb, gct)
    _assert_params_close(gpb, gpt)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_equals_each_sequence_alone(bidirectional):
    lengths = [3, 6, 1, 4]  # unsorted
    L, B, n_in, hidden = 6, 4, 5, 4
    m = _make(SRU, n_in, hidden, num_layers=2, bidirectional=bidirectional, layer_norm=True)
    out = m.output_size
    x = torch.randn(L, B, n_in, dtype=F64, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    h_packed, c = m(packed)
    assert isinstance(h_packed, PackedSequence)
    h, out_lengths = pad_packed_sequence(h_packed)
    assert out_lengths.tolist() == lengths and h.shape == (L, B, out) and c.shape == (2, B, out)
    wh = torch.randn(L, B, out, dtype=F64)
    wc = torch.randn(2, B, out, dtype=F64)
    ((h * wh).sum() + (c * wc).sum()).backward()
    grad_params = {n: p.grad.clone() for n, p in m.named_parameters()}

    m.zero_grad()
    x_alone = x.detach().clone().requires_grad_(True)
    total = 0
    for b, length in enumerate(lengths):
        h_b, c_b = m(x_alone[:length, b:b + 1])
        torch.testing.assert_close(h[:length, b], h_b[:, 0].detach(), msg=f"h of sequence {b}")
        torch.testing.assert_close(c[:, b], c_b[:, 0].detach(), msg=f"c of sequence {b}")
        total = total + (h_b[:, 0] * wh[:length, b]).sum() + (c_b[:, 0] * wc[:, b]).sum()
    total.backward()
    torch.testing.assert_close(x.grad, x_alone.grad)  # zero beyond each length in both
    assert x.grad[lengths[0]:, 0].abs().max() == 0
    _assert_params_close({n: p.grad for n, p in m.named_parameters()}, grad_params)


def test_packed_sequence_equals_mask_pad():
    lengths = [2, 5, 5, 3]
    L = 5
    m = _make(SRU, 5, 4, num_layers=3, bidirectional=True)
    x = torch.randn(L, 4, 5, dtype=F64)
    c0 = torch.randn(3, 4, 8, dtype=F64)
    h_packed, c_packed = m(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False),
                           c0)
    h_masked, c_masked = m(x, c0, mask_pad=_mask_from_lengths(lengths, L))
    torch.testing.assert_close(pad_packed_sequence(h_packed)[0], h_masked)
    torch.testing.assert_close(c_packed, c_masked)
    # padding positions of the masked path are zero
    assert h_masked[2:, 0].abs().max() == 0
    # a batch_first module takes the same PackedSequence (its layout is its own)
    bf = _clone(m, batch_first=True)
    h_bf, c_bf = bf(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False), c0)
    torch.testing.assert_close(pad_packed_sequence(h_bf)[0], h_masked)
    torch.testing.assert_close(c_bf, c_masked)
    with pytest.raises(ValueError, match="^mask_pad"):
        m(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False),
          mask_pad=_mask_from_lengths(lengths, L))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64, torch.float32])
def test_mask_pad_dtypes(dtype):
    m = _make(SRU, 5, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 5, dtype=F64)
    mask = _mask_from_lengths([5, 1, 3], 5)
    ref = m(x, mask_pad=mask)
    got = m(x, mask_pad=mask.to(dtype))
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    assert not torch.allclose(ref[0], m(x)[0])  # the mask matters


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cell_rank2_input_is_one_step(batch_first, bidirectional):
    cell = _make(SRUCell, 5, 4, bidirectional=bidirectional, batch_first=batch_first,
                 layer_norm=True)
    out = cell.output_size
    x = torch.randn(3, 5, dtype=F64)
    c0 = torch.randn(3, out, dtype=F64)
    time_axis = 1 if batch_first else 0
    wh = torch.randn(3, out, dtype=F64)
    wc = torch.randn(3, out, dtype=F64)
    h1, c1, gx1, gc1, gp1 = _forward_backward(cell, x, c0, wh=wh, wc=wc)
    assert h1.shape == (3, out) and c1.shape == (3, out)
    h3, c3, gx3, gc3, gp3 = _forward_backward(cell, x.unsqueeze(time_axis), c0,
                                              wh=wh.unsqueeze(time_axis), wc=wc)
    torch.testing.assert_close(h1, h3.squeeze(time_axis))
    torch.testing.assert_close(c1, c3)
    torch.testing.assert_close(gx1, gx3.squeeze(time_axis))
    torch.testing.assert_close(gc1, gc3)
    _assert_params_close(gp1, gp3)
    # a (B,) mask_pad for one step: the padded row keeps c0 and outputs zero
    h, c = cell(x, c0, mask_pad=torch.tensor([False, True, False]))
    assert h[1].abs().max() == 0
    torch.testing.assert_close(c[1], c0[1])
    torch.testing.assert_close(c[0], c1[0])


# -- c0 ----------------------------------------------------------------------------------------------

def test_c0_none_equals_zeros_and_c0_matters():
    m = _make(SRU, 5, 4, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 5, dtype=F64)
    h0, c0_out = m(x)
    hz, cz = m(x, torch.zeros(2, 3, 8, dtype=F64))
    torch.testing.assert_close(h0, hz)
    torch.testing.assert_close(c0_out, cz)
    hr, cr = m(x, torch.randn(2, 3, 8, dtype=F64))
    assert not torch.allclose(h0, hr) and not torch.allclose(c0_out, cr)


def test_c0_goes_to_its_layer():
    m = _make(SRU, 5, 4, num_layers=3, bidirectional=True, layer_norm=True)
    x = torch.randn(4, 3, 5, dtype=F64)
    c0 = torch.randn(3, 3, 8, dtype=F64)
    h, c = m(x, c0)
    prev, finals = x, []
    for i, layer in enumerate(m.rnn_lst):
        prev, ci = layer(prev, c0[i])
        finals.append(ci)
    torch.testing.assert_close(h, prev)
    torch.testing.assert_close(c, torch.stack(finals))


def test_c0_of_another_float_dtype_is_converted():
    m = _make(SRU, 5, 4, num_layers=2)
    x = torch.randn(4, 3, 5, dtype=F64)
    c0 = torch.randn(2, 3, 4, dtype=F64)
    h, c = m(x, c0)
    c0_32 = c0.float().requires_grad_(True)
    h32, c32 = m(x, c0_32)
    assert h32.dtype == F64
    torch.testing.assert_close(h32, h, rtol=1e-6, atol=1e-6)
    c32.sum().backward()
    assert c0_32.grad.dtype == torch.float32 and c0_32.grad.abs().sum() > 0


def test_empty_sequence_returns_c0():
    m = _make(SRU, 5, 4, num_layers=2, bidirectional=True)
    c0 = torch.randn(2, 3, 8, dtype=F64, requires_grad=True)
    x = torch.zeros(0, 3, 5, dtype=F64, requires_grad=True)
    h, c = m(x, c0)
    assert h.shape == (0, 3, 8)
    torch.testing.assert_close(c, c0.detach())
    (2 * c).sum().backward()
    torch.testing.assert_close(c0.grad, torch.full_like(c0, 2.0))


# -- nn.LSTM-compatible c ---------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_nn_rnn_compatible_return(bidirectional, num_layers):
    hidden, B = 4, 3
    plain = _make(SRU, 5, hidden, num_layers=num_layers, bidirectional=bidirectional)
    compat = _clone(plain, nn_rnn_compatible_return=True)
    x = torch.randn(6, B, 5, dtype=F64)
    h, c = plain(x)
    h2, c2 = compat(x)
    torch.testing.assert_close(h2, h)
    lstm = nn.LSTM(5, hidden, num_layers=num_layers, bidirectional=bidirectional)
    _, (h_n, c_n) = lstm(x.float())
    assert c2.shape == c_n.shape == h_n.shape
    dirs = 2 if bidirectional else 1
    for layer in range(num_layers):
        for d in range(dirs):
            # nn.LSTM's h_n[layer * dirs + d] is layer `layer`, direction d
            torch.testing.assert_close(c2[layer * dirs + d],
                                       c[layer, :, d * hidden:(d + 1) * hidden])


def test_bidirectional_final_state_matches_step_by_step():
    """The forward half of c is the state after step L-1, the reverse half the state after step 0
    (the reverse direction reads L-1 down to 0): compare with one-step calls in each order."""
    hidden, B, L = 4, 3, 6
    cell = _make(SRUCell, 5, hidden, bidirectional=True)
    x = torch.randn(L, B, 5, dtype=F64)
    c0 = torch.randn(B, 2 * hidden, dtype=F64)
    h, c = cell(x, c0)
    state = c0
    for t in range(L):
        h_t, state = cell(x[t], state)
        torch.testing.assert_close(h_t[:, :hidden], h[t, :, :hidden])
    torch.testing.assert_close(c[:, :hidden], state[:, :hidden])
    state = c0
    for t in range(L - 1, -1, -1):
        h_t, state = cell(x[t], state)
        torch.testing.assert_close(h_t[:, hidden:], h[t, :, hidden:])
    torch.testing.assert_close(c[:, hidden:], state[:, hidden:])


# -- dropout ------------------------------------------------------------------------------------------

@pytest.fixture
def recurrence_spy(monkeypatch):
    calls = []
    real = ops.recurrence

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "recurrence", spy)
    return calls


def test_dropout_mask_passed_to_recurrence(recurrence_spy):
    p = 0.5
    m = SRU(5, 4, num_layers=3, dropout=p, bidirectional=True)
    x = torch.randn(6, 3, 5)
    torch.manual_seed(0)
    m.train()(x)
    assert len(recurrence_spy) == 3
    for layer, kwargs in enumerate(recurrence_spy[:2]):
        mask = kwargs["mask_h"]
        assert mask is not None and mask.shape == (3, 8), f"layer {layer}"
        values = set(mask.unique().tolist())
        assert values <= {0.0, 1 / (1 - p)} and len(values) == 2, values
        assert not (mask == mask[:1]).all(), "one mask row shared by the whole batch"
    assert recurrence_spy[2]["mask_h"] is None  # no dropout after the last layer
    recurrence_spy.clear()
    m.eval()(x)
    assert [kwargs["mask_h"] for kwargs in recurrence_spy] == [None] * 3
    recurrence_spy.clear()
    SRU(5, 4, num_layers=2).train()(x)
    assert [kwargs["mask_h"] for kwargs in recurrence_spy] == [None] * 2


@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_mask_is_constant_over_time(bidirectional):
    """With has_skip_term=False, h = g * r * m: h_train / h_eval is the mask m, which must be one
    value (0 or 1/(1-p)) per (batch, column), the same at every step; c is not dropped."""
    p = 0.5
    cell = _make(SRUCell, 4, 8, dropout=p, has_skip_term=False, bidirectional=bidirectional)
    x = torch.randn(9, 5, 4, dtype=F64)
    torch.manual_seed(1)
    h_train, c_train = cell.train()(x)
    with torch.no_grad():
        h_eval, c_eval = cell.eval()(x)
    torch.testing.assert_close(c_train.detach(), c_eval)
    ratio = h_train.detach() / h_eval
    per_column = ratio[0]
    assert torch.allclose(ratio, per_column.expand_as(ratio)), "mask changes over time"
    zero = per_column.abs() < 1e-9
    scaled = (per_column - 1 / (1 - p)).abs() < 1e-9
    assert bool((zero | scaled).all()), per_column
    assert zero.any() and scaled.any()


def test_eval_is_deterministic_and_dropout_free():
    m = _make(SRU, 5, 4, num_layers=3, dropout=0.5, rnn_dropout=0.3, bidirectional=True)
    no_dropout = _clone(m, dropout=0.0, rnn_dropout=0.0)
    x = torch.randn(6, 3, 5, dtype=F64)
    m.eval()
    no_dropout.eval()
    h1, c1 = m(x)
    h2, c2 = m(x)
    assert torch.equal(h1, h2) and torch.equal(c1, c2)
    h3, c3 = no_dropout(x)
    torch.testing.assert_close(h1, h3)
    torch.testing.assert_close(c1, c3)
    m.train()
    ht1, _ = m(x)
    ht2, _ = m(x)
    assert not torch.allclose(ht1, ht2)


# -- v1 --------------------------------------------------------------------------------------------

def test_v1_weight_c_is_zero_and_frozen():
    m = _make(SRU, 5, 4, num_layers=2, v1=True, bidirectional=True)
    for cell in m.rnn_lst:
        assert not cell.weight_c.requires_grad
        assert cell.weight_c.abs().max() == 0
    _, _, gx, _, grads = _forward_backward(m, torch.randn(4, 3, 5, dtype=F64))
    assert all(not n.endswith("weight_c") for n in grads)
    assert all(cell.weight_c.grad is None for cell in m.rnn_lst)
    assert "rnn_lst.0.bias" in grads
    m.reset_parameters()
    assert not m.rnn_lst[0].weight_c.requires_grad
    # v1 is the recurrence with weight_c = 0
    v2 = _clone(m, v1=False)
    with torch.no_grad():
        for cell in v2.rnn_lst:
            cell.weight_c.zero_()
    x = torch.randn(4, 3, 5, dtype=F64)
    torch.testing.assert_close(m(x)[0], v2(x)[0])
    torch.testing.assert_close(m(x)[1], v2(x)[1])


# -- initialisation -----------------------------------------------------------------------------------

def _slots(cell):
    w = cell.weight.detach().view(cell.weight.shape[0], -1, cell.hidden_size, cell.num_matrices)
    return [w[..., i] for i in range(cell.num_matrices)]


def _var_close(t, expected, rel=0.08):
    var = t.var().item()
    assert abs(var - expected) < rel * expected, (var, expected)


@pytest.mark.parametrize("highway_bias", [0.0, -2.0, 1.0])
def test_reset_parameters_statistics(highway_bias):
    torch.manual_seed(0)
    n = 256
    cell = SRUCell(n, n, highway_bias=highway_bias, rescale=True)  # k = 3
    assert cell.num_matrices == 3
    assert torch.equal(cell.bias[:n], torch.zeros(n))
    assert torch.equal(cell.bias[n:], torch.full((n,), highway_bias))
    scale = math.sqrt(1 + 2 * math.exp(highway_bias))
    assert cell.scale_x.item() == pytest.approx(scale, rel=1e-6)
    u0, u1, u2 = _slots(cell)
    _var_close(u0, 1 / n)
    _var_close(u1, 0.5 / n)
    _var_close(u2, 0.5 / n)
    assert u0.abs().max() <= math.sqrt(3 / n) + 1e-6
    _var_close(cell.weight_c.detach(), 0.5)
    assert cell.weight_c.abs().max() <= math.sqrt(1.5) + 1e-6

    cell4 = SRUCell(128, n, highway_bias=highway_bias, rescale=True)  # k = 4
    assert cell4.num_matrices == 4
    _var_close(_slots(cell4)[0], 1 / 128)
    _var_close(_slots(cell4)[3], scale ** 2 / 128)
    assert SRUCell(128, n, highway_bias=highway_bias, rescale=False).scale_x.item() == 1.0
    no_skip = SRUCell(n, n, highway_bias=highway_bias, rescale=True, has_skip_term=False)
    assert no_skip.scale_x.item() == 1.0


def test_reset_parameters_scalings():
    torch.manual_seed(0)
    n = 256
    _var_close(_slots(SRUCell(n, n, layer_norm=True))[0], 0.01 / n)
    _var_close(_slots(SRUCell(n, n, dropout=0.36))[0], 0.64 / n)
    _var_close(_slots(SRUCell(n, n, dropout=0.36))[1], 0.5 / n)
    _var_close(_slots(SRUCell(n, n, rnn_dropout=0.36))[1], 0.64 * 0.5 / n)
    _var_close(_slots(SRUCell(n, n, v1=True))[1], 1 / n)
    assert SRUCell(n, n, weight_c_init=0.25).weight_c.abs().max() <= 0.25
    proj = SRUCell(n, n, n_proj=64)
    _var_close(proj.weight_proj.detach(), 1 / n)
    _var_close(_slots(proj)[0], 1 / 64)
    # SRU's default rescale is False, SRUCell's is True (as in sru 2.6)
    assert SRU(n, n, highway_bias=-1.0).rnn_lst[0].scale_x.item() == 1.0
    assert SRU(n, n, highway_bias=-1.0, rescale=True).rnn_lst[0].scale_x.item() > 1.0


def test_reset_parameters_restores_init():
    m = SRU(5, 4, num_layers=2, highway_bias=-1.0, layer_norm=True,
            proj_input_to_hidden_first=True)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(3.0)
    m.reset_parameters()
    for cell in m.rnn_lst:
        assert torch.equal(cell.bias[4:], torch.full((4,), -1.0))
        assert cell.weight.abs().max() < 3.0
        assert torch.equal(cell.layer_norm.weight, torch.ones(cell.layer_norm.weight.shape))
    assert m.input_to_hidden.weight.abs().max() < 3.0


# -- argument errors ------------------------------------------------------------------------------------

def _bad_inputs():
    x = torch.randn(3, 2, 5)
    return [
        ("wrong input_size", dict(input=torch.randn(3, 2, 6)), "input"),
        ("rank 1", dict(input=torch.randn(5)), "input"),
        ("rank 4", dict(input=torch.randn(3, 2, 1, 5)), "input"),
        ("int dtype", dict(input=torch.randint(0, 3, (3, 2, 5))), "input"),
        ("meta input", dict(input=torch.randn(3, 2, 5, device="meta")), "input"),
        ("c0 shape", dict(input=x, c0="bad-shape"), "c0"),
        ("c0 device", dict(input=x, c0="meta"), "c0"),
        ("mask_pad shape", dict(input=x, mask_pad=torch.zeros(2, 3, dtype=torch.bool)),
         "mask_pad"),
        ("mask_pad rank", dict(input=x, mask_pad=torch.zeros(3, 2, 1, dtype=torch.bool)),
         "mask_pad"),
        ("mask_pad device", dict(input=x, mask_pad=torch.zeros(3, 2, device="meta")),
         "mask_pad"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
@pytest.mark.parametrize("which", ["SRU", "SRU-proj-first", "SRU-batch_first", "SRUCell"])
def test_bad_input_errors_name_the_argument(which, case):
    _, kwargs, name = case
    kwargs = dict(kwargs)
    if which == "SRUCell":
        module = SRUCell(5, 4, bidirectional=True)
        c0_shape, bad_c0_shape = (2, 8), (2, 4)
    else:
        module = SRU(5, 4, num_layers=2, bidirectional=True,
                     proj_input_to_hidden_first=which == "SRU-proj-first",
                     batch_first=which == "SRU-batch_first")
        c0_shape, bad_c0_shape = (2, 2, 8), (2, 2, 4)
    if which == "SRU-batch_first":
        if kwargs["input"].dim() == 3:
            kwargs["input"] = kwargs["input"].transpose(0, 1)
        if "mask_pad" in kwargs and kwargs["mask_pad"].dim() == 2:
            kwargs["mask_pad"] = kwargs["mask_pad"].t()
        if case[0] == "mask_pad shape":  # a (L, B) mask where (B, L) is expected
            kwargs["mask_pad"] = torch.zeros(3, 2, dtype=torch.bool)
    if kwargs.get("c0") == "bad-shape":
        kwargs["c0"] = torch.zeros(bad_c0_shape)
    elif kwargs.get("c0") == "meta":
        kwargs["c0"] = torch.zeros(c0_shape, device="meta")
    if which == "SRUCell" and case[0] == "rank 1":
        kwargs["input"] = torch.randn(5)  # rank 2 is valid for the cell; rank 1 is not
    with pytest.raises((ValueError, TypeError), match=f"^{name}\\b"):
        module(kwargs.pop("input"), **kwargs)


def test_sru_rejects_rank2_input_and_non_tensor():
    m = SRU(5, 4)
    with pytest.raises(ValueError, match="^input"):
        m(torch.randn(2, 5))
    with pytest.raises(TypeError, match="^input"):
        m([[0.0] * 5])


# -- serialisation ------------------------------------------------------------------------------------

CONFIGS = [
    dict(num_layers=2),
    dict(num_layers=3, bidirectional=True, projection_size=3, layer_norm=True,
         proj_input_to_hidden_first=True, rescale=True, highway_bias=-1.0),
    dict(num_layers=2, v1=True, normalize_after=True, layer_norm=True, batch_first=True),
]


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_state_dict_round_trip(config):
    a = _make(SRU, 9, 4, seed=1, **CONFIGS[config])
    b = _make(SRU, 9, 4, seed=2, **CONFIGS[config])
    x = torch.randn(5, 3, 9, dtype=F64)
    assert not torch.allclose(a(x)[0], b(x)[0])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(b(x)[1], a(x)[1], rtol=0, atol=0)
    for name, p in b.named_parameters():
        assert p.requires_grad == dict(a.named_parameters())[name].requires_grad, name


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_torch_save_load_module(config):
    a = _make(SRU, 9, 4, seed=1, **CONFIGS[config])
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    b = torch.load(buf, weights_only=False)
    assert type(b) is SRU and b.batch_first == a.batch_first
    x = torch.randn(5, 3, 9, dtype=F64)
    torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)
    _, _, gxa, _, gpa = _forward_backward(a, x)
    _, _, gxb, _, gpb = _forward_backward(b, x)
    torch.testing.assert_close(gxb, gxa)
    _assert_params_close(gpb, gpa)


# -- CPU implementations ----------------------------------------------------------------------------------

@pytest.fixture
def torch_fallback(monkeypatch):
    monkeypatch.setattr(implementation, "for_torch_cpu", lambda: "torch")
    monkeypatch.setattr(implementation, "_announced", set())


def _run_config(dtype):
    torch.manual_seed(5)
    m = _make(SRU, 5, 4, dtype=dtype, num_layers=3, bidirectional=True, dropout=0.3,
              layer_norm=True, use_tanh=True, rescale=True, highway_bias=-1.0)
    x = torch.randn(7, 3, 5, dtype=dtype)
    c0 = torch.randn(3, 3, 8, dtype=dtype)
    torch.manual_seed(6)  # the same dropout masks for both implementations
    return _forward_backward(m, x, c0, _mask_from_lengths([7, 3, 5], 7))


@pytest.mark.skipif(implementation.for_torch_cpu() != "host",
                    reason="no C++ compiler: only the PyTorch fallback exists here")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_host_kernels_and_torch_fallback_agree(dtype, monkeypatch):
    host = _run_config(dtype)
    monkeypatch.setattr(implementation, "for_torch_cpu", lambda: "torch")
    monkeypatch.setattr(implementation, "_announced", {"torch"})
    fallback = _run_config(dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for what, a, b in zip(("h", "c", "grad x", "grad c0"), host[:4], fallback[:4]):
        torch.testing.assert_close(b, a, msg=lambda m: f"{what}: {m}", **tol)
    _assert_params_close(fallback[4], host[4], **tol)


def test_torch_fallback_notice_is_one_warning(torch_fallback):
    m = SRU(5, 4)
    x = torch.randn(3, 2, 5)
    with pytest.warns(UserWarning, match="vectorized PyTorch implementation") as record:
        m(x)
    notices = [w for w in record if "sru_cupy" in str(w.message)]
    assert len(notices) == 1
    assert "\n" not in str(notices[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once per process, not per call
        m(x)


@pytest.mark.skipif(implementation.for_torch_cpu() != "host",
                    reason="no C++ compiler: only the PyTorch fallback exists here")
def test_host_kernels_give_no_notice(monkeypatch):
    monkeypatch.setattr(implementation, "_announced", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SRU(5, 4)(torch.randn(3, 2, 5))


# -- autocast ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("amp_recurrence_fp16, expected", [(True, torch.bfloat16),
                                                           (False, torch.float32)])
def test_cpu_autocast_recurrence_dtype(amp_recurrence_fp16, expected):
    torch.manual_seed(0)
    m = SRU(5, 4, num_layers=2, bidirectional=True, amp_recurrence_fp16=amp_recurrence_fp16)
    x = torch.randn(6, 3, 5)
    ref_h, ref_c = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = m(x)
    assert h.dtype == expected and c.dtype == expected
    torch.testing.assert_close(h.float(), ref_h, rtol=0.05, atol=0.05)
    torch.testing.assert_close(c.float(), ref_c, rtol=0.05, atol=0.05)
    h.float().sum().backward()
    assert m.rnn_lst[0].weight.grad.dtype == torch.float32


# -- TorchScript ----------------------------------------------------------------------------------

class _SplitUV(nn.Module):
    """A transform module returning (U, V), scriptable."""

    def __init__(self, n_in: int, u_width: int, v_width: int):
        super().__init__()
        self.u = nn.Linear(n_in, u_width, bias=False)
        self.v = nn.Linear(n_in, v_width)

    def forward(self, x: torch.Tensor):
        return self.u(x), self.v(x)


#: One option (or a combination) of sru 2.6 per entry: (class, args, kwargs).
SCRIPT_CONFIGS = {
    "sru-default": (SRU, (5, 4), dict()),
    "sru-bi-3layers": (SRU, (5, 4), dict(num_layers=3, bidirectional=True)),
    "sru-projection-ln": (SRU, (9, 4), dict(projection_size=3, layer_norm=True)),
    "sru-ln-after-bi": (SRU, (5, 4), dict(layer_norm=True, normalize_after=True,
                                          bidirectional=True)),
    "sru-rescale-highway-tanh": (SRU, (4, 4), dict(rescale=True, highway_bias=-1.0,
                                                   use_tanh=True)),
    "sru-noskip-v1": (SRU, (5, 4), dict(has_skip_term=False, v1=True)),
    "sru-compat-return": (SRU, (5, 4), dict(num_layers=2, bidirectional=True,
                                            nn_rnn_compatible_return=True)),
    "sru-proj-first": (SRU, (5, 3), dict(proj_input_to_hidden_first=True, weight_c_init=0.5)),
    "sru-batch-first": (SRU, (5, 4), dict(batch_first=True, bidirectional=True)),
    "sru-dropout": (SRU, (5, 4), dict(num_layers=3, dropout=0.3, rnn_dropout=0.2)),
    "sru-custom_m": (SRU, (4, 4), dict(num_layers=2, custom_m=nn.Linear(4, 12, bias=False))),
    "cell-default": (SRUCell, (5, 4), dict()),
    "cell-bi-nproj": (SRUCell, (9, 6), dict(n_proj=3, bidirectional=True)),
    "cell-k3-noskip-tanh": (SRUCell, (4, 4), dict(has_skip_term=False, use_tanh=True)),
    "cell-custom_m-UV": (SRUCell, (5, 4), dict(custom_m=_SplitUV(5, 16, 8))),
    "cell-custom_m-UV-bi-v1": (SRUCell, (5, 4), dict(custom_m=_SplitUV(5, 32, 16),
                                                       bidirectional=True, v1=True)),
}


def _script_inputs(module, L=6, B=3, with_c0=True, mask=True, dtype=F64):
    g = torch.Generator().manual_seed(4)
    layers = getattr(module, "num_layers", None)
    batch_first = module.batch_first
    x = torch.randn((B, L, module.input_size) if batch_first else (L, B, module.input_size),
                    generator=g, dtype=dtype)
    c_shape = (B, module.output_size) if layers is None else (layers, B, module.output_size)
    c0 = torch.randn(c_shape, generator=g, dtype=dtype) if with_c0 else None
    mask_pad = _mask_from_lengths([L, 2, 4][:B], L) if mask else None
    if mask_pad is not None and batch_first:
        mask_pad = mask_pad.t()
    return x, c0, mask_pad


def _assert_scripted_equals_eager(module, x, c0, mask_pad, train):
    scripted = torch.jit.script(module)
    module.train(train)
    scripted.train(train)
    torch.manual_seed(21)
    expected = _forward_backward(module, x, c0, mask_pad)
    torch.manual_seed(21)
    got = _forward_backward(scripted, x, c0, mask_pad)
    for name, a, b in zip(("h", "c", "grad input", "grad c0"), got[:4], expected[:4]):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert expected[4], "no parameter gradients"
    _assert_params_close(got[4], expected[4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(SCRIPT_CONFIGS))
def test_torchscript_matches_eager(name, train):
    """torch.jit.script(model) gives the eager model's outputs and gradients (CPU)."""
    cls, args, kwargs = SCRIPT_CONFIGS[name]
    module = _make(cls, *args, **kwargs)
    x, c0, mask_pad = _script_inputs(module)
    _assert_scripted_equals_eager(module, x, c0, mask_pad, train)


def test_torchscript_without_c0_and_mask_and_one_step():
    cell = _make(SRUCell, 5, 4, bidirectional=True)
    scripted = torch.jit.script(cell)
    x = torch.randn(3, 5, dtype=F64)  # one step, (B, input_size)
    h, c = scripted(x)
    h_eager, c_eager = cell(x)
    assert h.shape == (3, 8)
    torch.testing.assert_close(h, h_eager, rtol=0, atol=0)
    torch.testing.assert_close(c, c_eager, rtol=0, atol=0)
    sru = _make(SRU, 5, 4)
    x = torch.randn(1, 2, 5, dtype=F64)
    torch.testing.assert_close(torch.jit.script(sru)(x)[0], sru(x)[0], rtol=0, atol=0)


def test_torchscript_save_load_and_errors(tmp_path):
    module = _make(SRU, 5, 4, num_layers=2, bidirectional=True)
    path = tmp_path / "sru.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    loaded = torch.jit.load(str(path))
    x, c0, mask_pad = _script_inputs(module)
    torch.testing.assert_close(loaded(x, c0, mask_pad)[0], module(x, c0, mask_pad)[0],
                               rtol=0, atol=0)
    # The argument checks run in TorchScript too and name the argument.
    with pytest.raises(Exception, match="input: expected last axis input_size = 5"):
        loaded(torch.randn(3, 2, 6, dtype=F64))
    with pytest.raises(Exception, match=r"c0: expected shape \(num_layers, B, output_size\)"):
        loaded(x, torch.zeros(2, 3, 4, dtype=F64))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sru-bi-3layers", "sru-projection-ln", "cell-custom_m-UV"])
def test_torchscript_matches_eager_on_gpu(name):
    if not torch.cuda.is_available():
        pytest.skip("gpu: this torch build has no CUDA device")
    cls, args, kwargs = SCRIPT_CONFIGS[name]
    module = _make(cls, *args, **kwargs).cuda()
    x, c0, mask_pad = (None if t is None else t.cuda() for t in _script_inputs(module))
    _assert_scripted_equals_eager(module, x, c0, mask_pad, train=True)



def _aten_calls(fn, names, min_numel, shapes_of=None):
    """How many times each aten op of ``names`` runs inside ``fn()`` on a first argument of at
    least ``min_numel`` elements (torch.profiler, CPU); with ``shapes_of``, also the list of
    first-argument shapes of that op's counted calls (under the key "<name> shapes")."""
    import math
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    counted = [e for e in prof.events() if e.input_shapes and e.input_shapes[0]
               and math.prod(e.input_shapes[0]) >= min_numel]
    calls = {name: sum(e.name == f"aten::{name}" for e in counted) for name in names}
    if shapes_of is not None:
        calls[f"{shapes_of} shapes"] = sorted(list(e.input_shapes[0]) for e in counted
                                              if e.name == f"aten::{shapes_of}")
    return calls


@pytest.mark.parametrize("route", ["matmul", "onednn"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("cls,n_in", [(SRUCell, 176), (SRU, 176), (SRU, 180)],
                         ids=["cell-k3", "sru-k3", "sru-k4"])
def test_gemm_path_makes_no_extra_copies(cls, n_in, batch_first, route, torch_threads,
                                         monkeypatch):
    """Forward: one 2-D GEMM (x W over all steps), and one copy of the input only where it is
    batch-first (the transpose, shared by the GEMM and the skip input). Backward: one GEMM for
    the weight's gradient and one for the input's (2-D, not batched), no zero fill, and no copy
    beyond the batch-first layout's two transposes (of h's gradient, of the input's). Through
    oneDNN (cpu_gemm), the GEMM is one 1x1 transposed convolution in oneDNN (not PyTorch's own
    slow_conv_transpose2d) and its backward one call, with the same copies: none of the input,
    the weight or U, and one of the weight's gradient (n_in x k d values, 1 / (L B) of the
    product's work) which PyTorch makes inside the convolution's backward. Tensors of fewer than
    4 L B values (the sums of the parameter gradients) are not counted."""
    monkeypatch.setenv(cpu_gemm.ROUTE_ENV_VAR, route)
    # 128 rows of 176 values: oneDNN runs the convolution with one thread (16 images or more)
    # and with two (more than 20480 values)
    L, B, d = 16, 8, 176
    module = cls(n_in, d, batch_first=batch_first) if cls is SRUCell else cls(
        n_in, d, num_layers=1, batch_first=batch_first)
    x = torch.randn((B, L, n_in) if batch_first else (L, B, n_in), requires_grad=True)
    module(x)[0].sum().backward()  # first calls (kernel load) outside the counts
    x.grad = None
    module.zero_grad(set_to_none=True)
    names = ("mm", "bmm", "convolution", "slow_conv_transpose2d", "convolution_backward",
             "slow_conv_transpose2d_backward", "copy_", "zero_", "fill_")
    onednn = int(route == "onednn")
    copied = [[L, B, n_in]] * int(batch_first)
    out = {}
    forward = _aten_calls(lambda: out.update(h=module(x)[0]), names, 4 * L * B,
                          shapes_of="copy_")
    assert forward == {"mm": 1 - onednn, "bmm": 0, "convolution": onednn,
                       "slow_conv_transpose2d": 0, "convolution_backward": 0,
                       "slow_conv_transpose2d_backward": 0, "copy_": len(copied), "zero_": 0,
                       "fill_": 0, "copy_ shapes": copied}, forward
    grad = torch.randn(out["h"].shape)  # contiguous in the caller's layout
    backward = _aten_calls(lambda: out["h"].backward(grad), names, 4 * L * B,
                           shapes_of="copy_")
    weight = module.weight if cls is SRUCell else module.rnn_lst[0].weight
    copied = sorted([[L, B, d]] * int(batch_first) + [[B, L, n_in]] * int(batch_first)
                    + [list(weight.shape) + [1, 1]] * onednn)
    assert backward == {"mm": 2 * (1 - onednn), "bmm": 0, "convolution": 0,
                        "slow_conv_transpose2d": 0, "convolution_backward": onednn,
                        "slow_conv_transpose2d_backward": 0, "copy_": len(copied),
                        "zero_": 0, "fill_": 0, "copy_ shapes": copied}, backward


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_matches_plain_backward(reentrant):
    """torch.utils.checkpoint reruns the forward during backward (the eager autograd node of the
    recurrence is recorded a second time): the same gradients as without checkpointing."""
    import torch.utils.checkpoint
    torch.manual_seed(0)
    model = SRU(5, 4, num_layers=2, bidirectional=True, layer_norm=True, dropout=0.0)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    model = model.double()
    weights = torch.randn(6, 3, 8, dtype=torch.float64)

    def run(checkpointed):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        if checkpointed:
            h, _ = torch.utils.checkpoint.checkpoint(model, xi, use_reentrant=reentrant)
        else:
            h, _ = model(xi)
        (h * weights).sum().backward()
        return [xi.grad] + [p.grad.clone() for p in model.parameters()]

    for want, got in zip(run(False), run(True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
