"""sru_cupy.functional: array-in, array-out recurrence over NumPy, CuPy and DLPack producers.

The kernels themselves are tested exhaustively in test_launch.py; here a handful of option/dtype
combinations check that the functional layer passes everything through (against the float64 NumPy
reference), that torch tensors are read through DLPack without a copy (bfloat16 included), that
errors name the argument, and (GPU) that CuPy's current stream and the arrays' device are used.
"""


import ml_dtypes
import numpy as np
import pytest

from sru_cupy import functional as F
from sru_cupy.backends import host
from sru_cupy.reference import recurrence_backward_reference, recurrence_forward_reference

pytestmark = pytest.mark.skipif(not host.available(), reason="host backend: no C++ compiler found")


BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"f64": np.dtype(np.float64), "f32": np.dtype(np.float32), "f16": np.dtype(np.float16),
          "bf16": BF16}
#: Max error allowed, relative to max(1, max |reference|).
TOLERANCE = {"f64": 1e-12, "f32": 2e-5, "f16": 2e-2, "bf16": 8e-2}

#: (dtype, bidirectional, k, has_skip_term, use_tanh, v1, c0, mask_h, mask_pad, scale_x, V)
CASES = {
    "f64-uni-k3-tanh-all": ("f64", False, 3, True, True, False, True, True, True, 1.7, False),
    "f32-bi-k4-v1": ("f32", True, 4, True, False, True, False, False, False, 1.0, False),
    "f16-uni-noskip-pad": ("f16", False, 3, False, False, False, True, False, True, 1.0, False),
    "bf16-bi-k3-mh": ("bf16", True, 3, True, True, False, True, True, False, 1.3, False),
    "f32-bi-k3-pad-c0": ("f32", True, 3, True, False, False, True, True, True, 1.0, False),
    "f32-bi-k4-pad-V": ("f32", True, 4, True, True, False, True, False, True, 1.0, True),
    "bf16-uni-k3-v1-V": ("bf16", False, 3, True, False, True, False, True, False, 1.0, True),
}


