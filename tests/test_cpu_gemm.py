"""The layers' CPU GEMM (sru_cupy.cpu_gemm): oneDNN's 1x1 transposed convolution against a
float64 product, forward and gradients; when each route is taken; and the layers giving the same
results through either route."""

import pytest
import torch

from sru_cupy import cpu, cpu_gemm, tracing
from sru_cupy.modules import SRU, SRUCell
from sru_cupy.srupp import SRUpp


@pytest.fixture
def route(monkeypatch):
    """Sets $SRU_CUPY_CPU_GEMM for the test."""
    def set_route(value):
        monkeypatch.setenv(cpu_gemm.ROUTE_ENV_VAR, value)
    return set_route


# input shape, output width: rows that 16 to 64 images divide (the route runs in oneDNN with one
# thread and with several)
SHAPES = {
    "L128-B4-n64": ((128, 4, 64), 192),
    "L1-B512-n48": ((1, 512, 48), 144),
    "L37-B16-n40": ((37, 16, 40), 120),
    "2d-R1024-n24-m5": ((1024, 24), 5),
    "4d-n32-m1": ((4, 8, 32, 32), 1),
    # a prime number of rows: one image, which oneDNN runs with several threads only
    "2d-R1021-n24": ((1021, 24), 72),
}


@pytest.mark.parametrize("shape,m", SHAPES.values(), ids=SHAPES.keys())
def test_onednn_matmul_matches_a_float64_product(shape, m, torch_threads):
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    x = torch.randn(shape, generator=g, requires_grad=True)
    weight = (torch.randn(n, m, generator=g) / n ** 0.5).requires_grad_()
    grad = torch.randn(shape[:-1] + (m,), generator=g)
    rows = x.numel() // n
    one_image = all(rows % images for images in range(16, 65))
    assert cpu_gemm._images(rows, n) == (int(torch_threads > 1) if one_image else
                                         next(i for i in range(16, 65) if rows % i == 0))
    if one_image and torch_threads == 1:  # left to matmul
        assert not cpu_gemm._onednn_usable(x, weight)
        return
    assert cpu_gemm._onednn_usable(x, weight)
    out = cpu_gemm.onednn_matmul(x, weight)
    out.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = torch.matmul(x64, w64)
    ref.backward(grad.double())
    assert out.shape == ref.shape and out.is_contiguous()
    # float32 products of n terms: errors grow like sqrt(n) ulps of the terms' magnitude
    tol = 4e-6 * n ** 0.5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * m ** 0.5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=tol,
                               atol=tol * rows ** 0.5)
    assert x.grad.stride() == x.stride() and weight.grad.stride() == weight.stride()


def test_route_reads_the_environment(route):
    assert cpu_gemm.route() in cpu_gemm.ROUTES
    for value in cpu_gemm.ROUTES:
        route(value)
        assert cpu_gemm.route() == value
    route("")
    assert cpu_gemm.route() == "auto"
    route("mkl")
    with pytest.raises(ValueError, match=r"\$SRU_CUPY_CPU_GEMM: expected one of auto, onednn, "
                                         r"matmul, got 'mkl'"):
        cpu_gemm.route()
    x, weight = torch.randn(256, 64), torch.randn(64, 192)
    with pytest.raises(ValueError, match="SRU_CUPY_CPU_GEMM"):
        cpu_gemm.matmul(x, weight)
    # products the route never takes (other dtypes, CUDA) do not read the variable
    torch.testing.assert_close(cpu_gemm.matmul(x.double(), weight.double()),
                               torch.matmul(x.double(), weight.double()))


def _big():
    return torch.randn(32, 16, 64), torch.randn(64, 192)


# (input, weight) pairs the oneDNN route must leave to torch.matmul, and why
NOT_ONEDNN = {
    "float64": lambda: tuple(t.double() for t in _big()),
    "bfloat16": lambda: tuple(t.bfloat16() for t in _big()),
    "non-contiguous input": lambda: (_big()[0].transpose(0, 1), _big()[1]),
    "too few values": lambda: (torch.randn(4, 3, 8), torch.randn(8, 24)),
    "1-d input": lambda: (torch.randn(64), torch.randn(64, 192)),
    "batched weight": lambda: (torch.randn(2, 256, 64), torch.randn(2, 64, 192)),
}


@pytest.mark.parametrize("make", NOT_ONEDNN.values(), ids=NOT_ONEDNN.keys())
def test_onednn_route_leaves_what_it_cannot_run_to_matmul(make, route):
    route("onednn")
    x, weight = make()
    assert not cpu_gemm.uses_onednn(x, weight)
    torch.testing.assert_close(cpu_gemm.matmul(x, weight), torch.matmul(x, weight))


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("state", ["autocast", "mkldnn-disabled", "compiling", "tracing",
                                   "onnx-export", "bf16-convolutions"])
