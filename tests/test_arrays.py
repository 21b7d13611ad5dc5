"""sru_cupy.arrays: the NumPy/CuPy SRU layers.

- gradients of the array layer (input, c0, every parameter) against central finite differences in
  float64, over uni/bi, 1-2 layers, projection, layer norm before/after, k = 3 / k = 4, no skip
  term, v1, rescale, mask_pad, tanh, dropout, batch_first and input_to_hidden;
- the array layer against the PyTorch ``sru_cupy.SRU`` on the same weights (outputs and every
  gradient, float64), with weights moved both ways (torch state_dict -> .npz -> arrays, arrays .npz
  -> torch ``load_state_dict(strict=True)``), and the same initialisation recipe;
- save/load round trips and their errors;
- that sru_cupy.arrays and sru_cupy.functional work with torch blocked from being imported;
- that examples/cupy_train.py --short learns (and reports failure when it cannot have learned).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sru_cupy import arrays
from sru_cupy.arrays import SRU, SRUCell
from sru_cupy.backends import host

from child_env import child_env

pytestmark = pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _host_library_built():
    """The subprocesses below find the host library already built in the session's cache."""
    host.library()


# -- finite differences ---------------------------------------------------------------------------

#: name -> (class, constructor kwargs, forward extras). Sizes are tiny: every element is perturbed.
FD_CASES = {
    "uni-1layer-k4": (SRU, dict(input_size=3, hidden_size=2, num_layers=1), {}),
    "bi-2layers-k4-k3": (SRU, dict(input_size=3, hidden_size=2, num_layers=2,
                                   bidirectional=True), {}),
    "k3-rescale-highway": (SRU, dict(input_size=3, hidden_size=3, num_layers=2, rescale=True,
                                     highway_bias=-0.7), {}),
    "k4-rescale": (SRU, dict(input_size=4, hidden_size=2, num_layers=1, rescale=True), {}),
    "projection": (SRU, dict(input_size=6, hidden_size=5, num_layers=2, projection_size=2), {}),
    "projection-per-layer": (SRU, dict(input_size=6, hidden_size=3, num_layers=2,
                                       projection_size=[2, 1]), {}),
    "layer-norm-pre": (SRU, dict(input_size=3, hidden_size=3, num_layers=2, layer_norm=True), {}),
    "layer-norm-post-bi": (SRU, dict(input_size=3, hidden_size=2, num_layers=2, layer_norm=True,
                                     normalize_after=True, bidirectional=True), {}),
    "no-skip": (SRU, dict(input_size=3, hidden_size=3, num_layers=2, has_skip_term=False), {}),
    "v1": (SRU, dict(input_size=3, hidden_size=2, num_layers=2, v1=True), {}),
    "tanh-mask-pad-bi": (SRU, dict(input_size=3, hidden_size=2, num_layers=2, use_tanh=True,
                                   bidirectional=True), {"mask_pad": True}),
    "dropout-training": (SRU, dict(input_size=3, hidden_size=3, num_layers=2, dropout=0.4,
                                   rnn_dropout=0.3, layer_norm=True), {"training": True}),
    "batch-first-input-to-hidden": (SRU, dict(input_size=3, hidden_size=2, num_layers=2,
                                              bidirectional=True, batch_first=True,
                                              proj_input_to_hidden_first=True,
                                              nn_rnn_compatible_return=True), {"mask_pad": True}),
    "cell-k4-projection-tanh": (SRUCell, dict(input_size=5, hidden_size=2, n_proj=1,
                                              use_tanh=True, bidirectional=True), {}),
}


