"""``sru_cupy.layout``: one SRU layer's and one stack's layout from their options (sizes, k, the
projection rule, parameter names and shapes, scale_x, the initialisation recipe), the shared
constructor checks and the conversion of ``sru`` 3.0's transform_module keys. Torch-free: the
torch and array layers that build from it are tested in test_modules.py and test_arrays.py."""

import math
import subprocess
import sys

import numpy as np
import pytest

from child_env import REPO, child_env
from sru_cupy.layout import (LayerLayout, StackLayout, check_positive_int, check_probability,
                             convert_sru3_keys, layer_projection_sizes, num_matrices)


# -- one layer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_in, hidden, bidirectional, skip, k", [
    (5, 4, False, True, 4), (4, 4, False, True, 3), (8, 4, True, True, 3), (4, 4, True, True, 4),
    (5, 4, False, False, 3),
])
def test_num_matrices(n_in, hidden, bidirectional, skip, k):
    layout = LayerLayout(n_in, hidden, bidirectional=bidirectional, has_skip_term=skip)
    assert layout.num_matrices == k
    assert layout.output_size == hidden * (2 if bidirectional else 1)
    assert num_matrices(n_in, layout.output_size, skip) == k


@pytest.mark.parametrize("n_in, hidden, bidirectional, proj, used", [
    (8, 6, False, 3, 3), (8, 6, False, 6, 0), (4, 6, False, 4, 0), (4, 6, False, 3, 3),
    (8, 3, True, 5, 5), (8, 3, True, 6, 0), (8, 6, False, 0, 0),
])
def test_projection_only_when_smaller(n_in, hidden, bidirectional, proj, used):
    layout = LayerLayout(n_in, hidden, bidirectional=bidirectional, n_proj=proj)
    assert layout.projection_size == used
    assert layout.requested_projection_size == proj
    assert layout.weight_fan_in == (used or n_in)


def test_param_shapes_in_state_dict_order():
    layout = LayerLayout(9, 3, bidirectional=True, projection_size=4, layer_norm=True)
    assert layout.param_shapes() == {
        "weight_proj": (9, 4), "weight": (4, 6 * 4), "weight_c": (12,), "bias": (12,),
        "scale_x": (1,), "layer_norm.weight": (9,), "layer_norm.bias": (9,)}
    assert list(layout.param_shapes()) == ["weight_proj", "weight", "weight_c", "bias",
                                           "scale_x", "layer_norm.weight", "layer_norm.bias"]
    after = LayerLayout(9, 3, layer_norm=True, normalize_after=True, transform_module=True)
    assert after.param_shapes() == {"weight_c": (6,), "bias": (6,), "scale_x": (1,),
                                    "layer_norm.weight": (3,), "layer_norm.bias": (3,)}
    assert LayerLayout(3, 3).param_shapes()["weight"] == (3, 9)


@pytest.mark.parametrize("rescale, skip, highway_bias, expected", [
    (True, True, -1.0, math.sqrt(1 + 2 * math.exp(-1.0))),
    (True, False, -1.0, 1.0),
    (False, True, 0.5, 1.0),
])
def test_scale_x(rescale, skip, highway_bias, expected):
    layout = LayerLayout(5, 4, rescale=rescale, has_skip_term=skip, highway_bias=highway_bias)
    assert layout.scale_x == expected


def _slot_factors(**options):
    """The factor scale_weight applies to each slot of a weight of ones (rescale off unless
    given: SRUCell's default is on)."""
    layout = LayerLayout(5, 2, bidirectional=True, **dict(dict(rescale=False), **options))
    w = np.ones(layout.weight_slots_shape())
    layout.scale_weight(w)
    per_slot = w.reshape(-1, layout.num_matrices)
    assert (per_slot == per_slot[0]).all()  # the same for every row, direction and unit
    return list(per_slot[0])


def test_scale_weight_per_slot():
    assert _slot_factors() == pytest.approx([1, math.sqrt(0.5), math.sqrt(0.5), 1])
    assert _slot_factors(v1=True) == [1, 1, 1, 1]
    drop = math.sqrt(0.8)
    assert _slot_factors(dropout=0.2, v1=True) == pytest.approx([drop, 1, 1, 1])
    assert _slot_factors(rnn_dropout=0.36, v1=True) == pytest.approx([0.8] * 4)
    assert _slot_factors(layer_norm=True, v1=True) == pytest.approx([0.1] * 4)
    scale = math.sqrt(1 + 2 * math.exp(-2.0))
    assert _slot_factors(rescale=True, highway_bias=-2.0, v1=True) == pytest.approx(
        [1, 1, 1, scale])
    assert _slot_factors(rescale=True, has_skip_term=False, v1=True) == [1, 1, 1]


def test_bounds():
    layout = LayerLayout(12, 4, projection_size=3)
    assert layout.weight_bound == math.sqrt(3 / 3) and layout.weight_proj_bound == math.sqrt(3 / 12)
    assert (layout.weight_c_bound, layout.weight_c_scale) == (math.sqrt(3), math.sqrt(0.5))
    init = LayerLayout(12, 4, weight_c_init=0.25)
    assert (init.weight_c_bound, init.weight_c_scale) == (0.25, 1.0)
    assert init.weight_bound == math.sqrt(3 / 12)


# -- checks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3", None])
def test_check_positive_int(value):
    with pytest.raises(ValueError, match=rf"^size: expected a positive int, got {value!r}"):
        check_positive_int(size=value)


def test_check_positive_int_accepts_numpy_ints():
    check_positive_int(a=np.int64(3), b=1)


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", None])
def test_check_probability(value):
    with pytest.raises(ValueError, match=r"^p: expected a probability in \[0, 1\)"):
        check_probability(p=value)


