"""Parity of ``sru_cupy.SRU`` / ``sru_cupy.SRUCell`` with the ``sru`` package 2.6 (the oracle).

Both modules get the same weights (``sru``'s state_dict loaded with ``strict=True``), run on the
CPU in train mode with dropout 0 (so both are deterministic), and must agree on h, the final c and
the gradients of the input, c0 and every parameter after backward of a random linear functional
of (h, c). ``sru`` 2.6 runs a naive PyTorch loop on the CPU when grad is enabled (it warns); that
loop is the oracle here.

``sru`` is installed by the ``test`` extra (``pip install -e .[test]``); it JIT-compiles a small
CPU extension with torch.utils.cpp_extension (needs ninja and a C++ compiler) at first import.
"""

import inspect
import warnings
from pathlib import Path

import pytest
import torch

import sru_cupy
from parity_helpers import assert_close, padding_mask, perturb
from sru3_child import run_oracle

with warnings.catch_warnings():
    # sru 2.6 warns at import that its CUDA kernels could not be compiled (no CUDA here).
    warnings.simplefilter("ignore")
    sru = pytest.importorskip(
        "sru", minversion="2.6",
        reason="the parity oracle `sru` (2.6.0) is not installed; install the test extra: "
               "pip install -e .[test]")

if not sru.__version__.startswith("2.6."):
    pytest.skip(f"parity is defined against sru 2.6.x (the test extra pins 2.6.0), found "
                f"{sru.__version__}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Running SRU on CPU with grad_enabled=True:UserWarning",
    "ignore:rnn_dropout > 0 is deprecated:UserWarning",
    "ignore:use_tanh = True is deprecated:UserWarning",
)

L, B = 7, 3


def _pair(oracle_cls, ours_cls, args, kwargs, dtype, seed=0):
    torch.manual_seed(seed)
    oracle = oracle_cls(*args, **kwargs).to(dtype)
    perturb(oracle, seed + 1)
    ours = ours_cls(*args, **kwargs).to(dtype)
    ours.load_state_dict(oracle.state_dict(), strict=True)
    oracle.train()
    ours.train()
    return oracle, ours


def _run(module, x, c0, mask_pad, weights):
    x = x.detach().clone().requires_grad_(True)
    c0 = None if c0 is None else c0.detach().clone().requires_grad_(True)
    h, c = module(x, c0, mask_pad=mask_pad)
    wh, wc = weights
    (h * wh).sum().add((c * wc).sum()).backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return h.detach(), c.detach(), x.grad, None if c0 is None else c0.grad, grads


def _compare(oracle, ours, x, c0, mask_pad, dtype, out_shape_h, out_shape_c, oracle_names=None):
    """``oracle_names`` maps sru's parameter names to ours where they differ."""
    g = torch.Generator().manual_seed(123)
    weights = (torch.randn(out_shape_h, generator=g, dtype=dtype),
               torch.randn(out_shape_c, generator=g, dtype=dtype))
    ho, co, gxo, gc0o, gpo = _run(oracle, x, c0, mask_pad, weights)
    hs, cs, gxs, gc0s, gps = _run(ours, x, c0, mask_pad, weights)
    if oracle_names is not None:
        gpo = {oracle_names(name): grad for name, grad in gpo.items()}
    assert hs.dtype == ho.dtype == dtype
    assert_close(hs.reshape(ho.shape), ho, "h", dtype)
    assert_close(cs, co, "final c", dtype)
    assert_close(gxs, gxo, "grad of input", dtype)
    if c0 is not None:
        assert_close(gc0s, gc0o, "grad of c0", dtype)
    assert gps.keys() == gpo.keys()
    for name in gpo:
        if gpo[name] is None:
            assert gps[name] is None, f"{name}: sru has no gradient (frozen), sru_cupy has one"
            continue
        assert gps[name] is not None, f"{name}: no gradient in sru_cupy"
        assert_close(gps[name], gpo[name], f"grad of {name}", dtype)
    # the functional is not degenerate: the input gradient is not all zero
    assert gxo.abs().sum() > 0