def _perturbed_model(cls, kwargs, seed=0):
    """A float64 model whose parameters (layer norm, biases included) are all generic values."""
    model = cls(**kwargs, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name in model.trainable_names():
        model.params[name] += rng.standard_normal(model.params[name].shape) * 0.3
    return model


def _inputs(model, L=4, B=3, seed=1, mask_pad=False):
    rng = np.random.default_rng(seed)
    batch_first = model.batch_first
    x = rng.standard_normal((B, L, model.input_size) if batch_first else (L, B, model.input_size))
    layers = getattr(model, "num_layers", None)
    c0 = rng.standard_normal((B, model.output_size) if layers is None
                             else (layers, B, model.output_size))
    pad = None
    if mask_pad:
        pad = np.zeros((L, B), dtype=bool)
        pad[L - 1:, 0] = True
        pad[:2, 2] = True
        if batch_first:
            pad = pad.T.copy()
    return x, c0, pad


@pytest.mark.parametrize("case", list(FD_CASES))
def test_gradients_match_finite_differences(case):
    cls, kwargs, extra = FD_CASES[case]
    model = _perturbed_model(cls, kwargs)
    x, c0, mask_pad = _inputs(model, mask_pad=extra.get("mask_pad", False))
    training = extra.get("training", False)
    h, c, cache = model.forward(x, c0, mask_pad, training=training, rng=7)
    rng = np.random.default_rng(2)
    grad_h, grad_c = rng.standard_normal(h.shape), rng.standard_normal(c.shape)

    def loss():
        hh, cc, _ = model.forward(x, c0, mask_pad, training=training, rng=7, keep_cache=False)
        return float((hh * grad_h).sum() + (cc * grad_c).sum())

    if training:  # the masks are on: a different rng gives a different output
        h_other, _, _ = model.forward(x, c0, mask_pad, training=True, rng=8)
        assert not np.allclose(h_other, h)
    grad_x, grad_c0, grads = model.backward(cache, grad_h, grad_c)
    assert set(grads) == set(model.trainable_names())
    if cls is SRU:
        expected = {n for n in model.param_shapes()
                    if not n.endswith("scale_x") and not (model.config["v1"]
                                                          and n.endswith("weight_c"))}
        assert set(grads) == expected

    def numeric(array):
        flat = array.reshape(-1)  # a view: perturbs the array in place
        out = np.empty(flat.size)
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + 1e-6
            up = loss()
            flat[i] = saved - 1e-6
            down = loss()
            flat[i] = saved
            out[i] = (up - down) / 2e-6
        return out.reshape(array.shape)

    checks = [("x", grad_x, x), ("c0", grad_c0, c0)]
    checks += [(name, grads[name], model.params[name]) for name in model.trainable_names()]
    for name, analytic, array in checks:
        assert analytic.shape == array.shape, f"{name}: gradient shape {analytic.shape}"
        np.testing.assert_allclose(analytic, numeric(array), rtol=1e-5, atol=1e-7,
                                   err_msg=f"{case}: gradient of {name}")


# -- against the torch SRU ------------------------------------------------------------------------

TORCH_CASES = {
    "uni-1layer": dict(input_size=4, hidden_size=3, num_layers=1),
    "bi-layer-norm": dict(input_size=4, hidden_size=3, num_layers=2, bidirectional=True,
                          layer_norm=True),
    "post-norm-rescale": dict(input_size=4, hidden_size=3, num_layers=2, layer_norm=True,
                              normalize_after=True, rescale=True, highway_bias=-1.0),
    "projection-tanh": dict(input_size=6, hidden_size=5, num_layers=2, projection_size=2,
                            use_tanh=True),
    "v1-bf-i2h-compat": dict(input_size=4, hidden_size=3, num_layers=2, v1=True, bidirectional=True,
                             proj_input_to_hidden_first=True, batch_first=True,
                             nn_rnn_compatible_return=True),
    "no-skip": dict(input_size=4, hidden_size=3, num_layers=2, has_skip_term=False),
    "projection-per-layer": dict(input_size=6, hidden_size=3, num_layers=3,
                                 projection_size=[2, 0, 1]),
}


def _torch_pair(torch, config, seed=0):
    from sru_cupy import SRU as TorchSRU
    torch.manual_seed(seed)
    torch_model = TorchSRU(**config).double()
    with torch.no_grad():  # generic values everywhere (layer norm included)
        for name, p in torch_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return torch_model


def _compare_with_torch(torch, torch_model, model, mask_pad=True, L=5, B=3):
    rng = np.random.default_rng(3)
    x, c0, pad = _inputs(model, L=L, B=B, seed=4, mask_pad=mask_pad)
    h, c, cache = model.forward(x, c0, pad)
    xt = torch.tensor(x, requires_grad=True)
    c0t = torch.tensor(c0, requires_grad=True)
    ht, ct = torch_model(xt, c0t, None if pad is None else torch.from_numpy(pad))
    np.testing.assert_allclose(h, ht.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, ct.detach().numpy(), rtol=1e-10, atol=1e-12)
    grad_h, grad_c = rng.standard_normal(h.shape), rng.standard_normal(c.shape)
    ((ht * torch.from_numpy(grad_h)).sum() + (ct * torch.from_numpy(grad_c)).sum()).backward()
    grad_x, grad_c0, grads = model.backward(cache, grad_h, grad_c)
    np.testing.assert_allclose(grad_x, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_c0, c0t.grad.numpy(), rtol=1e-10, atol=1e-12)
    torch_grads = {n: p.grad for n, p in torch_model.named_parameters() if p.requires_grad}
    assert set(grads) == set(torch_grads)
    for name, g in torch_grads.items():
        np.testing.assert_allclose(grads[name], g.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_matches_torch_sru_from_torch_state_dict(case, tmp_path):
    """torch state_dict -> .npz (no config) -> array layer: same outputs and gradients."""
    torch = pytest.importorskip("torch")
    config = TORCH_CASES[case]
    torch_model = _torch_pair(torch, config)
    path = tmp_path / "torch_weights.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    model = SRU(**config, dtype="float64", seed=5)
    model.load_params(path)
    _compare_with_torch(torch, torch_model, model)


def test_torch_state_dict_loads_directly():
    """A torch state_dict's tensors are read through DLPack (bfloat16 too): no conversion."""
    torch = pytest.importorskip("torch")
    config = TORCH_CASES["projection-tanh"]
    torch_model = _torch_pair(torch, config)
    model = SRU(**config, dtype="float64", seed=1).load_state_dict(torch_model.state_dict())
    _compare_with_torch(torch, torch_model, model)
    bf16 = {k: v.to(torch.bfloat16) for k, v in torch_model.state_dict().items()}
    model32 = SRU(**config, seed=1).load_state_dict(bf16)
    for name, value in bf16.items():
        np.testing.assert_array_equal(model32.params[name], value.float().numpy(), err_msg=name)


@pytest.mark.parametrize("case", ["bi-layer-norm", "projection-tanh", "v1-bf-i2h-compat",
                                  "projection-per-layer"])
def test_matches_torch_sru_loading_array_npz(case, tmp_path):
    """array layer .npz -> torch load_state_dict(strict=True): same outputs and gradients."""
    torch = pytest.importorskip("torch")
    config = TORCH_CASES[case]
    model = _perturbed_model(SRU, config, seed=6)
    path = model.save(tmp_path / "model")
    assert path.endswith(".npz")
    torch_model = _torch_pair(torch, config, seed=9)
    with np.load(path) as data:
        state = {k: torch.from_numpy(data[k]) for k in data.files if k != arrays.CONFIG_KEY}
    torch_model.load_state_dict(state, strict=True)
    _compare_with_torch(torch, torch_model, model)


def test_initialisation_recipe_matches_torch():
    """Deterministic parts equal; random parts with the same spread per gate slot."""
    torch = pytest.importorskip("torch")
    from sru_cupy import SRU as TorchSRU
    config = dict(input_size=48, hidden_size=40, num_layers=2, dropout=0.2, rnn_dropout=0.1,
                  rescale=True, highway_bias=-1.0, projection_size=0, layer_norm=True,
                  bidirectional=True)
    torch.manual_seed(0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rnn_dropout is deprecated in sru
        ref = {k: v.detach().numpy() for k, v in TorchSRU(**config).state_dict().items()}
    ours = SRU(**config, dtype="float64", seed=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    for name in ref:
        if name.endswith(("bias", "scale_x", "layer_norm.weight")):
            np.testing.assert_allclose(ours[name], ref[name], rtol=1e-6, err_msg=name)
        elif name.endswith("weight"):  # (fan_in, dirs * d * k): compare each of the k slots
            k = ref[name].shape[1] // (2 * 40)
            for slot in range(k):
                a = ours[name].reshape(-1, k)[:, slot]
                b = ref[name].reshape(-1, k)[:, slot]
                assert abs(a.std() / b.std() - 1) < 0.1, f"{name} slot {slot}"
                assert np.abs(a).max() <= np.abs(b).max() * 1.05, f"{name} slot {slot}"
        elif name.endswith("weight_c"):
            assert abs(ours[name].std() / ref[name].std() - 1) < 0.2, name


def test_projection_size_per_layer():
    """An int for every layer or one size per layer, each under 2.6's rule (a projection only
    below min(n_in, output_size)); the list survives save/load; bad values name the argument."""
    model = SRU(6, 3, num_layers=3, projection_size=(2, 0, 3), seed=0)
    assert [cell.projection_size for cell in model.rnn_lst] == [2, 0, 0]
    assert "rnn_lst.0.weight_proj" in model.params and "rnn_lst.1.weight_proj" not in model.params
    assert model.config["projection_size"] == [2, 0, 3]
    with pytest.raises(ValueError, match=r"^projection_size: expected an int or one size per "
                                         r"layer \(num_layers = 3\), got 2 sizes"):
        SRU(6, 3, num_layers=3, projection_size=[2, 0])
    with pytest.raises(ValueError, match=r"^projection_size\[2\]: expected an int >= 0"):
        SRU(6, 3, num_layers=3, projection_size=[2, 0, -1])
    with pytest.raises(ValueError, match=r"^n_proj: expected an int >= 0"):
        SRUCell(6, 3, n_proj=1.5)


def test_initialisation_follows_the_layout():
    """Bounds and per-slot scalings of layout.LayerLayout: each slot's largest |w| stays within
    its bound times its scaling and comes close to it (1920 draws per slot)."""
    cell = SRUCell(48, 20, dropout=0.2, rnn_dropout=0.1, layer_norm=True, rescale=True,
                   highway_bias=-1.0, bidirectional=True, dtype="float64", seed=0)
    layout = cell.layout
    w = cell.params["weight"].reshape(layout.weight_slots_shape())
    common = math.sqrt(1 - 0.1) * 0.1 * layout.weight_bound
    expected = [common * math.sqrt(1 - 0.2), common * math.sqrt(0.5), common * math.sqrt(0.5),
                common * layout.scale_x]
    for slot, bound in enumerate(expected):
        peak = np.abs(w[..., slot]).max()
        assert 0.99 * bound < peak <= bound * (1 + 1e-12), f"slot {slot}"
    np.testing.assert_array_equal(cell.params["scale_x"], [layout.scale_x])
    assert np.abs(cell.params["weight_c"]).max() <= layout.weight_c_bound * layout.weight_c_scale


# -- save / load ----------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = _perturbed_model(SRU, dict(input_size=3, hidden_size=4, num_layers=2,
                                       layer_norm=True, projection_size=2, bidirectional=True))
    path = model.save(str(tmp_path / "m.npz"))
    loaded = SRU.load(path)
    assert loaded.config == model.config and loaded.dtype == model.dtype
    assert set(loaded.params) == set(model.params)
    for name in model.params:
        np.testing.assert_array_equal(loaded.params[name], model.params[name])
    x, c0, _ = _inputs(model)
    np.testing.assert_array_equal(loaded.forward(x, c0)[0], model.forward(x, c0)[0])
    # The generic loader and the float32 override; and the cell.
    assert type(arrays.load(path)) is SRU
    assert SRU.load(path, dtype="float32").params["rnn_lst.0.weight"].dtype == np.float32
    cell = _perturbed_model(SRUCell, dict(input_size=3, hidden_size=2, layer_norm=True))
    cell_path = cell.save(tmp_path / "cell")
    loaded_cell = arrays.load(cell_path)
    assert type(loaded_cell) is SRUCell and loaded_cell.config == cell.config
    xc = np.random.default_rng(0).standard_normal((4, 2, 3))
    np.testing.assert_array_equal(loaded_cell.forward(xc)[0], cell.forward(xc)[0])
    with np.load(path) as data:
        meta = json.loads(str(data[arrays.CONFIG_KEY]))
    assert meta["class"] == "SRU" and meta["config"]["projection_size"] == 2


def test_load_errors_are_clear(tmp_path):
    model = SRU(3, 4, num_layers=2, seed=0)
    path = model.save(tmp_path / "m")
    with np.load(path) as data:
        entries = {k: data[k] for k in data.files}

    def write(name, **changes):
        data = {k: v for k, v in entries.items() if changes.get(k, 0) is not None}
        data.update({k: v for k, v in changes.items() if v is not None})
        target = tmp_path / name
        np.savez(target, **data)
        return str(target)

    with pytest.raises(KeyError, match=r"missing keys \['rnn_lst.1.bias'\]"):
        SRU.load(write("missing.npz", **{"rnn_lst.1.bias": None}))
    with pytest.raises(KeyError, match=r"unexpected keys \['rnn_lst.2.bias'\]"):
        SRU.load(write("extra.npz", **{"rnn_lst.2.bias": np.zeros(8)}))
    with pytest.raises(ValueError, match=r"rnn_lst.0.weight: expected shape \(3, 16\), got "
                                         r"\(3, 12\)"):
        SRU.load(write("shape.npz", **{"rnn_lst.0.weight": np.zeros((3, 12))}))
    with pytest.raises(ValueError, match=r"no '__config__' entry"):
        SRU.load(write("noconfig.npz", __config__=None))
    with pytest.raises(ValueError, match=r"holds a SRU, not a SRUCell"):
        SRUCell.load(path)
    with pytest.raises(ValueError, match=r"saved for SRU\(.*\), not for this SRU"):
        SRU(3, 5, num_layers=2).load_params(path)
    with pytest.raises(ValueError, match=r"__config__ is not a valid config entry"):
        SRU.load(write("badconfig.npz", __config__=np.array("{not json")))
    # strict=False tolerates missing/unexpected names but still checks shapes.
    other = SRU(3, 4, num_layers=2, seed=1)
    other.load_state_dict({"rnn_lst.0.bias": entries["rnn_lst.0.bias"], "extra": np.ones(1)},
                          strict=False)
    np.testing.assert_array_equal(other.params["rnn_lst.0.bias"], entries["rnn_lst.0.bias"])
    with pytest.raises(ValueError, match=r"rnn_lst.0.bias: expected shape"):
        other.load_state_dict({"rnn_lst.0.bias": np.zeros(3)}, strict=False)


# -- forward behaviour and errors -----------------------------------------------------------------


def test_dropout_only_in_training_and_masks_are_variational():
    model = SRU(4, 4, num_layers=2, dropout=0.5, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((6, 64, 4))
    h_eval, _, _ = model.forward(x)
    h_eval2, _, _ = model.forward(x, training=False, rng=3)
    np.testing.assert_array_equal(h_eval, h_eval2)
    h_train, _, _ = model.forward(x, training=True, rng=3)
    assert not np.allclose(h_train, h_eval)
    np.testing.assert_array_equal(h_train, model.forward(x, training=True, rng=3)[0])
    # One Bernoulli(1 - p) / (1 - p) value per (batch, column), shared by every step.
    mask = arrays._dropout_mask(np, np.random.default_rng(0), (200, 50), 0.5, np.dtype(np.float64))
    assert set(np.unique(mask)) == {0.0, 2.0}
    assert abs(mask.mean() - 1.0) < 0.05


def test_input_errors_name_the_argument():
    model = SRU(3, 4, num_layers=2, seed=0)
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"^x: expected last axis input_size = 3, got 4"):
        model.forward(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"^x: expected rank 3"):
        model.forward(np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match=r"^c0: expected shape \(num_layers, B, output_size\)"):
        model.forward(x, np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"^mask_pad: expected shape \(L, B\)"):
        model.forward(x, mask_pad=np.zeros((2, 5), bool))
    with pytest.raises(TypeError, match=r"^x: expected a floating dtype, got int64"):
        model.forward(np.zeros((5, 2, 3), np.int64))
    with pytest.raises(TypeError, match=r"^x: expected a numpy.ndarray, a cupy.ndarray"):
        model.forward([[[0.0] * 3]])
    h, c, cache = model.forward(x)
    with pytest.raises(ValueError, match=r"^grad_h: expected shape \(5, 2, 4\) like h"):
        model.backward(cache, np.zeros((5, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"^grad_c: expected shape \(2, 2, 4\) like c"):
        model.backward(cache, np.zeros_like(h), np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match=r"^cache: expected the cache returned by this model"):
        SRU(3, 4, num_layers=2).backward(cache, np.zeros_like(h))
    with pytest.raises(ValueError, match=r"^device: expected 'cpu', 'cuda' or 'cuda:N'"):
        SRU(3, 4, device="tpu")
    with pytest.raises(TypeError, match=r"^dtype: expected float32 or float64, got float16"):
        SRU(3, 4, dtype="float16")
    _, _, none_cache = model.forward(x, keep_cache=False)
    assert none_cache is None


def test_torch_tensors_are_accepted_as_inputs():
    torch = pytest.importorskip("torch")
    model = SRU(3, 4, num_layers=2, seed=0, dtype="float64")
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    h, c, cache = model.forward(torch.from_numpy(x), mask_pad=torch.zeros(5, 2, dtype=torch.bool))
    assert type(h) is np.ndarray
    np.testing.assert_array_equal(h, model.forward(x)[0])
    grad_x, _, _ = model.backward(cache, torch.ones(5, 2, 4, dtype=torch.float64))
    assert type(grad_x) is np.ndarray


# -- empty input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kwargs", [
    (SRU, dict(num_layers=2, bidirectional=True, layer_norm=True, projection_size=2,
               proj_input_to_hidden_first=True)),
    (SRU, dict(num_layers=2, layer_norm=True, normalize_after=True, dropout=0.3, rnn_dropout=0.2,
               batch_first=True)),
    (SRUCell, dict(bidirectional=True, layer_norm=True)),
], ids=["sru-bi", "sru-batch-first-dropout", "cell"])
def test_no_steps_returns_c0_and_its_gradient(cls, kwargs):
    """L = 0: h (0, B, out), c = c0 (zeros without c0); backward: grad_c0 = grad_c, zero
    parameter gradients, grad_x empty like x (as the torch layer does)."""
    model = _perturbed_model(cls, dict(input_size=5, hidden_size=3, **kwargs))
    x, c0, _ = _inputs(model, L=0, B=2)
    h, c, cache = model.forward(x, c0, training=True, rng=0)
    assert h.shape == ((2, 0, model.output_size) if model.batch_first
                       else (0, 2, model.output_size))
    np.testing.assert_array_equal(c, c0)
    grad_c = np.random.default_rng(3).standard_normal(c.shape)
    grad_x, grad_c0, grads = model.backward(cache, np.zeros(h.shape), grad_c)
    assert grad_x.shape == x.shape
    np.testing.assert_array_equal(grad_c0, grad_c)
    assert set(grads) == set(model.trainable_names())
    for name, grad in grads.items():
        assert grad.shape == model.params[name].shape and not grad.any(), name
    np.testing.assert_array_equal(model.forward(x)[1], np.zeros_like(c0))


@pytest.mark.parametrize("cls, kwargs", [
    (SRU, dict(num_layers=2, bidirectional=True, layer_norm=True, nn_rnn_compatible_return=True)),
    (SRUCell, dict(n_proj=2, layer_norm=True, normalize_after=True)),
], ids=["sru-bi-compat", "cell"])
def test_empty_batch_gives_empty_outputs_and_gradients(cls, kwargs):
    """B = 0: h (L, 0, out), c with a batch axis of 0; backward gives empty grad_x and grad_c0
    and zero parameter gradients."""
    model = _perturbed_model(cls, dict(input_size=5, hidden_size=3, **kwargs))
    x, c0, _ = _inputs(model, L=4, B=0)
    h, c, cache = model.forward(x, c0)
    assert h.shape == (4, 0, model.output_size) and c.size == 0
    grad_x, grad_c0, grads = model.backward(cache, np.zeros(h.shape), np.zeros(c.shape))
    assert grad_x.shape == x.shape and grad_c0.shape == c0.shape
    assert set(grads) == set(model.trainable_names())
    for name, grad in grads.items():
        assert grad.shape == model.params[name].shape and not grad.any(), name


# -- sru 3.0 checkpoints ---------------------------------------------------------------------------
# (Against sru 3.0 itself in test_sru_parity.py.)


def _as_sru3(state, prefixes):
    """``state`` in sru 3.0's SRU layout (U's matrices as its transform_module keys)."""
    state = dict(state)
    for prefix in prefixes:
        weight = state.pop(prefix + "weight")
        if prefix + "weight_proj" in state:
            state[prefix + "transform_module.0.weight"] = state.pop(prefix + "weight_proj").T
            state[prefix + "transform_module.1.weight"] = weight.T
        else:
            state[prefix + "transform_module.weight"] = weight.T
    return state


def test_sru3_layout_loads():
    """sru 3.0's keys load (Linear, projected into projected, and projected into a layer that
    does not project: the product of the two matrices); the same outputs as the source model."""
    source = _perturbed_model(SRU, dict(input_size=6, hidden_size=3, num_layers=3,
                                        projection_size=[2, 2, 0]))
    state = _as_sru3(source.state_dict(), ["rnn_lst.0.", "rnn_lst.1.", "rnn_lst.2."])
    assert "rnn_lst.1.transform_module.1.weight" in state
    x, c0, pad = _inputs(source, mask_pad=True)
    same = SRU(6, 3, num_layers=3, projection_size=[2, 2, 0], dtype="float64", seed=5)
    same.load_state_dict(state)
    np.testing.assert_array_equal(same.forward(x, c0, pad)[0], source.forward(x, c0, pad)[0])
    # layer 1 with projection_size 3 = output_size: no projection here, sru 3.0 projects
    product = SRU(6, 3, num_layers=3, projection_size=[2, 3, 0], dtype="float64", seed=5)
    assert product.rnn_lst[1].projection_size == 0
    product.load_state_dict(state)
    np.testing.assert_allclose(product.params["rnn_lst.1.weight"],
                               source.params["rnn_lst.1.weight_proj"]
                               @ source.params["rnn_lst.1.weight"], rtol=1e-15)
    np.testing.assert_allclose(product.forward(x, c0, pad)[0], source.forward(x, c0, pad)[0],
                               rtol=1e-12, atol=1e-13)
    cell = _perturbed_model(SRUCell, dict(input_size=6, hidden_size=3))
    with pytest.raises(ValueError, match=r"^transform_module.weight: a checkpoint of sru 3.0 "
                                         r"without projection does not load into a layer with "
                                         r"projection_size = 2"):
        SRUCell(6, 3, n_proj=2).load_state_dict(_as_sru3(cell.state_dict(), [""]))


# -- no torch -------------------------------------------------------------------------------------

_NO_TORCH_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block torch")

    import numpy as np
    import sru_cupy.arrays as arrays
    import sru_cupy.functional as F

    model = arrays.SRU(3, 4, num_layers=2, layer_norm=True, dropout=0.1, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    h, c, cache = model.forward(x, training=True, rng=0)
    grad_x, grad_c0, grads = model.backward(cache, np.ones_like(h), np.ones_like(c))
    assert grad_x.shape == x.shape and len(grads) == 10, (grad_x.shape, sorted(grads))
    path = model.save(sys.argv[1])
    arrays.SRU.load(path)
    U = np.random.default_rng(1).standard_normal((5, 2, 16)).astype(np.float32)
    b = np.zeros(8, np.float32)
    hh, cc, last = F.recurrence_forward(U, None, b, b, hidden_size=4)
    F.recurrence_backward(hh, None, U, None, b, b, None, cc, hidden_size=4)
    F.recurrence_inference(U, None, b, b, hidden_size=4)
    assert "torch" not in sys.modules, "torch was imported"
    assert "cupy" not in sys.modules, "cupy was imported"
    print("ok without torch")
""")


def test_arrays_and_functional_never_import_torch(tmp_path):
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(tmp_path / "m.npz")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok without torch" in result.stdout


# -- the example ----------------------------------------------------------------------------------


def _run_example(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", "cupy_train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=300)


def _losses(stdout):
    initial = next(line for line in stdout.splitlines() if line.startswith("initial:"))
    final = next(line for line in stdout.splitlines() if line.startswith("final:"))
    return float(initial.split()[2]), float(final.split()[2]), float(final.split()[4])


def test_example_short_learns():
    result = _run_example("--short", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    initial, final, accuracy = _losses(result.stdout)
    assert final <= initial / 4 and accuracy >= 0.9, result.stdout
    assert "learned: yes" in result.stdout


def test_example_reports_failure_when_it_cannot_have_learned():
    result = _run_example("--short", "--steps", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "learned: NO" in result.stdout


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["bi-layer-norm", "projection-tanh", "v1-bf-i2h-compat"])
def test_cuda_model_matches_cpu_model(case):
    import cupy
    config = TORCH_CASES[case]
    cpu = _perturbed_model(SRU, config, seed=3)
    gpu = SRU(**config, dtype="float64", device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    assert isinstance(gpu.params["rnn_lst.0.weight"], cupy.ndarray)
    x, c0, pad = _inputs(cpu, L=6, B=4, seed=2, mask_pad=True)
    h, c, cache = cpu.forward(x, c0, pad)
    hg, cg, cache_g = gpu.forward(cupy.asarray(x), cupy.asarray(c0), cupy.asarray(pad))
    np.testing.assert_allclose(cupy.asnumpy(hg), h, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(cupy.asnumpy(cg), c, rtol=1e-9, atol=1e-11)
    rng = np.random.default_rng(0)
    grad_h, grad_c = rng.standard_normal(h.shape), rng.standard_normal(c.shape)
    gx, gc0, grads = cpu.backward(cache, grad_h, grad_c)
    gxg, gc0g, grads_g = gpu.backward(cache_g, cupy.asarray(grad_h), cupy.asarray(grad_c))
    np.testing.assert_allclose(cupy.asnumpy(gxg), gx, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(cupy.asnumpy(gc0g), gc0, rtol=1e-9, atol=1e-11)
    for name in grads:
        np.testing.assert_allclose(cupy.asnumpy(grads_g[name]), grads[name], rtol=1e-9,
                                   atol=1e-11, err_msg=name)
    # Dropout masks come from CuPy's generator on the model's device.
    h1 = gpu.forward(cupy.asarray(x), training=True, rng=1)[0]
    assert isinstance(h1, cupy.ndarray)
    with pytest.raises(TypeError, match=r"^x: the model is on cuda:\d \(CuPy arrays\), got a "
                                        r"numpy.ndarray"):
        gpu.forward(x)
    with pytest.raises(TypeError, match=r"^x: the model is on the CPU"):
        cpu.forward(cupy.asarray(x))


@pytest.mark.gpu
def test_example_learns_on_cuda():
    result = _run_example("--short", "--device", "cuda")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "learned: yes" in result.stdout


@pytest.mark.gpu
def test_second_gpu_model_converts_on_its_own_device_whatever_is_current():
    """A float32 model on cuda:1 fed float64 arrays and given a bfloat16 torch state_dict on cuda:1
    while device 0 is current: every conversion allocates on cuda:1 (a copy on device 0 would
    fail the same-device check), and the results equal the CPU model's."""
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 CUDA devices")
    config = TORCH_CASES["bi-layer-norm"]
    cpu = _perturbed_model(SRU, config, seed=3)
    cpu32 = SRU(**config, dtype="float32")
    cpu32.load_state_dict(cpu.state_dict())
    gpu = SRU(**config, dtype="float32", device="cuda:1")
    x, c0, pad = _inputs(cpu, L=6, B=4, seed=2, mask_pad=True)
    with cupy.cuda.Device(1):
        state = {k: cupy.asarray(v) for k, v in cpu32.state_dict().items()}
        x1, c01, pad1 = cupy.asarray(x), cupy.asarray(c0), cupy.asarray(pad)  # float64 inputs
    with cupy.cuda.Device(0):
        gpu.load_state_dict(state)
        h, c, cache = gpu.forward(x1, c01, pad1)
        grad_x, _, _ = gpu.backward(cache, cupy.ones_like(h))
        assert cupy.cuda.runtime.getDevice() == 0
    assert h.device.id == c.device.id == grad_x.device.id == 1
    h_ref, c_ref, _ = cpu32.forward(x.astype(np.float32), c0.astype(np.float32), pad)
    np.testing.assert_allclose(cupy.asnumpy(h), h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(c), c_ref, rtol=1e-5, atol=1e-5)
