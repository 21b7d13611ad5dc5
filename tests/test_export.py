"""Deployment routes of ``sru_cupy.SRU`` / ``SRUCell`` (sru_cupy/export.py): ONNX files run by ONNX
Runtime (CPU execution provider) against eager PyTorch, the scan form of the recurrence against the
custom op, and torch.export programs saved and loaded. TorchScript is tested in test_modules.py.

ONNX needs the ``onnx`` extra (onnx, onnxscript, onnxruntime), which the ``test`` extra installs.
"""

import io

import numpy as np
import pytest
import torch
from torch import nn

from sru_cupy import SRU, SRUCell, export, ops
from sru_cupy.srupp import SRUpp, SRUppAttention, SRUppCell

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _onnx_runtime():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=f"ONNX export needs {name}: pip install sru_cupy[onnx]")
    return pytest.importorskip("onnxruntime",
                               reason="running ONNX files needs onnxruntime: pip install "
                                      "sru_cupy[onnx]")


class _SplitUV(nn.Module):
    """A transform module returning (U, V)."""

    def __init__(self, n_in, u_width, v_width):
        super().__init__()
        self.u = nn.Linear(n_in, u_width, bias=False)
        self.v = nn.Linear(n_in, v_width)

    def forward(self, x):
        return self.u(x), self.v(x)