def _problem(case, L=7, B=3, d=5, seed=0):
    dtype_name, bi, k, skip, tanh, v1, has_c0, has_mh, has_pad, scale_x, has_V = CASES[case]
    dtype = DTYPES[dtype_name]
    arith = np.float64 if dtype_name == "f64" else np.float32
    rng = np.random.default_rng(seed)
    D = d * (2 if bi else 1)

    def data(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(dtype)

    mask_pad = None
    if has_pad:
        mask_pad = np.zeros((L, B), dtype=bool)
        mask_pad[L - 2:, 1] = True
        mask_pad[:2, 2] = True
    arrays = dict(
        U=data(L, B, D * k), x=data(L, B, D) if skip and k == 3 else None,
        weight_c=None if v1 else (rng.standard_normal(2 * D) * 0.5).astype(arith),
        bias=(rng.standard_normal(2 * D) * 0.5).astype(arith),
        c0=data(B, D) if has_c0 else None,
    )
    options = dict(hidden_size=d, bidirectional=bi, has_skip_term=skip, use_tanh=tanh,
                   scale_x=scale_x,
                   mask_h=((rng.random((B, D)) > 0.3) / 0.7).astype(arith) if has_mh else None,
                   mask_pad=mask_pad, V=data(L, B, 2 * D) if has_V else None)
    grads_in = dict(grad_h=data(L, B, D), grad_c_last=data(B, D))
    return dtype_name, arrays, options, grads_in


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _assert_close(name, actual, reference, dtype_name):
    assert isinstance(actual, np.ndarray), f"{name}: expected a numpy.ndarray, got {type(actual)}"
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    a = _f64(actual)
    assert np.all(np.isfinite(a)), f"{name}: non-finite values"
    error = np.max(np.abs(a - reference), initial=0.0) / max(1.0, np.max(np.abs(reference),
                                                                           initial=0.0))
    assert error <= TOLERANCE[dtype_name], f"{name}: scaled error {error:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_matches_reference(case):
    dtype_name, arrays, options, grads_in = _problem(case)
    dtype = DTYPES[dtype_name]
    ref_args = {k: _f64(v) for k, v in arrays.items()}
    ref_h, ref_c, ref_last = recurrence_forward_reference(*ref_args.values(), **options)

    h, c, c_last = F.recurrence_forward(*arrays.values(), **options)
    for name, value, ref in (("h", h, ref_h), ("c", c, ref_c), ("c_last", c_last, ref_last)):
        assert value.dtype == dtype, f"{name}: dtype {value.dtype} != {dtype}"
        _assert_close(name, value, ref, dtype_name)

    h_inf, c_last_inf = F.recurrence_inference(*arrays.values(), **options)
    np.testing.assert_array_equal(_f64(h_inf), _f64(h))
    np.testing.assert_array_equal(_f64(c_last_inf), _f64(c_last))

    grads = F.recurrence_backward(grads_in["grad_h"], grads_in["grad_c_last"], arrays["U"],
                                  arrays["x"], arrays["weight_c"], arrays["bias"], arrays["c0"], c,
                                  **options)
    ref = recurrence_backward_reference(_f64(grads_in["grad_h"]), _f64(grads_in["grad_c_last"]),
                                        *ref_args.values(), _f64(c), **options)
    for name in ("U", "c0", "weight_c", "bias"):
        _assert_close(f"grad {name}", grads[name], ref[name], dtype_name)
    if ref["V"] is None:
        assert grads["V"] is None
    else:
        _assert_close("grad V", grads["V"], ref["V"], dtype_name)
    if ref["x"] is None:
        assert grads["x"] is None
    else:
        _assert_close("grad x", grads["x"], ref["x"], dtype_name)


# -- DLPack producers (torch CPU tensors) --------------------------------------------------------


def test_torch_cpu_tensors_are_read_without_copy():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, 6, dtype=torch.float32)
    a = F.as_array(t, "U")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (4, 3, 6)
    assert a.ctypes.data == t.data_ptr()
    assert np.shares_memory(a, t.numpy())
    # A strided view stays a view, with its strides.
    view = t.transpose(0, 1)[:, 1:]
    av = F.as_array(view, "x")
    assert av.ctypes.data == view.data_ptr() and np.shares_memory(av, t.numpy())
    np.testing.assert_array_equal(av, view.numpy())
    # bfloat16: NumPy cannot read it through DLPack; functional relabels it, still zero copy.
    b = torch.randn(5, 4).to(torch.bfloat16)
    ab = F.as_array(b, "U")
    assert ab.dtype == BF16 and ab.ctypes.data == b.data_ptr()
    np.testing.assert_array_equal(ab.astype(np.float32), b.float().numpy())
    # A generic producer (no torch, no numpy type): an object with only the two DLPack methods.

    class Producer:
        def __init__(self, array):
            self.array = array

        def __dlpack__(self, **kwargs):
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.array.__dlpack_device__()

    base = np.arange(12.0).reshape(3, 4)
    ag = F.as_array(Producer(base), "c0")
    assert type(ag) is np.ndarray and np.shares_memory(ag, base)
    assert F.as_array(None) is None

    class LegacyProducer:  # pre-2023 protocol: no max_version, a legacy "dltensor" capsule
        def __init__(self, tensor):
            self.tensor = tensor

        def __dlpack__(self, stream=None):
            return self.tensor.__dlpack__()

        def __dlpack_device__(self):
            return self.tensor.__dlpack_device__()

    al = F.as_array(LegacyProducer(b), "U")
    assert al.dtype == BF16 and al.ctypes.data == b.data_ptr()
    np.testing.assert_array_equal(al.astype(np.float32), b.float().numpy())