SRU_CONFIGS = {
    "uni-1layer-k4": (5, 4, dict(num_layers=1)),
    "uni-3layers-k3": (4, 4, dict(num_layers=3)),
    "bi-1layer-k4": (5, 4, dict(num_layers=1, bidirectional=True)),
    "bi-3layers-k3": (8, 4, dict(num_layers=3, bidirectional=True)),
    "projection": (8, 6, dict(num_layers=2, projection_size=3)),
    "projection-bi": (9, 4, dict(num_layers=2, projection_size=3, bidirectional=True)),
    "layer_norm-before": (5, 4, dict(num_layers=2, layer_norm=True)),
    "layer_norm-after": (5, 4, dict(num_layers=2, layer_norm=True, normalize_after=True,
                                    bidirectional=True)),
    "rescale-k3": (4, 4, dict(num_layers=2, rescale=True, highway_bias=-1.5)),
    "rescale-k4": (5, 4, dict(num_layers=2, rescale=True, highway_bias=-1.5)),
    "no-rescale-k3": (4, 4, dict(num_layers=2, rescale=False, highway_bias=-1.5)),
    "rescale-bi-k3": (8, 4, dict(num_layers=2, rescale=True, highway_bias=0.7,
                                 bidirectional=True)),
    "no-skip": (5, 4, dict(num_layers=2, has_skip_term=False)),
    "no-skip-bi-k3": (8, 4, dict(num_layers=2, has_skip_term=False, bidirectional=True,
                                 rescale=True)),
    "v1": (5, 4, dict(num_layers=2, v1=True)),
    "v1-bi-k3": (8, 4, dict(num_layers=2, v1=True, bidirectional=True)),
    "proj_input_to_hidden_first": (5, 4, dict(num_layers=2, proj_input_to_hidden_first=True)),
    "proj_input_to_hidden_first-bi": (5, 3, dict(num_layers=2, bidirectional=True,
                                                proj_input_to_hidden_first=True)),
    "use_tanh": (5, 4, dict(num_layers=2, use_tanh=True, bidirectional=True)),
    "nn_rnn_compatible_return": (5, 4, dict(num_layers=3, bidirectional=True,
                                            nn_rnn_compatible_return=True)),
    "everything": (9, 4, dict(num_layers=3, bidirectional=True, projection_size=3,
                              layer_norm=True, rescale=True, highway_bias=-1.0, use_tanh=True,
                              proj_input_to_hidden_first=True)),
}


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask_pad"])
@pytest.mark.parametrize("name", list(SRU_CONFIGS))
def test_sru_parity(name, mask):
    input_size, hidden, kwargs = SRU_CONFIGS[name]
    dtype = torch.float64
    oracle, ours = _pair(sru.SRU, sru_cupy.SRU, (input_size, hidden), kwargs, dtype)
    dirs = 2 if kwargs.get("bidirectional") else 1
    layers = kwargs["num_layers"]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(L, B, input_size, generator=g, dtype=dtype)
    c0 = 0.5 * torch.randn(layers, B, hidden * dirs, generator=g, dtype=dtype)
    mask_pad = padding_mask([L, 4, 1], L) if mask else None
    c_shape = ((layers * dirs, B, hidden) if kwargs.get("nn_rnn_compatible_return")
               else (layers, B, hidden * dirs))
    _compare(oracle, ours, x, c0, mask_pad, dtype, (L, B, hidden * dirs), c_shape)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sru_parity_float32_no_c0(bidirectional):
    oracle, ours = _pair(sru.SRU, sru_cupy.SRU, (6, 5),
                         dict(num_layers=2, bidirectional=bidirectional, highway_bias=-0.5,
                              rescale=True), torch.float32)
    dirs = 2 if bidirectional else 1
    x = torch.randn(L, B, 6)
    _compare(oracle, ours, x, None, None, torch.float32, (L, B, 5 * dirs), (2, B, 5 * dirs))