def _model(cls, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(*args, **kwargs)
    with torch.no_grad():  # off the trivial init (zero bias, unit layer norm)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs(model, L, B, seed, with_c0, with_pad):
    g = torch.Generator().manual_seed(seed)
    shape = (B, L, model.input_size) if model.batch_first else (L, B, model.input_size)
    x = torch.randn(shape, generator=g)
    layers = getattr(model, "num_layers", None)
    c_shape = (B, model.output_size) if layers is None else (layers, B, model.output_size)
    c0 = torch.randn(c_shape, generator=g) if with_c0 else None
    mask_pad = None
    if with_pad:  # lengths L, then random, the last one empty when B > 2
        lengths = [L] + torch.randint(0, L + 1, (B - 1,), generator=g).tolist()
        if B > 2:
            lengths[-1] = 0
        mask_pad = torch.arange(L).unsqueeze(1) >= torch.tensor(lengths).unsqueeze(0)
        if model.batch_first:
            mask_pad = mask_pad.t().contiguous()
    return x, c0, mask_pad


#: name -> (class, args, kwargs, inputs given: "x", "x-c0", "x-c0-pad" or "x-pad")
ONNX_CASES = {
    "cell-k4": (SRUCell, (5, 4), dict(), "x"),
    "cell-bi-k3-tanh-c0-pad": (SRUCell, (8, 4), dict(bidirectional=True, use_tanh=True),
                               "x-c0-pad"),
    "sru-bi-3layers-c0-pad": (SRU, (5, 4), dict(num_layers=3, bidirectional=True), "x-c0-pad"),
    "sru-proj-ln-rescale-pad": (SRU, (9, 4), dict(projection_size=3, layer_norm=True,
                                                  rescale=True, highway_bias=-1.0), "x-pad"),
    "sru-ln-after-noskip-v1-c0": (SRU, (5, 4), dict(layer_norm=True, normalize_after=True,
                                                    has_skip_term=False, v1=True), "x-c0"),
    "sru-batch-first-compat-proj-first": (SRU, (5, 3), dict(
        batch_first=True, bidirectional=True, nn_rnn_compatible_return=True,
        proj_input_to_hidden_first=True), "x-c0-pad"),
    "cell-custom_m-UV-pad": (SRUCell, (5, 4), dict(custom_m=_SplitUV(5, 16, 8)), "x-pad"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, path of its ONNX file, the inputs it was exported with), made once."""
    _onnx_runtime()
    folder = tmp_path_factory.mktemp("onnx")
    made = {}

    def get(name):
        if name not in made:
            cls, args, kwargs, given = ONNX_CASES[name]
            model = _model(cls, *args, **kwargs)
            x, c0, mask_pad = _inputs(model, 6, 3, 0, "c0" in given, "pad" in given)
            call = (x, c0, mask_pad) if "pad" in given else (x, c0) if "c0" in given else (x,)
            path = str(folder / f"{name}.onnx")
            export.export_onnx(model, call, path)
            made[name] = (model, path, given)
        return made[name]
    return get


@pytest.mark.parametrize("name", list(ONNX_CASES))
def test_onnx_runtime_matches_eager(exported, name):
    """Outputs within 1e-5 of eager for other lengths and batch sizes (L = 1, B = 1 included),
    padded batches where mask_pad is an input."""
    ort = _onnx_runtime()
    model, path, given = exported(name)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    parts = given.split("-")
    assert names == ["input"] + ["c0"] * ("c0" in parts) + ["mask_pad"] * ("pad" in parts)
    assert [o.name for o in session.get_outputs()] == ["h", "c"]
    for seed, (L, B) in enumerate([(6, 3), (1, 1), (11, 5), (1, 4), (3, 1)]):
        x, c0, mask_pad = _inputs(model, L, B, seed + 1, "c0" in given, "pad" in given)
        feeds = {"input": x.numpy()}
        if c0 is not None:
            feeds["c0"] = c0.numpy()
        if mask_pad is not None:
            feeds["mask_pad"] = mask_pad.numpy()
        h, c = session.run(None, feeds)
        with torch.no_grad():
            h_eager, c_eager = model(x, c0, mask_pad)
        np.testing.assert_allclose(h, h_eager.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=f"h, L={L} B={B}")
        np.testing.assert_allclose(c, c_eager.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=f"c, L={L} B={B}")
        if mask_pad is not None:
            padded = mask_pad.t() if model.batch_first else mask_pad
            h_time_major = np.swapaxes(h, 0, 1) if model.batch_first else h
            assert np.all(h_time_major[padded.numpy()] == 0)


def test_onnx_graph_is_a_scan_in_standard_operations(exported):
    """The recurrence is a Scan per direction and layer whose body is the step's elementwise
    math, all in the default ONNX domain: no custom-op library is needed."""
    import onnx
    _, path, _ = exported("sru-bi-3layers-c0-pad")
    model = onnx.load(path)
    onnx.checker.check_model(model)
    scans = [n for n in model.graph.node if n.op_type == "Scan"]
    assert len(scans) == 3 * 2
    ops_seen = set()

    def visit(graph):
        for node in graph.node:
            assert node.domain in ("", "ai.onnx"), f"{node.op_type} in domain {node.domain!r}"
            ops_seen.add(node.op_type)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
    visit(model.graph)
    assert not model.functions or all(f.domain in ("", "ai.onnx") for f in model.functions)
    assert {"Sigmoid", "Mul", "Add", "Sub", "Where"} <= ops_seen
    assert "recurrence_forward" not in str(ops_seen)


@pytest.mark.parametrize("cls", [SRUCell, SRUppCell], ids=["SRUCell", "SRUppCell"])
def test_onnx_one_step_cell(tmp_path, cls):
    """SRUCell and SRUppCell with rank-2 input (B, n_in), one step, batch size dynamic."""
    ort = _onnx_runtime()
    if cls is SRUCell:
        model = _model(SRUCell, 5, 4, bidirectional=True)
    else:
        model = _srupp_model(SRUppCell, 5, 4, bidirectional=True,
                             transform_module=SRUppAttention(5, 32, 6))
    path = str(tmp_path / "step.onnx")
    export.export_onnx(model, (torch.randn(3, 5), torch.randn(3, 8)), path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for B in (1, 6):
        x, c0 = torch.randn(B, 5), torch.randn(B, 8)
        h, c = session.run(None, {"input": x.numpy(), "c0": c0.numpy()})
        with torch.no_grad():
            h_eager, c_eager = model(x, c0)
        assert h.shape == (B, 8)
        np.testing.assert_allclose(h, h_eager.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c, c_eager.numpy(), rtol=1e-5, atol=1e-5)


def test_export_onnx_is_a_package_name():
    import sru_cupy
    assert sru_cupy.export_onnx is export.export_onnx


def test_plain_torch_onnx_export_works(tmp_path):
    """torch.onnx.export(model, (x,), path, dynamo=True) itself, no helper, no translation table."""
    ort = _onnx_runtime()
    model = _model(SRU, 5, 4, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 5)
    path = str(tmp_path / "plain.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    h = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(h, model(x)[0].numpy(), rtol=1e-5, atol=1e-5)


# -- the scan form against the op --------------------------------------------------------------

# -- torch.export ------------------------------------------------------------------------------

EXPORT_CASES = {
    "cell": (SRUCell, (5, 4), dict(), False),
    "sru-bi-2layers-c0-pad": (SRU, (5, 4), dict(num_layers=2, bidirectional=True), True),
    "cell-custom_m-UV-pad": (SRUCell, (5, 4), dict(custom_m=_SplitUV(5, 16, 8)), True),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_torch_export_save_load_matches_eager(name):
    """torch.export.export with dynamic length and batch; the ExportedProgram saved and loaded
    with torch.export.save/load gives the eager outputs at other sizes (it holds the custom op,
    whose fake implementation gives the output sizes)."""
    cls, args, kwargs, full = EXPORT_CASES[name]
    model = _model(cls, *args, **kwargs)
    x, c0, mask_pad = _inputs(model, 6, 3, 0, full, full)
    length, batch = torch.export.Dim("length", min=1), torch.export.Dim("batch", min=1)
    dims = {0: length, 1: batch}
    if full:
        layered = c0.dim() == 3
        program = torch.export.export(
            model, (x, c0, mask_pad),
            dynamic_shapes=(dims, {1 if layered else 0: batch}, dims))
    else:
        program = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    assert any(node.target == torch.ops.sru_cupy.recurrence_forward.default
               for node in program.graph.nodes)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for seed, (L, B) in enumerate([(6, 3), (1, 1), (9, 4)]):
        x, c0, mask_pad = _inputs(model, L, B, seed + 1, full, full)
        call = (x, c0, mask_pad) if full else (x,)
        with torch.no_grad():
            expected = model(*call)
            got = loaded(*call)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# -- SRU++ -------------------------------------------------------------------------------------

def _srupp_model(cls, *args, **kwargs):
    """A random SRU++ model whose attention counts (alpha 1, not the rezero 0)."""
    model = _model(cls, *args, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SRUppAttention):
                module.alpha.fill_(1.0)
    return model


def _srupp_inputs(model, L, B, M, seed, given):
    """The forward's arguments (input, c0, mask_pad, attn_mask, memory, memory_mask_pad) for the
    parts named in ``given`` ("c0", "pad", "leftpad", "causal", "memory", "mempad"), None for the
    others. "leftpad" pads the first steps, so that with the causal mask early queries have every
    key masked; "memory" gives M steps per layer (a list for SRUpp, a tensor for SRUppCell)."""
    g = torch.Generator().manual_seed(seed)
    first = model.batch_first
    given = set(given.split("-"))

    def steps(n, width):
        return torch.randn((B, n, width) if first else (n, B, width), generator=g)

    x = steps(L, model.input_size)
    stack = isinstance(model, SRUpp)
    c_shape = (model.num_layers, B, model.output_size) if stack else (B, model.output_size)
    c0 = torch.randn(c_shape, generator=g) if "c0" in given else None
    mask_pad = None
    if "pad" in given or "leftpad" in given:
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        lengths[0] = L
        if B > 2:
            lengths[-1] = 0
        time = torch.arange(L).unsqueeze(1)
        mask_pad = (time < L - lengths if "leftpad" in given else time >= lengths)
        if first:
            mask_pad = mask_pad.t().contiguous()
    memory = memory_mask_pad = None
    if "memory" in given:
        if stack:
            widths = [model.rnn_lst[i].input_size for i in range(model.num_layers)]
            memory = [steps(M, w) for w in widths]
        else:
            memory = steps(M, model.input_size)
        if "mempad" in given:
            memory_mask_pad = torch.rand((B, M) if first else (M, B), generator=g) < 0.4
    attn_mask = None
    if "causal" in given:
        attn_mask = torch.full((L, M + L), float("-inf")).triu(M + 1) if "memory" in given \
            else torch.full((L, L), float("-inf")).triu(1)
    return x, c0, mask_pad, attn_mask, memory, memory_mask_pad


def _srupp_call(args):
    """The positional arguments up to the last one given."""
    args = list(args)
    while args and args[-1] is None:
        args.pop()
    return tuple(args)


def _srupp_feeds(session, args):
    """ONNX Runtime feeds from the forward's arguments, in the order of the file's inputs."""
    values = []
    for value in args:
        if isinstance(value, list):
            values += value
        elif value is not None:
            values.append(value)
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(values), names
    return {name: value.numpy() for name, value in zip(names, values)}


def _srupp_outputs(out):
    """Eager outputs as a flat list: h, c (and for SRUpp the saved inputs)."""
    if len(out) == 3:
        return [out[0], out[1]] + list(out[2]["saved_inputs"])
    return list(out)


#: forward argument -> the parts of ``given`` (see _srupp_inputs) that make it
_SRUPP_GIVEN = {"c0": {"c0"}, "mask_pad": {"pad", "leftpad"}, "attn_mask": {"causal"},
                "memory": {"memory"}, "memory_mask_pad": {"mempad"}}

#: name -> (class, args, kwargs, inputs given, memory length M at export)
SRUPP_ONNX_CASES = {
    "srupp-2layers-heads2": (SRUpp, (5, 4, 6), dict(num_layers=2, num_heads=2), "x", 0),
    "srupp-bi-3layers-every2-c0-pad": (SRUpp, (5, 4, 6), dict(
        num_layers=3, bidirectional=True, attention_every_n_layers=2), "c0-pad", 0),
    "srupp-causal-memory-mempad-c0-leftpad": (SRUpp, (5, 4, 6), dict(num_layers=2, num_heads=3),
                                              "c0-leftpad-causal-memory-mempad", 4),
    "srupp-batch-first-compat-proj-first-prenorm-pad-memory": (SRUpp, (5, 3, 4), dict(
        batch_first=True, bidirectional=True, nn_rnn_compatible_return=True,
        proj_input_to_hidden_first=True, layer_norm=True, normalize_after=False),
        "pad-memory", 3),
    "sruppcell-causal-pad": (SRUppCell, (5, 4), dict(transform_module=SRUppAttention(5, 16, 6, 2)),
                             "pad-causal", 0),
    "sruppcell-bi-c0-causal-memory-mempad": (SRUppCell, (6, 3), dict(
        bidirectional=True, transform_module=SRUppAttention(6, 18, 4)),
        "c0-causal-memory-mempad", 2),
}


@pytest.mark.parametrize("name", list(SRUPP_ONNX_CASES))
def test_onnx_srupp_matches_eager(tmp_path, name):
    """SRUpp and SRUppCell: ONNX Runtime within 1e-5 of eager (h, c and the saved inputs) at other
    lengths, batch sizes and memory lengths (L = 1, B = 1, M = 1 included), padded batches (an
    all-padding sequence; left padding under a causal mask, where padded queries have every key
    masked: their NaN attention in ONNX must not reach the outputs)."""
    ort = _onnx_runtime()
    cls, args, kwargs, given, M = SRUPP_ONNX_CASES[name]
    model = _srupp_model(cls, *args, **kwargs)
    path = str(tmp_path / f"{name}.onnx")
    export.export_onnx(model, _srupp_call(_srupp_inputs(model, 6, 3, M, 0, given)), path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = [part for part in ["input", "c0", "mask_pad", "attn_mask", "memory", "memory_mask_pad"]
              if part == "input" or _SRUPP_GIVEN[part] & set(given.split("-"))]
    if cls is SRUpp and "memory" in inputs:
        at = inputs.index("memory")
        inputs[at:at + 1] = [f"memory_{i}" for i in range(model.num_layers)]
    assert [i.name for i in session.get_inputs()] == inputs
    outputs = ["h", "c"] + ([f"saved_input_{i}" for i in range(model.num_layers)]
                            if cls is SRUpp else [])
    assert [o.name for o in session.get_outputs()] == outputs
    sizes = [(6, 3, M), (1, 1, min(M, 1)), (11, 5, min(M, 2)), (1, 4, M), (3, 1, M + 2 * (M > 0))]
    for seed, (L, B, M_run) in enumerate(sizes):
        args_run = _srupp_inputs(model, L, B, M_run, seed + 1, given)
        got = session.run(None, _srupp_feeds(session, args_run))
        with torch.no_grad():
            expected = _srupp_outputs(model(*_srupp_call(args_run)))
        assert len(got) == len(expected)
        for out_name, a, b in zip(outputs, got, expected):
            assert np.isfinite(a).all(), f"{out_name}, L={L} B={B} M={M_run}"
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{out_name}, L={L} B={B} M={M_run}")


def test_onnx_srupp_query_with_every_key_blocked(tmp_path):
    """An attn_mask row of -inf: attention 0 in eager PyTorch (scaled_dot_product_attention), and
    the same in the ONNX file (whose softmax alone would give NaN)."""
    ort = _onnx_runtime()
    model = _srupp_model(SRUpp, 5, 4, 6, num_layers=2, num_heads=2)
    path = str(tmp_path / "blocked.onnx")

    def mask_for(L, row):
        mask = torch.full((L, L), float("-inf")).triu(1)
        mask[row] = float("-inf")
        return mask

    export.export_onnx(model, (torch.randn(4, 2, 5), None, None, mask_for(4, 1)), path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for L, B, row in [(4, 2, 1), (7, 3, 0), (1, 2, 0)]:
        x, mask = torch.randn(L, B, 5), mask_for(L, row)
        h, c, *_ = session.run(None, {"input": x.numpy(), "attn_mask": mask.numpy()})
        with torch.no_grad():
            h_eager, c_eager, _ = model(x, attn_mask=mask)
        assert torch.isfinite(h_eager).all()
        np.testing.assert_allclose(h, h_eager.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"L={L}")
        np.testing.assert_allclose(c, c_eager.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"L={L}")


def test_onnx_srupp_graph_is_standard(tmp_path):
    """Attention and recurrence in default-domain ONNX operations; one Scan per layer and
    direction."""
    import onnx
    _onnx_runtime()
    model = _srupp_model(SRUpp, 5, 4, 6, num_layers=2, bidirectional=True)
    path = str(tmp_path / "graph.onnx")
    export.export_onnx(model, (torch.randn(4, 2, 5),), path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert _domains_and_ops(proto)[0] <= {"", "ai.onnx"}
    assert {"Softmax", "MatMul", "Scan"} <= _domains_and_ops(proto)[1]
    assert sum(n.op_type == "Scan" for n in proto.graph.node) == 2 * 2


def _domains_and_ops(proto):
    import onnx
    domains, ops_seen = set(), set()

    def visit(graph):
        for node in graph.node:
            domains.add(node.domain)
            ops_seen.add(node.op_type)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
    visit(proto.graph)
    for function in proto.functions:
        domains.add(function.domain)
        visit(function)
    return domains, ops_seen


def test_plain_torch_onnx_export_of_srupp(tmp_path):
    """torch.onnx.export(model, (x,), path, dynamo=True) on an SRUpp: outputs h, c and the saved
    input of each layer, flattened."""
    ort = _onnx_runtime()
    model = _srupp_model(SRUpp, 5, 4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 5)
    path = str(tmp_path / "plain.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = _srupp_outputs(model(x))
    assert len(got) == 2 + 2
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)


def test_export_onnx_rejects_bad_arguments(tmp_path):
    """Too many arguments for the module; an SRUpp memory list with a None entry (an ONNX input
    per layer needs a tensor per layer)."""
    with pytest.raises(ValueError, match="args"):
        export.export_onnx(_model(SRU, 5, 4), (torch.randn(3, 2, 5), None, None, None),
                           str(tmp_path / "x.onnx"))
    model = _srupp_model(SRUpp, 5, 4, 6, num_layers=2)
    with pytest.raises(ValueError, match="memory"):
        export.export_onnx(model, (torch.randn(3, 2, 5), None, None, None,
                                   [None, torch.randn(2, 2, 4)]), str(tmp_path / "x.onnx"))


SRUPP_EXPORT_CASES = {
    "srupp-x": (dict(num_layers=2, num_heads=2), ""),
    "srupp-bi-c0-pad-causal-memory-mempad": (dict(num_layers=2, bidirectional=True),
                                             "c0-pad-causal-memory-mempad"),
    "srupp-batch-first-pad-memory": (dict(num_layers=3, batch_first=True,
                                          attention_last_n_layers=2), "pad-memory"),
}


@pytest.mark.parametrize("name", list(SRUPP_EXPORT_CASES))
def test_torch_export_srupp_save_load_matches_eager(name):
    """torch.export.export on an SRUpp with dynamic length, batch and memory length (M left to
    Dim.AUTO, attn_mask's key axis named: see export._dynamic_shapes); saved and loaded, the
    program gives eager's h, c and saved inputs, L = 1 and M = 1 included."""
    kwargs, given = SRUPP_EXPORT_CASES[name]
    model = _srupp_model(SRUpp, 5, 4, 6, **kwargs)
    M = 4 if "memory" in given else 0
    args = _srupp_call(_srupp_inputs(model, 6, 3, M, 0, given))
    given_names = dict(zip(["input", "c0", "mask_pad", "attn_mask", "memory",
                            "memory_mask_pad"], args))
    program = torch.export.export(model, args,
                                  dynamic_shapes=export._dynamic_shapes(model, given_names))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for seed, (L, B, M_run) in enumerate([(6, 3, M), (1, 1, min(M, 1)), (9, 4, min(M, 2))]):
        args_run = _srupp_call(_srupp_inputs(model, L, B, M_run, seed + 1, given))
        with torch.no_grad():
            expected = _srupp_outputs(model(*args_run))
            got = _srupp_outputs(loaded(*args_run))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_an_older_torch_gets_a_clear_error(monkeypatch):
    """The ONNX route uses Dim.AUTO for the memory length: where a PyTorch lacks it, the error says
    what is missing and what to do instead (the scan operator's absence: test_torch_fallback)."""
    monkeypatch.delattr(torch.export.Dim, "AUTO")
    model = SRUpp(8, 8, 4, num_layers=1).eval()
    x, memory = torch.randn(3, 2, 8), [torch.randn(2, 2, 8)]
    with pytest.raises(RuntimeError, match=r"needs torch\.export\.Dim\.AUTO"):
        export._dynamic_shapes(model, {"input": x, "memory": memory})