def test_onednn_route_is_left_to_the_compilers_and_autocast(state, route, monkeypatch):
    route("onednn")
    x, weight = _big()
    assert cpu_gemm.uses_onednn(x, weight)
    if state == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_gemm.uses_onednn(x, weight)
            assert cpu_gemm.matmul(x, weight).dtype == torch.bfloat16  # autocast's own choice
        return
    if state == "mkldnn-disabled":
        with torch.backends.mkldnn.flags(enabled=False):
            assert not cpu_gemm.uses_onednn(x, weight)
        return
    if state == "bf16-convolutions":  # the user lowered oneDNN's convolution precision
        conv = torch.backends.mkldnn.conv
        before = conv.fp32_precision
        conv.fp32_precision = "bf16"
        try:
            assert not cpu_gemm.uses_onednn(x, weight)
        finally:
            conv.fp32_precision = before
        return
    if state == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif state == "tracing":
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    else:
        monkeypatch.setattr(tracing, "onnx_exporting", lambda: True)
    assert not cpu_gemm.uses_onednn(x, weight)


def test_compiled_code_traces_through_the_route(route):
    """torch.compile(fullgraph=True) sees torch.matmul: no graph break, same result."""
    route("onednn")
    x, weight = _big()
    compiled = torch.compile(cpu_gemm.matmul, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, weight), torch.matmul(x, weight))


@pytest.mark.parametrize("vendor,expected", [("AuthenticAMD", True), ("HygonGenuine", True),
                                             ("GenuineIntel", False), (None, False)],
                         ids=["amd", "hygon", "intel", "unknown"])
def test_auto_route_takes_onednn_where_mkl_is_generic(vendor, expected, route, monkeypatch):
    route("auto")
    monkeypatch.setattr(cpu, "vendor", lambda: vendor)
    monkeypatch.setattr(cpu_gemm.platform, "machine", lambda: "x86_64")
    x, weight = torch.randn(128, 32, 512), torch.randn(512, 1536)
    assert cpu_gemm.uses_onednn(x, weight) is expected
    monkeypatch.setattr(cpu_gemm.platform, "machine", lambda: "aarch64")
    assert not cpu_gemm.uses_onednn(x, weight)


@pytest.mark.parametrize("rows,n,m,training,expected", [
    (4096, 512, 1536, True, True),
    (256, 512, 1536, True, True),     # n / 2 rows
    (128, 512, 1536, True, False),    # the weight gradient's product lags below n / 2 rows
    (128, 512, 1536, False, True),    # inference from 64 rows
    (64, 512, 1536, False, True),
    (32, 512, 1536, False, False),
    (512, 64, 192, False, False),     # 6.3 M multiply-adds: fixed costs dominate
    (1024, 64, 192, True, True),
], ids=lambda v: str(v))
def test_auto_route_sizes(rows, n, m, training, expected, route, monkeypatch):
    route("auto")
    monkeypatch.setattr(cpu, "vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu_gemm.platform, "machine", lambda: "x86_64")
    assert cpu_gemm.onednn_pays_off(rows, n, m, training) is expected
    x = torch.randn(rows, n, requires_grad=training)
    weight = torch.randn(n, m)
    assert cpu_gemm.uses_onednn(x, weight) is (expected and cpu_gemm._images(rows, n) > 0)
    with torch.no_grad():  # no backward to come: the inference rule
        assert cpu_gemm.uses_onednn(x, weight) is (
            cpu_gemm.onednn_pays_off(rows, n, m, False) and cpu_gemm._images(rows, n) > 0)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape,m", SHAPES.values(), ids=SHAPES.keys())
def test_onednn_linear_matches_a_float64_product(shape, m, with_bias, torch_threads):
    """linear(input, weight (m, n), bias) as a 1x1 convolution: F.linear's values and
    gradients, the weight's gradient in its own layout."""
    g = torch.Generator().manual_seed(1)
    n = shape[-1]
    x = torch.randn(shape, generator=g, requires_grad=True)
    weight = (torch.randn(m, n, generator=g) / n ** 0.5).requires_grad_()
    bias = torch.randn(m, generator=g).requires_grad_() if with_bias else None
    grad = torch.randn(shape[:-1] + (m,), generator=g)
    if not cpu_gemm._onednn_usable(x, weight.t()):
        return  # a prime number of rows with one thread: checked by the matmul test
    out = cpu_gemm._onednn_product(x, weight, transposed=False, bias=bias)
    out.backward(grad)
    params = [x, weight] + ([bias] if with_bias else [])
    doubles = [t.detach().double().requires_grad_() for t in params]
    ref = torch.nn.functional.linear(*doubles[:2], doubles[2] if with_bias else None)
    ref.backward(grad.double())
    tol = 4e-6 * n ** 0.5
    rows = x.numel() // n
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), doubles[0].grad, rtol=tol, atol=tol * m ** 0.5)
    torch.testing.assert_close(weight.grad.double(), doubles[1].grad, rtol=tol,
                               atol=tol * rows ** 0.5)
    if with_bias:
        torch.testing.assert_close(bias.grad.double(), doubles[2].grad, rtol=tol,
                                   atol=tol * rows ** 0.5)
    assert weight.grad.stride() == weight.stride()


