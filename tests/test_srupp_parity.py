"""Parity of ``sru_cupy.SRUpp`` with ``sru`` 3.0.0.dev6's (the only other SRU++ implementation).

``sru`` 3.0 cannot be imported beside the ``sru`` 2.6 of the test extra, so it runs from a folder
of its own in a child process (sru3_child.py) with ``srupp_oracle.py``, which saves, for each
configuration, its initial and perturbed state_dict, the inputs, the outputs and every gradient
(float64, CPU; its CPU training path is a plain PyTorch loop). Here the perturbed state_dict is
loaded into ``sru_cupy.SRUpp`` with ``strict=True`` and everything is compared.

The configurations are drawn at random from a fixed seed; a test checks that they cover every
option (memory, attn_mask, mask_pad, memory_mask_pad, bidirectional, heads, attention
placement, proj_input_to_hidden_first, layer norm before and after, rescale, alpha != 0, ...).
"""

import inspect
import random
from pathlib import Path

import pytest
import torch

import sru_cupy
from parity_helpers import assert_close
from sru3_child import run_oracle
from srupp_oracle import run_case

ORACLE = Path(__file__).with_name("srupp_oracle.py")
CONFIG_SEED = 0
CONFIG_COUNT = 12


# -- the configurations ----------------------------------------------------------------------------

def draw_configs(count=CONFIG_COUNT, seed=CONFIG_SEED):
    """{name: configuration} (see srupp_oracle.py for the fields), small and varied."""
    rng = random.Random(seed)
    configs = {}
    for i in range(count):
        bidirectional = rng.random() < 0.4
        hidden = rng.choice([3, 4, 5])
        out = hidden * (2 if bidirectional else 1)
        num_heads = rng.choice([1, 2, 3])
        num_layers = rng.choice([1, 2, 3, 4])
        kwargs = dict(num_layers=num_layers, num_heads=num_heads, bidirectional=bidirectional,
                      highway_bias=rng.choice([-2.0, -1.0, 0.5]))
        placement = rng.choice(["every", "last", "default"])
        if placement == "every":
            kwargs["attention_every_n_layers"] = rng.choice([2, 3, 4])
        elif placement == "last":
            kwargs["attention_last_n_layers"] = rng.randint(0, num_layers)
        for flag in ("layer_norm", "normalize_after", "proj_input_to_hidden_first", "rescale",
                     "nn_rnn_compatible_return"):
            if rng.random() < 0.4:
                kwargs[flag] = True
        if rng.random() < 0.25:
            kwargs["attn_layer_norm"] = False
        if rng.random() < 0.25:
            kwargs["weight_c_init"] = 0.5
        train = True
        if rng.random() < 0.2:  # dropout changes the initialisation; compared in eval mode
            kwargs.update(dropout=0.1, attn_dropout=0.2)
            train = False
        L, B = rng.randint(1, 6), rng.randint(1, 3)
        M = rng.choice([0, 0, 2, 3])
        configs[f"c{i}"] = dict(
            args=[rng.choice([out, out + 1, 2]), hidden, num_heads * rng.choice([1, 2])],
            kwargs=kwargs, L=L, B=B, memory=M, train=train,
            memory_none=[0] if M and num_layers > 1 and rng.random() < 0.3 else [],
            lengths=[rng.randint(1, L) for _ in range(B)] if rng.random() < 0.5 else None,
            memory_pad=([rng.randint(0, M) for _ in range(B)]
                        if M and rng.random() < 0.6 else None),
            attn_mask=rng.choice(["none", "causal", "random"]), c0=rng.random() < 0.7,
            seed=1000 + i)
    return configs


CONFIGS = draw_configs()
# A sequence that is padding from end to end: every key of its queries is masked.
FULLY_MASKED = dict(args=[4, 4, 4], kwargs=dict(num_layers=2, num_heads=2), L=4, B=3, memory=0,
                    train=True, memory_none=[], lengths=[4, 0, 2], memory_pad=None,
                    attn_mask="none", c0=True, seed=77)


def _features(config, all_names=False):
    """The options a configuration exercises (every option's name with ``all_names``)."""
    kwargs, (input_size, hidden, proj) = config["kwargs"], config["args"]
    out = hidden * (2 if kwargs.get("bidirectional") else 1)
    layers = kwargs["num_layers"]
    attention = [sru_cupy.SRUpp.layer_has_attention(i, layers,
                                                    kwargs.get("attention_every_n_layers", 1),
                                                    kwargs.get("attention_last_n_layers", -1))
                 for i in range(layers)]
    features = {
        "memory": config["memory"] > 0, "memory entry None": bool(config["memory_none"]),
        "memory_mask_pad": config["memory_pad"] is not None,
        "mask_pad": config["lengths"] is not None,
        "attn_mask causal": config["attn_mask"] == "causal",
        "attn_mask random": config["attn_mask"] == "random",
        "bidirectional": kwargs.get("bidirectional", False), "multi-head": kwargs["num_heads"] > 1,
        "attention_every_n_layers": "attention_every_n_layers" in kwargs and any(attention),
        "attention_last_n_layers": "attention_last_n_layers" in kwargs and any(attention),
        "layers without attention": not all(attention),
        "proj_input_to_hidden_first": (kwargs.get("proj_input_to_hidden_first", False)
                                       and input_size != out),
        "first layer k=4": input_size != out and not kwargs.get("proj_input_to_hidden_first"),
        "layer_norm before": kwargs.get("layer_norm", False) and not kwargs.get("normalize_after"),
        "layer_norm after": (kwargs.get("layer_norm", False)
                             and kwargs.get("normalize_after", False)),
        "no attn_layer_norm": kwargs.get("attn_layer_norm") is False,
        "rescale": kwargs.get("rescale", False),
        "nn_rnn_compatible_return": kwargs.get("nn_rnn_compatible_return", False),
        "dropout (eval)": not config["train"], "no c0": not config["c0"],
        "L=1": config["L"] == 1, "proj != heads": proj > kwargs["num_heads"],
    }
    return {feature for feature, present in features.items() if present or all_names}