def _torch_problem(torch, dtype):
    _, arrays, options, grads_in = _problem("f32-bi-k3-pad-c0")
    to_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    t_arrays = {k: to_t(v) for k, v in arrays.items()}
    t_arrays["weight_c"] = torch.from_numpy(arrays["weight_c"])  # parameters stay float32
    t_arrays["bias"] = torch.from_numpy(arrays["bias"])
    t_options = dict(options, mask_h=torch.from_numpy(options["mask_h"]),
                     mask_pad=torch.from_numpy(options["mask_pad"]))
    np_arrays = {k: None if v is None else F.as_array(v).copy() for k, v in t_arrays.items()}
    return t_arrays, t_options, np_arrays, options, {k: to_t(v) for k, v in grads_in.items()}


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_torch_cpu_tensors_match_numpy(dtype_name):
    torch = pytest.importorskip("torch")
    t_arrays, t_options, np_arrays, options, t_grads = _torch_problem(torch, getattr(torch,
                                                                                     dtype_name))
    h, c, c_last = F.recurrence_forward(*t_arrays.values(), **t_options)
    nh, nc, nlast = F.recurrence_forward(*np_arrays.values(), **options)
    for got, want in ((h, nh), (c, nc), (c_last, nlast)):
        assert type(got) is np.ndarray and got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # bitwise
    grads = F.recurrence_backward(t_grads["grad_h"], t_grads["grad_c_last"], t_arrays["U"],
                                  t_arrays["x"], t_arrays["weight_c"], t_arrays["bias"],
                                  t_arrays["c0"], torch.from_numpy(c.view(np.int16)).view(
                                      torch.bfloat16) if dtype_name == "bfloat16"
                                  else torch.from_numpy(c), **t_options)
    ngrads = F.recurrence_backward(F.as_array(t_grads["grad_h"]),
                                   F.as_array(t_grads["grad_c_last"]), *list(np_arrays.values()),
                                   nc, **options)
    for name in ("U", "x", "c0", "weight_c", "bias"):
        np.testing.assert_array_equal(_f64(grads[name]), _f64(ngrads[name]), err_msg=name)


def test_out_torch_tensors_are_written_in_place():
    torch = pytest.importorskip("torch")
    t_arrays, t_options, np_arrays, options, _ = _torch_problem(torch, torch.float32)
    L, B, _ = t_arrays["x"].shape
    D = t_arrays["x"].shape[2]
    out = {"h": torch.full((L, B, D), float("nan")), "c_last": torch.full((B, D), float("nan"))}
    h, c_last = F.recurrence_inference(*t_arrays.values(), **t_options, out=out)
    assert h.ctypes.data == out["h"].data_ptr() and c_last.ctypes.data == out["c_last"].data_ptr()
    nh, nlast = F.recurrence_inference(*np_arrays.values(), **options)
    np.testing.assert_array_equal(out["h"].numpy(), nh)
    np.testing.assert_array_equal(out["c_last"].numpy(), nlast)


# -- errors ---------------------------------------------------------------------------------------


def _np_args():
    _, arrays, options, grads_in = _problem("f32-bi-k3-pad-c0")
    return arrays, options, grads_in


def test_bad_inputs_name_the_argument():
    arrays, options, grads_in = _np_args()
    with pytest.raises(TypeError, match=r"^U: expected a numpy.ndarray, a cupy.ndarray or a "
                                        r"DLPack producer .* got builtins.list"):
        F.recurrence_forward(arrays["U"].tolist(), *list(arrays.values())[1:], **options)
    with pytest.raises(ValueError, match=r"^x: expected shape"):
        F.recurrence_forward(arrays["U"], arrays["x"][:, :2], *list(arrays.values())[2:],
                             **options)
    with pytest.raises(TypeError, match=r"^bias: expected a floating dtype, got int64"):
        F.recurrence_forward(*list(arrays.values())[:3], np.zeros(arrays["bias"].shape, np.int64),
                             arrays["c0"], **options)
    with pytest.raises(ValueError, match=r"^mask_pad: expected shape"):
        F.recurrence_forward(*arrays.values(), **dict(options, mask_pad=options["mask_pad"].T))
    with pytest.raises(TypeError, match=r"^c0: expected dtype float32 like U, got float64"):
        F.recurrence_forward(*list(arrays.values())[:4], arrays["c0"].astype(np.float64),
                             **options)
    h, c, _ = F.recurrence_forward(*arrays.values(), **options)
    with pytest.raises(ValueError, match=r"^c: expected shape"):
        F.recurrence_backward(grads_in["grad_h"], None, *arrays.values(), c[1:], **options)
    with pytest.raises(TypeError, match=r"^out: expected a dict"):
        F.recurrence_forward(*arrays.values(), **options, out=[h])
    readonly = np.empty_like(h)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out\['h'\]: the array is read-only"):
        F.recurrence_forward(*arrays.values(), **options, out={"h": readonly})