def test_apply_linear_routes_plain_linears_only(route):
    """cpu_gemm.apply_linear: a plain nn.Linear's product through oneDNN when the route says so;
    a hooked one, a subclass or a quantized one called as it is (hooks run, quantization keeps
    its own kernels)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(32, 16, 64)
    want = layer(x)
    for name in ("matmul", "onednn"):
        route(name)
        assert cpu_gemm.uses_onednn(x, layer.weight.t()) is (name == "onednn")
        torch.testing.assert_close(cpu_gemm.apply_linear(layer, x), want, rtol=1e-5, atol=1e-5)
    calls = []
    hook = layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    torch.testing.assert_close(cpu_gemm.apply_linear(layer, x), want, rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([32, 16, 48])]
    hook.remove()

    class Doubled(torch.nn.Linear):
        def forward(self, input):
            return 2 * super().forward(input)

    doubled = Doubled(64, 48)
    doubled.load_state_dict(layer.state_dict())
    torch.testing.assert_close(cpu_gemm.apply_linear(doubled, x), 2 * want, rtol=1e-5,
                               atol=1e-5)


def test_layers_stay_quantizable_and_fx_traceable(route):
    """The layers keep plain nn.Linear modules: dynamic quantization replaces SRU++'s linear
    maps, and torch.fx keeps a Linear called through apply_linear as a leaf module."""
    route("onednn")
    torch.manual_seed(0)
    model = SRUpp(64, 64, 32, num_layers=1)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                       dtype=torch.qint8)
    linear1 = quantized.rnn_lst[0].transform_module.linear1
    assert "quantized" in type(linear1).__module__, type(linear1)
    x = torch.randn(16, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x)[0], model(x)[0], rtol=0.1, atol=0.1)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 48)

        def forward(self, input):
            return cpu_gemm.apply_linear(self.lin, input)

    graph = torch.fx.symbolic_trace(Wrapper()).graph
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["lin"]


LAYERS = {
    "cell": (SRUCell, (64, 64), {}),
    "sru-2-layers-bi": (SRU, (64, 32), dict(num_layers=2, bidirectional=True)),
    "sru-k4-batch-first": (SRU, (48, 64), dict(num_layers=1, batch_first=True)),
    "sru-projection": (SRU, (64, 64), dict(num_layers=2, projection_size=16)),
    "srupp-2-layers": (SRUpp, (64, 64, 32), dict(num_layers=2)),
    "sru-input-to-hidden": (SRU, (48, 64), dict(num_layers=1, proj_input_to_hidden_first=True)),
}


@pytest.mark.parametrize("cls,args,kwargs", LAYERS.values(), ids=LAYERS.keys())
def test_layers_agree_through_both_routes(cls, args, kwargs, route, torch_threads):
    torch.manual_seed(0)
    module = cls(*args, **kwargs)
    shape = (16, 32, args[0])  # 512 rows
    x = torch.randn(shape)
    results = {}
    for name in ("matmul", "onednn"):
        route(name)
        inp = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        h, c = module(inp)[:2]
        (h.square().sum() + c.sum()).backward()
        results[name] = [h, c, inp.grad] + [p.grad for p in module.parameters()
                                            if p.requires_grad]
        cell = module if cls is SRUCell else module.rnn_lst[0]
        if cls is SRUpp:
            first_weight = cell.transform_module.linear1.weight.t()
        elif getattr(module, "input_to_hidden", None) is not None:
            first_weight = module.input_to_hidden.weight.t()
        else:
            first_weight = cell.weight if cell.weight_proj is None else cell.weight_proj
        assert cpu_gemm.uses_onednn(torch.randn(16, 32, args[0]), first_weight) \
            is (name == "onednn")
    for got, want in zip(results["onednn"], results["matmul"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting,vendor,expected", [
    ("matmul", "AuthenticAMD", "torch.matmul ($SRU_CUPY_CPU_GEMM=matmul)"),
    ("onednn", "GenuineIntel", "oneDNN 1x1 convolutions for float32 ($SRU_CUPY_CPU_GEMM=onednn)"),
    ("auto", "AuthenticAMD", "oneDNN 1x1 convolutions for float32 products that pay off, "
                             "torch.matmul for the rest (CPU vendor AuthenticAMD; "
                             "$SRU_CUPY_CPU_GEMM=auto)"),
    ("auto", "GenuineIntel", "torch.matmul (CPU vendor GenuineIntel; $SRU_CUPY_CPU_GEMM=onednn "
                             "for oneDNN; $SRU_CUPY_CPU_GEMM=auto)"),
    ("bad", "AuthenticAMD", "unusable: $SRU_CUPY_CPU_GEMM: expected one of auto, onednn, matmul, "
                            "got 'bad'"),
], ids=["matmul", "onednn", "auto-amd", "auto-intel", "bad"])
def test_describe_says_which_route_runs(setting, vendor, expected, route, monkeypatch):
    route(setting)
    monkeypatch.setattr(cpu, "vendor", lambda: vendor)
    monkeypatch.setattr(cpu_gemm.platform, "machine", lambda: "x86_64")
    assert cpu_gemm.describe() == expected