def test_drawn_configurations_cover_every_option():
    covered = set().union(*(_features(c) for c in CONFIGS.values()))
    missing = {feature for feature in _features(FULLY_MASKED, all_names=True)} - covered
    assert not missing, f"CONFIG_SEED {CONFIG_SEED}: no configuration has {sorted(missing)}"


# -- the oracle's results --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    configs = dict(CONFIGS, **{"fully-masked": FULLY_MASKED})
    return run_oracle(ORACLE, configs, tmp_path_factory.mktemp("srupp_oracle"))


def _ours(config, state=None):
    torch.manual_seed(config["seed"])
    model = sru_cupy.SRUpp(*config["args"], **config["kwargs"])
    if state is not None:
        model = model.double()
        model.load_state_dict(state, strict=True)
        model.train(config["train"])
    return model


def _assert_same(ours, theirs, what):
    if theirs is None:
        assert ours is None, f"{what}: sru gives None, sru_cupy {type(ours).__name__}"
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), what
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{what}[{i}]")
    else:
        assert ours is not None, f"{what}: sru_cupy gives None"
        assert_close(ours, theirs, what, torch.float64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_srupp_parity(oracle, name):
    """Outputs, saved inputs and the gradients of input, c0, memory and every parameter."""
    case = oracle["cases"][name]
    ours = _ours(CONFIGS[name], case["state"])
    mine = run_case(ours, case["inputs"], torch)
    theirs = case["outputs"]
    for key in ("h", "c", "saved_inputs", "grad_x", "grad_c0", "grad_memory"):
        _assert_same(mine[key], theirs[key], key)
    assert mine["grad_params"].keys() == theirs["grad_params"].keys()
    for param, grad in theirs["grad_params"].items():
        _assert_same(mine["grad_params"][param], grad, f"grad of {param}")
    assert theirs["grad_x"].abs().sum() > 0  # the functional is not degenerate


@pytest.mark.parametrize("name", list(CONFIGS))
def test_initial_state_matches(oracle, name):
    """Same seed, same constructor arguments: the same state_dict keys, in the same order, with
    the same shapes, dtypes and values (the same initialisation, draw for draw)."""
    theirs = oracle["cases"][name]["initial_state"]
    mine = _ours(CONFIGS[name]).state_dict()
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype, key
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)


def test_all_padding_sequence_is_finite_where_sru_gives_nan(oracle):
    """A sequence that is all padding masks every key of its queries: sru 3.0's softmax over
    -inf gives NaN there, which reaches h, c and every parameter gradient; sru_cupy gives h = 0,
    c = c0 and finite gradients. The other sequences agree with sru."""
    case = oracle["cases"]["fully-masked"]
    theirs = case["outputs"]
    assert torch.isnan(theirs["h"][:, 1]).any()  # what sru 3.0 does (documented difference)
    mine = run_case(_ours(FULLY_MASKED, case["state"]), case["inputs"], torch)
    assert torch.isfinite(mine["h"]).all() and torch.isfinite(mine["c"]).all()
    assert all(torch.isfinite(g).all() for g in mine["grad_params"].values())
    assert (mine["h"][:, 1] == 0).all()  # every step of it is padding
    for b in (0, 2):
        assert_close(mine["h"][:, b], theirs["h"][:, b], f"h of sequence {b}", torch.float64)
        assert_close(mine["c"][:, b], theirs["c"][:, b], f"c of sequence {b}", torch.float64)
    torch.testing.assert_close(mine["c"][:, 1], case["inputs"]["c0"][:, 1])


def test_constructor_and_forward_signatures_match(oracle):
    """Every argument of sru 3.0's constructors and forwards exists in ours with the same
    default, in the same order (ours may add more at the end, such as batch_first)."""
    for cls_name, methods in oracle["signatures"].items():
        cls = getattr(sru_cupy, cls_name)
        for method, theirs in methods.items():
            mine = [(n, repr(p.default)) for n, p in
                    inspect.signature(getattr(cls, method)).parameters.items()]
            assert mine[:len(theirs)] == [tuple(p) for p in theirs], f"{cls_name}.{method}"