def test_layer_checks_name_the_argument():
    with pytest.raises(ValueError, match="^hidden_size"):
        LayerLayout(3, 0)
    with pytest.raises(ValueError, match="^rnn_dropout"):
        LayerLayout(3, 2, rnn_dropout=1.0)
    with pytest.raises(ValueError, match="^n_proj: expected an int >= 0"):
        LayerLayout(3, 2, n_proj=-1)
    with pytest.raises(ValueError, match="^projection_size: expected an int >= 0"):
        LayerLayout(3, 2, n_proj=1, projection_size=[1])


def test_projection_size_replaces_n_proj():
    """As in the SRUCell constructors: projection_size (3.x's name), when given, wins."""
    assert LayerLayout(9, 4, n_proj=2, projection_size=3).projection_size == 3
    assert LayerLayout(9, 4, n_proj=2, projection_size=0).projection_size == 0
    assert LayerLayout(9, 4, n_proj=2).projection_size == 2


def test_layer_projection_sizes():
    assert layer_projection_sizes(3, 2) == [3, 3]
    assert layer_projection_sizes((1, 0, np.int64(2)), 3) == [1, 0, 2]
    with pytest.raises(ValueError, match=r"^projection_size: expected an int or one size per "
                                         r"layer \(num_layers = 2\), got 3 sizes \[1, 2, 3\]"):
        layer_projection_sizes([1, 2, 3], 2)
    with pytest.raises(ValueError, match=r"^projection_size\[0\]: expected an int >= 0"):
        layer_projection_sizes([None, 2], 2)
    with pytest.raises(ValueError, match=r"^projection_size: expected an int >= 0 or a "
                                         r"list/tuple of 2"):
        layer_projection_sizes({1, 2}, 2)


# -- a stack ---------------------------------------------------------------------------------------

def test_stack_layout():
    stack = StackLayout(5, 3, 3, bidirectional=True, dropout=0.2, projection_size=[2, 0, 1])
    assert (stack.output_size, stack.num_directions, stack.has_input_to_hidden) == (6, 2, False)
    assert stack.layer_input_sizes == [5, 6, 6]
    assert stack.layer_dropouts == [0.2, 0.2, 0.0]
    assert stack.layer_projection_sizes == [2, 0, 1]
    first = StackLayout(5, 3, 2, proj_input_to_hidden_first=True)
    assert first.has_input_to_hidden and first.layer_input_sizes == [3, 3]
    assert not StackLayout(3, 3, 2, proj_input_to_hidden_first=True).has_input_to_hidden
    with pytest.raises(ValueError, match="^num_layers"):
        StackLayout(3, 3, 0)
    with pytest.raises(ValueError, match="^dropout"):  # checked even where no layer uses it
        StackLayout(3, 3, 1, dropout=1.5)


# -- sru 3.0 keys ----------------------------------------------------------------------------------

def test_convert_sru3_linear():
    weight = np.arange(12.0).reshape(4 * 3, 1).repeat(5, axis=1)  # (out*k, n_in)
    state = {"p.transform_module.weight": weight, "p.bias": np.zeros(8)}
    assert convert_sru3_keys(state, "p.", LayerLayout(5, 4)) == ["p.weight"]
    assert set(state) == {"p.weight", "p.bias"}
    np.testing.assert_array_equal(state["p.weight"], weight.T)


def test_convert_sru3_projected():
    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((2, 9)), rng.standard_normal((16, 2))
    state = {"transform_module.0.weight": down, "transform_module.1.weight": up}
    assert convert_sru3_keys(dict(state), "", LayerLayout(9, 4)) == ["weight"]
    projected = dict(state)
    assert convert_sru3_keys(projected, "", LayerLayout(9, 4, projection_size=2)) == \
        ["weight_proj", "weight"]
    np.testing.assert_array_equal(projected["weight_proj"], down.T)
    np.testing.assert_array_equal(projected["weight"], up.T)
    product = dict(state)
    convert_sru3_keys(product, "", LayerLayout(9, 4, projection_size=5))  # 5 > out: no projection
    np.testing.assert_allclose(product["weight"], down.T @ up.T)
    assert set(product) == {"weight"}


def test_convert_sru3_leaves_other_states_alone():
    linear = {"transform_module.weight": np.zeros((12, 5))}
    assert convert_sru3_keys(linear, "", LayerLayout(5, 4, transform_module=True)) == []
    assert list(linear) == ["transform_module.weight"]
    ours = {"weight": np.zeros((5, 16)), "transform_module.weight": np.zeros((12, 5))}
    assert convert_sru3_keys(ours, "", LayerLayout(5, 4)) == []
    assert convert_sru3_keys({"bias": np.zeros(8)}, "", LayerLayout(5, 4)) == []


def test_convert_sru3_errors():
    with pytest.raises(ValueError, match=r"^p.transform_module.weight: a checkpoint of sru 3.0 "
                                         r"without projection"):
        convert_sru3_keys({"p.transform_module.weight": np.zeros((16, 9))}, "p.",
                          LayerLayout(9, 4, projection_size=2))
    with pytest.raises(ValueError, match=r"^transform_module.0.weight, transform_module.1.weight: "
                                         r"expected matrices \(p, n_in\) and \(out\*k, p\), got "
                                         r"shapes \(2, 9\) and \(16, 3\)"):
        convert_sru3_keys({"transform_module.0.weight": np.zeros((2, 9)),
                           "transform_module.1.weight": np.zeros((16, 3))}, "",
                          LayerLayout(9, 4, projection_size=2))


def test_imports_neither_torch_nor_cupy():
    code = ("import sys, sru_cupy.layout as layout; layout.LayerLayout(5, 4); "
            "bad = sorted(m for m in ('torch', 'cupy') if m in sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env=child_env(), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