def test_bad_dlpack_producers_name_the_argument():
    torch = pytest.importorskip("torch")
    arrays, options, _ = _np_args()
    x = torch.from_numpy(arrays["x"]).requires_grad_()
    with pytest.raises(TypeError, match=r"^x: could not read torch.Tensor \(CPU\) through DLPack"
                                        r".*detach"):
        F.recurrence_forward(arrays["U"], x, *list(arrays.values())[2:], **options)

    class OtherDevice:  # e.g. a Vulkan or OpenCL buffer
        def __dlpack__(self, **kwargs):
            raise AssertionError("must not be read")

        def __dlpack_device__(self):
            return (4, 0)

    with pytest.raises(TypeError, match=r"^c0: .* DLPack device type 4; expected CPU \(1\) or "
                                        r"CUDA \(2\)"):
        F.recurrence_forward(*list(arrays.values())[:4], OtherDevice(), **options)


# -- GPU ------------------------------------------------------------------------------------------


def _cupy_args(cupy, case="f32-bi-k3-pad-c0"):
    dtype_name, arrays, options, grads_in = _problem(case)
    to_c = lambda a: None if a is None else cupy.asarray(a)
    return (dtype_name, arrays, options, grads_in, {k: to_c(v) for k, v in arrays.items()},
            dict(options, mask_h=to_c(options["mask_h"]), mask_pad=to_c(options["mask_pad"])),
            {k: to_c(v) for k, v in grads_in.items()})


def _assert_gpu_close(name, actual, expected, tol=2e-5):
    import cupy
    assert isinstance(actual, cupy.ndarray), f"{name}: expected a cupy.ndarray, got {type(actual)}"
    a, e = _f64(cupy.asnumpy(actual)), _f64(expected)
    error = np.max(np.abs(a - e), initial=0.0) / max(1.0, np.max(np.abs(e), initial=0.0))
    assert error <= tol, f"{name}: scaled error {error:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["f64-uni-k3-tanh-all", "f32-bi-k4-v1", "f32-bi-k3-pad-c0"])
def test_cupy_matches_numpy(case):
    import cupy
    _, arrays, options, grads_in, carr, copt, cgrads = _cupy_args(cupy, case)
    h, c, c_last = F.recurrence_forward(*carr.values(), **copt)
    nh, nc, nlast = F.recurrence_forward(*arrays.values(), **options)
    for name, got, want in (("h", h, nh), ("c", c, nc), ("c_last", c_last, nlast)):
        _assert_gpu_close(name, got, want)
    g = F.recurrence_backward(cgrads["grad_h"], cgrads["grad_c_last"], *carr.values(), c, **copt)
    ng = F.recurrence_backward(grads_in["grad_h"], grads_in["grad_c_last"], *arrays.values(), nc,
                               **options)
    for name in ("U", "c0", "weight_c", "bias"):
        _assert_gpu_close(f"grad {name}", g[name], ng[name], tol=1e-4)


@pytest.mark.gpu
def test_mixed_numpy_and_cupy_is_a_clear_error():
    import cupy
    _, arrays, options, _, carr, copt, _ = _cupy_args(cupy)
    with pytest.raises(TypeError, match=r"mixed NumPy \(CPU\) and CuPy \(GPU\) arrays.*x is "
                                        r"numpy.ndarray \(CPU\)"):
        F.recurrence_forward(carr["U"], arrays["x"], *list(carr.values())[2:], **copt)
    with pytest.raises(TypeError, match=r"mixed NumPy \(CPU\) and CuPy \(GPU\)"):
        F.recurrence_forward(*arrays.values(), **dict(options, mask_h=copt["mask_h"]))