def test_sru_parity_mask_pad_uint8():
    """sru users pass mask_pad as a uint8/byte tensor (1 = pad)."""
    oracle, ours = _pair(sru.SRU, sru_cupy.SRU, (5, 4), dict(num_layers=2, bidirectional=True),
                         torch.float64)
    x = torch.randn(L, B, 5, dtype=torch.float64)
    mask_pad = padding_mask([3, L, 5], L).to(torch.uint8)
    _compare(oracle, ours, x, None, mask_pad, torch.float64, (L, B, 8), (2, B, 8))


CELL_CONFIGS = {
    "default": (5, 4, dict()),  # SRUCell's rescale default is True in sru 2.6
    "k3-highway": (4, 4, dict(highway_bias=-1.0)),
    "no-rescale": (4, 4, dict(rescale=False, highway_bias=-1.0)),
    "bi": (8, 4, dict(bidirectional=True, highway_bias=0.5)),
    "n_proj": (9, 6, dict(n_proj=3)),
    "layer_norm": (5, 4, dict(layer_norm=True)),
    "layer_norm-after-bi": (5, 4, dict(layer_norm=True, normalize_after=True,
                                       bidirectional=True)),
    "no-skip": (5, 4, dict(has_skip_term=False)),
    "v1-tanh": (4, 4, dict(v1=True, use_tanh=True)),
    "weight_c_init": (5, 4, dict(weight_c_init=0.3)),
}


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask_pad"])
@pytest.mark.parametrize("name", list(CELL_CONFIGS))
def test_cell_parity(name, mask):
    input_size, hidden, kwargs = CELL_CONFIGS[name]
    dtype = torch.float64
    oracle, ours = _pair(sru.SRUCell, sru_cupy.SRUCell, (input_size, hidden), kwargs, dtype)
    out = hidden * (2 if kwargs.get("bidirectional") else 1)
    x = torch.randn(L, B, input_size, dtype=dtype)
    c0 = torch.randn(B, out, dtype=dtype)
    mask_pad = padding_mask([2, L, 5], L) if mask else None
    _compare(oracle, ours, x, c0, mask_pad, dtype, (L, B, out), (B, out))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cell_parity_one_step(bidirectional):
    """Rank-2 input (B, input_size) is one step; sru 2.6's CPU loop returns h as (1, B, out),
    sru_cupy as (B, out): the values must agree."""
    oracle, ours = _pair(sru.SRUCell, sru_cupy.SRUCell, (5, 4),
                         dict(bidirectional=bidirectional), torch.float64)
    out = 8 if bidirectional else 4
    x = torch.randn(B, 5, dtype=torch.float64)
    c0 = torch.randn(B, out, dtype=torch.float64)
    _compare(oracle, ours, x, c0, None, torch.float64, (B, out), (B, out))
    h, _ = ours(x, c0)
    assert h.shape == (B, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sru_parity_dropout_same_seed(dtype):
    """In train mode with dropout and rnn_dropout, both draw their masks from the global
    generator in the same order with the same shapes, so equal seeds give equal outputs. This
    checks that the mask is applied to h (variational, one per column) and rnn_dropout to the
    input, as in sru. In float64 the mask value 1/(1-p) must not be rounded to float32."""
    oracle, ours = _pair(sru.SRU, sru_cupy.SRU, (5, 4),
                         dict(num_layers=3, dropout=0.3, rnn_dropout=0.3, bidirectional=True),
                         dtype)
    x = torch.randn(L, B, 5, dtype=dtype)
    torch.manual_seed(11)
    ho, co = oracle(x)
    torch.manual_seed(11)
    hs, cs = ours(x)
    assert_close(hs, ho, "h with dropout", dtype)
    assert_close(cs, co, "final c with dropout", dtype)
    # and the dropout did something: eval mode differs
    with torch.no_grad():
        he, _ = ours.eval()(x)
    assert not torch.allclose(he, hs)


STATE_DICT_CONFIGS = [
    (5, 4, dict()),
    (4, 4, dict(num_layers=3, bidirectional=True)),
    (8, 6, dict(projection_size=3, layer_norm=True)),
    (8, 6, dict(projection_size=7)),  # not smaller than the output: no projection
    (5, 4, dict(proj_input_to_hidden_first=True, layer_norm=True, normalize_after=True)),
    (5, 4, dict(v1=True, has_skip_term=False, rescale=True, highway_bias=-2.0)),
    (5, 4, dict(rescale=True, highway_bias=-2.0, dropout=0.1, rnn_dropout=0.1)),
]


@pytest.mark.parametrize("cls_name", ["SRU", "SRUCell"])
@pytest.mark.parametrize("config", range(len(STATE_DICT_CONFIGS)))
def test_state_dict_keys_shapes_and_init_match(cls_name, config):
    """Default constructor arguments give the same state_dict keys, shapes, dtypes and
    requires_grad flags as sru's; with the same seed even the initial values are identical
    (same initialisation recipe, same order of random draws)."""
    input_size, hidden, kwargs = STATE_DICT_CONFIGS[config]
    kwargs = dict(kwargs)
    if cls_name == "SRUCell":
        for key in ("num_layers", "proj_input_to_hidden_first"):
            kwargs.pop(key, None)
        if "projection_size" in kwargs:
            kwargs["n_proj"] = kwargs.pop("projection_size")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        oracle = getattr(sru, cls_name)(input_size, hidden, **kwargs)
        torch.manual_seed(3)
        ours = getattr(sru_cupy, cls_name)(input_size, hidden, **kwargs)
    so, ss = oracle.state_dict(), ours.state_dict()
    assert list(ss.keys()) == list(so.keys())
    for key in so:
        assert ss[key].shape == so[key].shape, key
        assert ss[key].dtype == so[key].dtype, key
        torch.testing.assert_close(ss[key], so[key], rtol=0, atol=0, msg=key)
    flags_o = {n: p.requires_grad for n, p in oracle.named_parameters()}
    flags_s = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert flags_s == flags_o
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in oracle.named_buffers()]


@pytest.mark.parametrize("cls_name", ["SRU", "SRUCell"])
def test_every_sru_constructor_argument_is_accepted(cls_name):
    """Each keyword of sru 2.6's constructor exists in ours with the same default (except
    amp_recurrence_fp16, whose default is a documented choice: keep the 16-bit type under
    autocast); a call with all of them by keyword works."""
    theirs = inspect.signature(getattr(sru, cls_name).__init__).parameters
    mine = inspect.signature(getattr(sru_cupy, cls_name).__init__).parameters
    for name, param in theirs.items():
        if name == "self":
            continue
        assert name in mine, f"{cls_name}: sru argument {name!r} missing"
        if name != "amp_recurrence_fp16":
            assert mine[name].default == param.default, (
                f"{cls_name}({name}=...): default {mine[name].default!r}, sru has "
                f"{param.default!r}")
    kwargs = {name: p.default for name, p in theirs.items()
              if name not in ("self", "input_size", "hidden_size")}
    module = getattr(sru_cupy, cls_name)(5, 4, **kwargs)
    assert module.hidden_size == 4


class _UV(torch.nn.Module):
    """A custom_m returning (U, V): U from a linear map, V (L, B, 2 * out) from another."""

    def __init__(self, n_in, out, k):
        super().__init__()
        self.u = torch.nn.Linear(n_in, out * k, bias=False)
        self.v = torch.nn.Linear(n_in, 2 * out)

    def forward(self, x):
        return self.u(x), self.v(x)