@pytest.mark.gpu
def test_current_stream_is_used():
    """Results on a side stream equal the default stream's, and a launch inside CUDA graph capture
    on that stream is captured (not run), then runs when the graph is launched."""
    import cupy
    _, arrays, options, _, carr, copt, _ = _cupy_args(cupy)
    # No mask_pad: its `!= 0` conversion would allocate inside the capture. With contiguous float32
    # inputs the launch layer neither allocates nor copies, so only the kernel is captured.
    options, copt = dict(options, mask_pad=None), dict(copt, mask_pad=None)
    nh, _, nlast = F.recurrence_forward(*arrays.values(), **options)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        h, _, c_last = F.recurrence_forward(*carr.values(), **copt)
        stream.synchronize()
        _assert_gpu_close("h (side stream)", h, nh)
        _assert_gpu_close("c_last (side stream)", c_last, nlast)

        out = {"h": cupy.full(h.shape, cupy.nan, h.dtype),
               "c": cupy.full(h.shape, cupy.nan, h.dtype),
               "c_last": cupy.full(c_last.shape, cupy.nan, c_last.dtype)}
        stream.synchronize()
        stream.begin_capture()
        try:
            F.recurrence_forward(*carr.values(), **copt, out=out)
        finally:
            graph = stream.end_capture()
        cupy.cuda.Device().synchronize()
        assert bool(cupy.isnan(out["h"]).all()), "the launch ran outside the capturing stream"
        graph.launch()
        stream.synchronize()
    _assert_gpu_close("h (graph)", out["h"], nh)
    _assert_gpu_close("c_last (graph)", out["c_last"], nlast)


@pytest.mark.gpu
def test_arrays_on_another_device_than_the_current_one():
    import cupy
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 CUDA devices")
    _, arrays, options, grads_in, _, _, _ = _cupy_args(cupy)
    with cupy.cuda.Device(1):
        carr = {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}
        copt = dict(options, mask_h=cupy.asarray(options["mask_h"]),
                    mask_pad=cupy.asarray(options["mask_pad"]))
        cgrad = cupy.asarray(grads_in["grad_h"])
    with cupy.cuda.Device(0):
        h, c, c_last = F.recurrence_forward(*carr.values(), **copt)
        g = F.recurrence_backward(cgrad, None, *carr.values(), c, **copt)
        assert cupy.cuda.runtime.getDevice() == 0
    assert h.device.id == 1 and c_last.device.id == 1 and g["U"].device.id == 1
    nh, nc, nlast = F.recurrence_forward(*arrays.values(), **options)
    ng = F.recurrence_backward(grads_in["grad_h"], None, *arrays.values(), nc, **options)
    with cupy.cuda.Device(1):
        _assert_gpu_close("h", h, nh)
        _assert_gpu_close("c_last", c_last, nlast)
        _assert_gpu_close("grad U", g["U"], ng["U"], tol=1e-4)
    with cupy.cuda.Device(0):
        x0 = cupy.asarray(arrays["x"])
    with pytest.raises(ValueError, match=r"^x: expected an array on device 1"):
        F.recurrence_forward(carr["U"], x0, *list(carr.values())[2:], **copt)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_torch_cuda_tensors(dtype_name):
    import cupy
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    t_arrays, t_options, np_arrays, options, _ = _torch_problem(torch, getattr(torch, dtype_name))
    cuda = lambda t: None if t is None else t.cuda()
    c_arrays = {k: cuda(v) for k, v in t_arrays.items()}
    c_options = dict(t_options, mask_h=cuda(t_options["mask_h"]),
                     mask_pad=cuda(t_options["mask_pad"]))
    view = F.as_array(c_arrays["U"], "U")
    assert isinstance(view, cupy.ndarray) and view.data.ptr == c_arrays["U"].data_ptr()
    h, c, c_last = F.recurrence_forward(*c_arrays.values(), **c_options)
    assert isinstance(h, cupy.ndarray)
    nh, _, nlast = F.recurrence_forward(*np_arrays.values(), **options)
    if dtype_name == "bfloat16":  # the GPU gets the bits: uint16 outputs
        assert h.dtype == np.uint16
        h = cupy.asarray(cupy.asnumpy(h).view(BF16).astype(np.float32))
        c_last = cupy.asarray(cupy.asnumpy(c_last).view(BF16).astype(np.float32))
        tol = 2e-2
    else:
        tol = 2e-5
    _assert_gpu_close("h", h, nh, tol)
    _assert_gpu_close("c_last", c_last, nlast, tol)