UV_CONFIGS = {
    "cell-k4": (sru.SRUCell, sru_cupy.SRUCell, 5, 4, dict()),
    "cell-bi-k3-tanh": (sru.SRUCell, sru_cupy.SRUCell, 8, 4, dict(bidirectional=True,
                                                                   use_tanh=True)),
    "cell-v1": (sru.SRUCell, sru_cupy.SRUCell, 4, 4, dict(v1=True)),
    "sru-bi-2layers": (sru.SRU, sru_cupy.SRU, 8, 4, dict(num_layers=2, bidirectional=True)),
}


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask_pad"])
@pytest.mark.parametrize("name", list(UV_CONFIGS))
def test_custom_m_returning_u_and_v_parity(name, mask):
    """V (L, B, 2 * out) returned by custom_m is added to weight_c at each step, as in sru 2.6
    (whose state_dict, with the module under the key ``custom_m``, loads as it is)."""
    oracle_cls, ours_cls, n_in, hidden, kwargs = UV_CONFIGS[name]
    dirs = 2 if kwargs.get("bidirectional") else 1
    out = hidden * dirs
    k = 4 if n_in != out else 3
    dtype = torch.float64
    kwargs = dict(kwargs, custom_m=_UV(n_in, out, k))
    oracle, ours = _pair(oracle_cls, ours_cls, (n_in, hidden), kwargs, dtype)
    assert any(".custom_m." in key or key.startswith("custom_m.") for key in oracle.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(L, B, n_in, generator=g, dtype=dtype)
    layered = oracle_cls is sru.SRU
    c_shape = (kwargs["num_layers"], B, out) if layered else (B, out)
    c0 = 0.5 * torch.randn(c_shape, generator=g, dtype=dtype)
    mask_pad = padding_mask([L, 2, 5], L) if mask else None
    _compare(oracle, ours, x, c0, mask_pad, dtype, (L, B, out), c_shape,
             oracle_names=lambda name: name.replace("custom_m.", "transform_module."))


# -- sru 3.0.0.dev6 checkpoints --------------------------------------------------------------------
# sru 3.0's SRU keeps U's matrices in transform_module (a Linear, or a Sequential of two for any
# projection_size > 0); its state_dict loads into sru_cupy.SRU and arrays.SRU. sru 3.0 runs in a
# child process (sru3_child.py) with sru3_oracle.py; compared in float64.

SRU3_CONFIGS = {
    # k = 4 then 3, transform_module.weight (out*k, n_in)
    "linear-bi-ln": dict(args=[5, 4], kwargs=dict(num_layers=2, bidirectional=True,
                                                  layer_norm=True, rescale=True,
                                                  highway_bias=-1.0),
                         L=6, B=3, lengths=[6, 2, 4], c0=True, seed=11),
    # projected in both: transform_module.0/.1 -> weight_proj + weight
    "projected": dict(args=[9, 6], kwargs=dict(num_layers=2, projection_size=3,
                                               normalize_after=True, layer_norm=True),
                      L=5, B=2, lengths=None, c0=True, seed=12),
    # per layer: projected into weight_proj + weight, projected where sru_cupy (2.6's rule) does
    # not project (the product loads into weight), and a Linear
    "per-layer": dict(args=[6, 4], kwargs=dict(num_layers=3, projection_size=[2, 4, 0],
                                               proj_input_to_hidden_first=True,
                                               nn_rnn_compatible_return=True),
                      L=4, B=3, lengths=[4, 1, 3], c0=False, seed=13),
    "product-noskip-v1-tanh": dict(args=[5, 4], kwargs=dict(num_layers=1, projection_size=4,
                                                            has_skip_term=False, v1=True,
                                                            use_tanh=True),
                                   L=5, B=2, lengths=None, c0=True, seed=14),
}
SRU3_ORACLE = Path(__file__).with_name("sru3_oracle.py")


@pytest.fixture(scope="module")
def sru3_oracle(tmp_path_factory):
    return run_oracle(SRU3_ORACLE, SRU3_CONFIGS, tmp_path_factory.mktemp("sru3_oracle"))


def _loaded_from_sru3(config, state):
    config = SRU3_CONFIGS[config] if isinstance(config, str) else config
    ours = sru_cupy.SRU(*config["args"], **config["kwargs"]).double()
    ours.load_state_dict(state, strict=True)
    return ours


def _sru3_names(ours, state):
    """{our parameter name: (sru 3.0's name, whether transposed)}; the weight of a layer that
    loaded the product of 3.0's two matrices has no counterpart and is left out."""
    names = {name: (name, False) for name, _ in ours.named_parameters()}
    for i, layer in enumerate(ours.rnn_lst):
        prefix = f"rnn_lst.{i}."
        if layer.weight_proj is not None:
            names[prefix + "weight_proj"] = (prefix + "transform_module.0.weight", True)
            names[prefix + "weight"] = (prefix + "transform_module.1.weight", True)
        elif prefix + "transform_module.weight" in state:
            names[prefix + "weight"] = (prefix + "transform_module.weight", True)
        else:
            del names[prefix + "weight"]
    return names


@pytest.mark.parametrize("name", list(SRU3_CONFIGS))
def test_sru3_checkpoint_loads_and_matches(sru3_oracle, name):
    """sru 3.0's state_dict loads with strict=True; h, c and the gradients of the input, c0 and
    every parameter with a counterpart equal sru 3.0's."""
    case = sru3_oracle["cases"][name]
    ours = _loaded_from_sru3(name, case["state"])
    ours.train()
    inputs, theirs = case["inputs"], case["outputs"]
    x = inputs["x"].clone().requires_grad_(True)
    c0 = None if inputs["c0"] is None else inputs["c0"].clone().requires_grad_(True)
    h, c = ours(x, c0, mask_pad=inputs["mask_pad"])
    ((h * inputs["weight_h"]).sum() + (c * inputs["weight_c"]).sum()).backward()
    assert_close(h.detach(), theirs["h"], "h", torch.float64)
    assert_close(c.detach(), theirs["c"], "c", torch.float64)
    assert_close(x.grad, theirs["grad_x"], "grad of input", torch.float64)
    if c0 is not None:
        assert_close(c0.grad, theirs["grad_c0"], "grad of c0", torch.float64)
    names = _sru3_names(ours, case["state"])
    for name, param in ours.named_parameters():
        if name not in names:
            continue
        their_name, transposed = names[name]
        if param.grad is None:  # frozen (weight_c with v1)
            assert their_name not in theirs["grad_params"], f"{name}: sru 3.0 has a gradient"
        else:
            grad = param.grad.t() if transposed else param.grad
            assert_close(grad, theirs["grad_params"][their_name], f"grad of {name}",
                         torch.float64)
    assert theirs["grad_x"].abs().sum() > 0


def test_sru3_checkpoints_use_every_conversion(sru3_oracle):
    """The configurations exercise each key conversion: Linear, projected into projected, and
    projected into a layer that does not project (the product)."""
    kinds = set()
    for name, case in sru3_oracle["cases"].items():
        ours = sru_cupy.SRU(*SRU3_CONFIGS[name]["args"], **SRU3_CONFIGS[name]["kwargs"])
        for i, layer in enumerate(ours.rnn_lst):
            linear = f"rnn_lst.{i}.transform_module.weight" in case["state"]
            projected = f"rnn_lst.{i}.transform_module.0.weight" in case["state"]
            assert linear != projected, f"{name}, layer {i}"
            kinds.add("linear" if linear else
                      "projected" if layer.weight_proj is not None else "product")
    assert kinds == {"linear", "projected", "product"}


@pytest.mark.parametrize("name", list(SRU3_CONFIGS))
def test_sru3_checkpoint_loads_into_array_sru(sru3_oracle, name):
    """The array SRU (float64) loads sru 3.0's state_dict too: its h, c and input gradient equal
    sru 3.0's."""
    from sru_cupy import arrays
    case = sru3_oracle["cases"][name]
    config = SRU3_CONFIGS[name]
    model = arrays.SRU(*config["args"], **config["kwargs"], dtype="float64")
    model.load_state_dict(case["state"], strict=True)
    inputs, theirs = case["inputs"], case["outputs"]
    numpy = {key: None if value is None else value.numpy() for key, value in inputs.items()}
    h, c, cache = model.forward(numpy["x"], numpy["c0"], numpy["mask_pad"], training=True)
    assert_close(torch.from_numpy(h), theirs["h"], "h", torch.float64)
    assert_close(torch.from_numpy(c), theirs["c"], "c", torch.float64)
    grad_x, _, _ = model.backward(cache, numpy["weight_h"], numpy["weight_c"])
    assert_close(torch.from_numpy(grad_x), theirs["grad_x"], "grad of input", torch.float64)