@pytest.mark.gpu
def test_bfloat16_parameters_from_another_device_stay_there():
    """bfloat16 weight_c/bias from a torch tensor on cuda:1, with device 0 current: the float32
    decoding is allocated on cuda:1 (not on the current device), and the call succeeds."""
    import cupy
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    t_arrays, t_options, np_arrays, options, _ = _torch_problem(torch, torch.float32)
    on1 = lambda t: None if t is None else t.to("cuda:1")
    c_arrays = {k: on1(v) for k, v in t_arrays.items()}
    c_arrays["weight_c"] = c_arrays["weight_c"].to(torch.bfloat16)
    c_arrays["bias"] = c_arrays["bias"].to(torch.bfloat16)
    c_options = dict(t_options, mask_h=on1(t_options["mask_h"]), mask_pad=on1(t_options["mask_pad"]))
    with cupy.cuda.Device(0), torch.cuda.device(0):
        h, _, c_last = F.recurrence_forward(*c_arrays.values(), **c_options)
        assert cupy.cuda.runtime.getDevice() == 0
    assert h.device.id == 1
    np_arrays["weight_c"] = t_arrays["weight_c"].to(torch.bfloat16).float().numpy()
    np_arrays["bias"] = t_arrays["bias"].to(torch.bfloat16).float().numpy()
    nh, _, nlast = F.recurrence_forward(*np_arrays.values(), **options)
    with cupy.cuda.Device(1):
        _assert_gpu_close("h", h, nh)
        _assert_gpu_close("c_last", c_last, nlast)


@pytest.mark.gpu
def test_torch_out_tensors_on_a_side_stream_with_the_documented_recipe():
    """out= torch tensors written on a non-default PyTorch stream: run under CuPy's view of that
    stream (the module docstring's recipe) and PyTorch reads the results on it with no other
    synchronisation, even after a long sleep queued on that stream before the call."""
    import cupy
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    t_arrays, t_options, np_arrays, options, _ = _torch_problem(torch, torch.float32)
    cuda = lambda t: None if t is None else t.cuda()
    c_arrays = {k: cuda(v) for k, v in t_arrays.items()}
    c_options = dict(t_options, mask_h=cuda(t_options["mask_h"]),
                     mask_pad=cuda(t_options["mask_pad"]))
    nh, _, nlast = F.recurrence_forward(*np_arrays.values(), **options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = {"h": torch.full(tuple(nh.shape), float("nan"), device="cuda"),
               "c_last": torch.full(tuple(nlast.shape), float("nan"), device="cuda")}
        torch.cuda._sleep(50_000_000)
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        stream = (from_external(side) if from_external is not None and hasattr(side, "__cuda_stream__")
                  else cupy.cuda.ExternalStream(side.cuda_stream))
        with stream:
            F.recurrence_forward(*c_arrays.values(), **c_options, out=dict(out))
        h_copy, c_last_copy = out["h"].cpu(), out["c_last"].cpu()  # ordered on the side stream
    torch.cuda.synchronize()
    assert not torch.isnan(h_copy).any()
    np.testing.assert_allclose(h_copy.numpy(), nh, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(c_last_copy.numpy(), nlast, rtol=2e-5, atol=2e-5)
