"""The SRU recurrence as a PyTorch custom op with autograd.

``recurrence(U, x, weight_c, bias, c0, ...)`` -> (h, c_last) is what the modules call. Underneath
are two ``torch.library`` operators, ``sru_cupy::recurrence_forward`` and
``sru_cupy::recurrence_backward``, each with a fake (meta) implementation, and an autograd formula
registered on the forward op, so ``torch.compile(fullgraph=True)`` traces through them. They are
declared with ``torch.library.define`` and their CPU and CUDA kernels registered with
``torch.library.impl``, not with ``torch.library.custom_op``: the latter wraps its kernels to
disable dynamo, which imports ``torch._dynamo`` (about a second) on the first eager call.

Tensors reach the kernels without copies: CUDA tensors as CuPy arrays through DLPack, launched on
PyTorch's current stream of the tensor's device under a device guard; CPU tensors by address,
run by the host backend (the C++ build of the same kernels) through ``launch.host_recurrence``
after this module's own checks of what the kernels will read (the launch layer's checks and
conversions of NumPy arrays would repeat them, and on small problems cost as much as the kernel),
or, where no C++ compiler exists, by the vectorized PyTorch implementation in ``torch_fallback``.
Outputs are allocated by PyTorch.
"""

import contextlib
import ctypes
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import launch, torch_support
from .backends import host
from .numpy_fallback import user_stacklevel as _user_stacklevel

torch_support.require("layers", ImportError)  # before the torch.library calls below fail obscurely

#: Storage dtypes and their names in the kernels' instantiations.
_STORAGE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                  torch.float64: "float64"}
_STORAGE_DTYPES = tuple(_STORAGE_NAMES)
_cpu_notice_shown = False


def cpu_implementation():
    """``"host"`` (compiled kernels) when a C++ compiler is available, else ``"torch"``."""
    return "host" if host.available() else "torch"


def _notice_cpu_path():
    """Says once per process which CPU implementation runs and why, when it is the fallback."""
    global _cpu_notice_shown
    if not _cpu_notice_shown:
        _cpu_notice_shown = True
        import warnings
        if cpu_implementation() == "torch":
            warnings.warn("sru_cupy: no C++ compiler found, CPU tensors use the vectorized PyTorch "
                          "implementation (pip install sru_cupy[cpu], or set $CXX, for the compiled kernels)",
                          stacklevel=_user_stacklevel())


def _arith_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


#: cudaStreamLegacy: the legacy default stream named explicitly, which is what PyTorch's default
#: stream (handle 0) is. Handle 0 would mean CuPy's default stream, the per-thread one under
#: $CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1.
_CUDA_STREAM_LEGACY = 1


class _StreamHandle:
    """A raw stream handle through the CUDA stream protocol (``__cuda_stream__``), which
    ``cupy.cuda.Stream.from_external`` reads (not every supported PyTorch gives its streams one)."""

    def __init__(self, handle):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def cupy_stream(cupy, torch_stream, device_index):
    """CuPy's view of a PyTorch stream of device ``device_index`` (the current device): through
    ``Stream.from_external`` (CuPy 14, where ``ExternalStream`` is deprecated and warns on every
    construction), else ``ExternalStream`` (CuPy 13)."""
    handle = torch_stream.cuda_stream or _CUDA_STREAM_LEGACY
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(handle))
    return cupy.cuda.ExternalStream(handle, device_index)


@contextlib.contextmanager
def _cuda_context(device):
    """Makes ``device`` current for PyTorch and CuPy, with CuPy on PyTorch's current stream. A
    first call on the device inside CUDA graph capture is refused before CuPy is touched."""
    from .backends import cupy_backend
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        cupy_backend.check_capture(index, torch.cuda.is_current_stream_capturing())
        import cupy
        with cupy.cuda.Device(index), cupy_stream(cupy, torch.cuda.current_stream(index), index):
            yield


def _as_array(t: Optional[Tensor]):
    """A zero-copy NumPy (CPU) or CuPy (CUDA) view of a contiguous tensor; bfloat16 as its bits.

    CUDA tensors are exported with ``__dlpack__(stream=-1)``: the kernels run on the stream the
    tensors were made on (PyTorch's current one), so no synchronisation is asked for. The consumer's
    own request (CuPy's current stream) would make PyTorch record an event and a wait per tensor
    whenever that stream object is not PyTorch's current one, and refuse the per-thread stream."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    import cupy
    from .functional import _DLPackView
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cupy.from_dlpack(_DLPackView(t, export_stream=-1))


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """Contiguous, with a negative view's values materialised (the kernels read raw memory)."""
    return None if t is None else t.resolve_neg().contiguous()


def _prepared(U, x, weight_c, bias, c0, mask_h, mask_pad):
    """The op's inputs as the kernels take them, converted by PyTorch (its allocator, its stream):
    contiguous data, parameters in the arithmetic dtype, mask_pad as bytes. The launch layer then
    makes no temporaries of its own, which keeps launches legal inside CUDA graph capture."""
    arith = _arith_dtype(U.dtype)
    params = [None if t is None else t.to(arith).resolve_neg().contiguous()
              for t in (weight_c, bias, mask_h)]
    if mask_pad is not None:
        mask_pad = (mask_pad if mask_pad.dtype in (torch.bool, torch.uint8) else mask_pad != 0)
        mask_pad = mask_pad.contiguous()
    return [_contiguous(U), _contiguous(x), params[0], params[1], _contiguous(c0), params[2],
            mask_pad]


def _check_host_memory(U, hidden_size, bidirectional, has_skip_term, data, params, mask_pad):
    """What the host kernels will read, checked before they get raw addresses: the op may be
    called directly (``torch.ops.sru_cupy``, TorchScript), past ``recurrence``'s checks.
    ``data``: (name, tensor or None, shape, required), in U's dtype; ``params``: (name, tensor or
    None, number of values, required), any floating dtype; mask_pad (L, B)."""
    if hidden_size < 1:
        raise ValueError(f"hidden_size: expected a positive int, got {hidden_size}")
    D = _check_U(U, hidden_size, bidirectional)
    if U.shape[2] == 4 * D and not has_skip_term:
        raise ValueError("U: k = 4 (a learned skip slot) needs has_skip_term=True, got "
                         "has_skip_term=False")
    for name, t, shape, required in data:
        if t is None:
            if required:
                raise ValueError(f"{name}: required for these options, got None")
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != U.dtype:
            raise TypeError(f"{name}: expected dtype {U.dtype} like U, got {t.dtype}")
    for name, t, values, required in params:
        if t is None:
            if required:
                raise ValueError(f"{name}: required, got None")
            continue
        if t.numel() != values or not t.is_floating_point():
            raise ValueError(f"{name}: expected {values} floating values, got shape "
                             f"{tuple(t.shape)} of {t.dtype}")
    if mask_pad is not None and tuple(mask_pad.shape) != tuple(U.shape[:2]):
        raise ValueError(f"mask_pad: expected shape (L, B) = {tuple(U.shape[:2])}, got "
                         f"{tuple(mask_pad.shape)}")
    for name, t in [(n, t) for n, t, _, _ in data + params] + [("mask_pad", mask_pad)]:
        if t is not None and t.device != U.device:
            raise ValueError(f"{name}: expected a tensor on {U.device} like U, got {t.device}")


def _addresses(*tensors):
    """The data addresses of contiguous CPU tensors as ctypes.c_void_p (None stays None), for
    launch.host_recurrence."""
    return [None if t is None else ctypes.c_void_p(t.data_ptr()) for t in tensors]


def _host_options(U, D, L, B, hidden_size, bidirectional, has_skip_term, use_tanh, scale_x):
    return dict(dtype=_STORAGE_NAMES[U.dtype], k=U.shape[2] // D, L=L, B=B,
                hidden_size=hidden_size, bidirectional=bidirectional,
                has_skip_term=has_skip_term, use_tanh=use_tanh, scale_x=scale_x)


def _options(hidden_size, bidirectional, has_skip_term, use_tanh, scale_x, dtype, device):
    options = dict(hidden_size=hidden_size, bidirectional=bidirectional,
                   has_skip_term=has_skip_term, use_tanh=use_tanh, scale_x=scale_x)
    if dtype == torch.bfloat16 and device.type == "cuda":
        options["storage_dtype"] = "bfloat16"  # CuPy sees the bits as int16
    return options


def _device_context(device):
    return _cuda_context(device) if device.type == "cuda" else contextlib.nullcontext()


#: pt2_compliant, as ``custom_op`` would tag them: fake implementations and an autograd formula
#: make the operators safe to trace.
_TAGS = (torch.Tag.pt2_compliant_tag,)
_KERNEL_DEVICES = ("cpu", "cuda")

torch.library.define(
    "sru_cupy::recurrence_forward",
    "(Tensor U, Tensor? x, Tensor? weight_c, Tensor bias, Tensor? c0, Tensor? mask_h, "
    "Tensor? mask_pad, SymInt hidden_size, bool bidirectional, bool has_skip_term, "
    "bool use_tanh, float scale_x, bool store_c, Tensor? V=None) -> (Tensor, Tensor, Tensor)",
    tags=_TAGS)
torch.library.define(
    "sru_cupy::recurrence_backward",
    "(Tensor grad_h, Tensor? grad_c_last, Tensor U, Tensor? x, Tensor? weight_c, Tensor bias, "
    "Tensor? c0, Tensor c, Tensor? mask_h, Tensor? mask_pad, SymInt hidden_size, "
    "bool bidirectional, bool has_skip_term, bool use_tanh, float scale_x, Tensor? V=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    tags=_TAGS)


@torch.library.impl("sru_cupy::recurrence_forward", _KERNEL_DEVICES)
def _recurrence_forward_kernel(U: Tensor, x: Optional[Tensor], weight_c: Optional[Tensor],
                               bias: Tensor, c0: Optional[Tensor], mask_h: Optional[Tensor],
                               mask_pad: Optional[Tensor], hidden_size: int, bidirectional: bool,
                               has_skip_term: bool, use_tanh: bool, scale_x: float, store_c: bool,
                               V: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(h (L, B, D), c (L, B, D), or (0,) when not store_c, c_last (B, D))."""
    if U.device.type == "cpu" and cpu_implementation() == "torch":
        from . import torch_fallback
        return torch_fallback.recurrence_forward(
            U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional,
            has_skip_term, use_tanh, scale_x, store_c, V)
    L, B = U.shape[0], U.shape[1]
    D = hidden_size * (2 if bidirectional else 1)
    h = U.new_empty((L, B, D))
    c = U.new_empty((L, B, D) if store_c else (0,))
    c_last = U.new_empty((B, D))
    inputs = _prepared(U, x, weight_c, bias, c0, mask_h, mask_pad) + [_contiguous(V)]
    if U.device.type == "cpu" and L > 0 and B > 0:
        U, x, weight_c, bias, c0, mask_h, mask_pad, V = inputs
        reads_x = has_skip_term and U.shape[2] == 3 * D
        _check_host_memory(
            U, hidden_size, bidirectional, has_skip_term,
            [("x", x if reads_x else None, (L, B, D), reads_x), ("c0", c0, (B, D), False),
             ("V", V, (L, B, 2 * D), False)],
            [("weight_c", weight_c, 2 * D, False), ("bias", bias, 2 * D, True),
             ("mask_h", mask_h, B * D, False)], mask_pad)
        launch.host_recurrence(
            "sru_recurrence_forward",
            _addresses(h, c if store_c else None, c_last, U, x if reads_x else None, weight_c, V,
                       bias, c0, mask_h, mask_pad),
            **_host_options(U, D, L, B, hidden_size, bidirectional, has_skip_term, use_tanh,
                            scale_x))
        return h, c, c_last
    with _device_context(U.device):
        arrays = [_as_array(t) for t in inputs]
        out = {"h": _as_array(h), "c_last": _as_array(c_last)}
        if store_c:
            out["c"] = _as_array(c)
        launch.recurrence_forward(
            *arrays[:5], mask_h=arrays[5], mask_pad=arrays[6], V=arrays[7], store_c=store_c,
            out=out, **_options(hidden_size, bidirectional, has_skip_term, use_tanh, scale_x,
                                U.dtype, U.device))
    return h, c, c_last


@torch.library.register_fake("sru_cupy::recurrence_forward")
def _(U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional, has_skip_term,
      use_tanh, scale_x, store_c, V=None):
    L, B = U.shape[0], U.shape[1]
    D = hidden_size * (2 if bidirectional else 1)
    return (U.new_empty((L, B, D)), U.new_empty((L, B, D) if store_c else (0,)),
            U.new_empty((B, D)))


@torch.library.impl("sru_cupy::recurrence_backward", _KERNEL_DEVICES)
def _recurrence_backward_kernel(grad_h: Tensor, grad_c_last: Optional[Tensor], U: Tensor,
                                x: Optional[Tensor], weight_c: Optional[Tensor], bias: Tensor,
                                c0: Optional[Tensor], c: Tensor, mask_h: Optional[Tensor],
                                mask_pad: Optional[Tensor], hidden_size: int, bidirectional: bool,
                                has_skip_term: bool, use_tanh: bool, scale_x: float,
                                V: Optional[Tensor] = None
                                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad U, grad x ((0,) when x is not read), grad weight_c (2D,), grad bias (2D,),
    grad c0 (B, D), grad V ((L, B, 2D), or (0,) without V)); parameter gradients in float32
    (float64 for float64 data)."""
    L, B = U.shape[0], U.shape[1]
    D = hidden_size * (2 if bidirectional else 1)
    reads_x = has_skip_term and U.shape[2] == 3 * D
    if U.device.type == "cpu" and cpu_implementation() == "torch":
        from . import torch_fallback
        return torch_fallback.recurrence_backward(
            grad_h, grad_c_last, U, x, weight_c, bias, c0, c, mask_h, mask_pad, hidden_size,
            bidirectional, has_skip_term, use_tanh, scale_x, V)
    arith = _arith_dtype(U.dtype)
    grad_U = torch.empty_like(U, memory_format=torch.contiguous_format)
    grad_x = U.new_empty((L, B, D) if reads_x else (0,))
    grad_c0 = U.new_empty((B, D))
    grad_wc_partial = U.new_empty((2, B, D), dtype=arith)
    grad_bias_partial = U.new_empty((2, B, D), dtype=arith)
    grad_V = U.new_empty((L, B, 2 * D) if V is not None else (0,))
    inputs = [_contiguous(grad_h), _contiguous(grad_c_last)] + _prepared(
        U, x, weight_c, bias, c0, mask_h, mask_pad) + [_contiguous(V)]
    inputs.insert(7, _contiguous(c))  # launch order: ..., c0, c, mask_h, mask_pad, V
    if U.device.type == "cpu" and L > 0 and B > 0:
        grad_h, grad_c_last, U, x, weight_c, bias, c0, c, mask_h, mask_pad, V = inputs
        _check_host_memory(
            U, hidden_size, bidirectional, has_skip_term,
            [("x", x if reads_x else None, (L, B, D), reads_x), ("c0", c0, (B, D), False),
             ("V", V, (L, B, 2 * D), False), ("grad_h", grad_h, (L, B, D), True),
             ("c", c, (L, B, D), True), ("grad_c_last", grad_c_last, (B, D), False)],
            [("weight_c", weight_c, 2 * D, False), ("bias", bias, 2 * D, True),
             ("mask_h", mask_h, B * D, False)], mask_pad)
        launch.host_recurrence(
            "sru_recurrence_backward",
            _addresses(grad_U, grad_x if reads_x else None, grad_wc_partial, grad_bias_partial,
                       grad_c0, grad_V if V is not None else None, U, x if reads_x else None,
                       weight_c, V, bias, c0, mask_h, mask_pad, c, grad_h, grad_c_last),
            **_host_options(U, D, L, B, hidden_size, bidirectional, has_skip_term, use_tanh,
                            scale_x))
        return (grad_U, grad_x, grad_wc_partial.sum(1).reshape(2 * D),
                grad_bias_partial.sum(1).reshape(2 * D), grad_c0, grad_V)
    with _device_context(U.device):
        a = [_as_array(t) for t in inputs]
        out = {"U": _as_array(grad_U), "c0": _as_array(grad_c0),
               "weight_c_partial": _as_array(grad_wc_partial),
               "bias_partial": _as_array(grad_bias_partial)}
        if reads_x:
            out["x"] = _as_array(grad_x)
        if V is not None:
            out["V"] = _as_array(grad_V)
        launch.recurrence_backward(
            *a[:8], mask_h=a[8], mask_pad=a[9], V=a[10], out=out, reduce_params=False,
            **_options(hidden_size, bidirectional, has_skip_term, use_tanh, scale_x, U.dtype,
                       U.device))
    return (grad_U, grad_x, grad_wc_partial.sum(1).reshape(2 * D),
            grad_bias_partial.sum(1).reshape(2 * D), grad_c0, grad_V)


@torch.library.register_fake("sru_cupy::recurrence_backward")
def _(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, mask_h, mask_pad, hidden_size,
      bidirectional, has_skip_term, use_tanh, scale_x, V=None):
    L, B = U.shape[0], U.shape[1]
    D = hidden_size * (2 if bidirectional else 1)
    reads_x = has_skip_term and U.shape[2] == 3 * D
    arith = _arith_dtype(U.dtype)
    return (U.new_empty(U.shape), U.new_empty((L, B, D) if reads_x else (0,)),
            U.new_empty((2 * D,), dtype=arith), U.new_empty((2 * D,), dtype=arith),
            U.new_empty((B, D)), U.new_empty((L, B, 2 * D) if V is not None else (0,)))


def _setup_context(ctx, inputs, output):
    (U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional, has_skip_term,
     use_tanh, scale_x, store_c, V) = inputs
    h, c, c_last = output
    # Gradients of unused outputs stay None rather than zeros: the stored c (L, B, D) is never a
    # loss input, and zero-filling its gradient would cost a full pass over memory per backward.
    ctx.set_materialize_grads(False)
    ctx.options = (hidden_size, bidirectional, has_skip_term, use_tanh, scale_x)
    ctx.store_c = store_c
    ctx.has = [t is not None for t in (x, weight_c, c0, V)]
    ctx.reads_x = has_skip_term and U.shape[2] == 3 * c_last.shape[1]
    ctx.param_dtypes = (weight_c.dtype if weight_c is not None else None, bias.dtype)
    ctx.save_for_backward(U, x, weight_c, bias, c0, mask_h, mask_pad, V, c)


def _backward(ctx, grad_h, grad_c, grad_c_last):
    U, x, weight_c, bias, c0, mask_h, mask_pad, V, c = ctx.saved_tensors
    if not ctx.store_c:
        raise RuntimeError("sru_cupy: backward through a recurrence run with store_c=False "
                           "(the inference variant keeps no per-step state)")
    if grad_h is None:  # only c_last was used
        grad_h = torch.zeros_like(c)
    grad_U, grad_x, grad_wc, grad_bias, grad_c0, grad_V = recurrence_backward_op(
        grad_h, grad_c_last, U, x, weight_c, bias, c0, c, mask_h, mask_pad, *ctx.options, V)
    wc_dtype, bias_dtype = ctx.param_dtypes
    has_x, has_wc, has_c0, has_V = ctx.has
    return (grad_U, grad_x if has_x and ctx.reads_x else None,
            grad_wc.to(wc_dtype) if has_wc else None, grad_bias.to(bias_dtype),
            grad_c0 if has_c0 else None, None, None, None, None, None, None, None, None,
            grad_V if has_V else None)


torch.library.register_autograd("sru_cupy::recurrence_forward", _backward,
                                setup_context=_setup_context)

#: The operators as callables (``OpOverload``), what the modules, tests and benchmarks call.
recurrence_forward_op = torch.ops.sru_cupy.recurrence_forward.default
recurrence_backward_op = torch.ops.sru_cupy.recurrence_backward.default


def recurrence(U: Tensor, x: Optional[Tensor], weight_c: Optional[Tensor], bias: Tensor,
               c0: Optional[Tensor] = None, *, hidden_size: int, bidirectional: bool = False,
               has_skip_term: bool = True, use_tanh: bool = False, scale_x: float = 1.0,
               mask_h: Optional[Tensor] = None, mask_pad: Optional[Tensor] = None,
               V: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The SRU elementwise recurrence over U = x W: returns (h (L, B, D), c_last (B, D)).

    U (L, B, D*k) with k = 3 or 4 (learned skip), x (L, B, D) the skip input when k = 3, weight_c
    and bias (2*D,), c0 and mask_h (B, D), mask_pad (L, B) nonzero at padding; D = dirs *
    hidden_size. V (L, B, 2*D), optional, holds per-step offsets of weight_c, (forget, reset) per
    column: step t's gates use weight_c + V_t. U, x, c0 and V share one dtype (float16, bfloat16,
    float32 or float64); weight_c, bias and mask_h may be float32. Differentiable in U, x,
    weight_c, bias, c0 and V.
    """
    _check(U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional, has_skip_term,
           V)
    if U.device.type == "cpu" and not torch.compiler.is_compiling():
        _notice_cpu_path()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (U, x, weight_c, bias, c0, V))
    h, _, c_last = recurrence_forward_op(U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size,
                                         bidirectional, has_skip_term, use_tanh, float(scale_x),
                                         needs_grad, V)
    return h, c_last


def _check_U(U, hidden_size, bidirectional):
    """U's dtype, rank, device and width (3*D or 4*D columns); returns D."""
    if U.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"U: expected dtype float16, bfloat16, float32 or float64, got {U.dtype}")
    if U.dim() != 3:
        raise ValueError(f"U: expected rank 3 (L, B, D*k), got shape {tuple(U.shape)}")
    if U.device.type not in ("cpu", "cuda"):
        raise ValueError(f"U: expected a CPU or CUDA tensor, got device {U.device}")
    D = hidden_size * (2 if bidirectional else 1)
    if U.shape[2] not in (3 * D, 4 * D):
        raise ValueError(f"U: expected last axis 3*D = {3 * D} or 4*D = {4 * D} (D = {D}), "
                         f"got {U.shape[2]}")
    return D


def _check(U, x, weight_c, bias, c0, mask_h, mask_pad, hidden_size, bidirectional, has_skip_term,
           V=None):
    """Argument checks with messages naming the argument, before anything is launched."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise (ValueError if isinstance(hidden_size, int) and not isinstance(hidden_size, bool)
               else TypeError)(f"hidden_size: expected a positive int, got {hidden_size!r}")
    if not isinstance(U, Tensor):
        raise TypeError(f"U: expected a torch.Tensor, got {type(U).__name__}")
    D = _check_U(U, hidden_size, bidirectional)
    L, B = U.shape[0], U.shape[1]
    expected = {"x": ((L, B, D), True), "c0": ((B, D), True), "weight_c": ((2 * D,), False),
                "bias": ((2 * D,), False), "mask_h": ((B, D), False), "mask_pad": ((L, B), None),
                "V": ((L, B, 2 * D), True)}
    for name, t in (("x", x), ("weight_c", weight_c), ("bias", bias), ("c0", c0),
                    ("mask_h", mask_h), ("mask_pad", mask_pad), ("V", V)):
        if t is None:
            if name == "bias":
                raise ValueError("bias: expected a tensor of shape (2*D,), got None")
            if name == "x" and has_skip_term and U.shape[2] == 3 * D:
                raise ValueError("x: required when the skip term reads it (k = 3 with "
                                 "has_skip_term), got None")
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != U.device:
            raise ValueError(f"{name}: expected a tensor on {U.device} like U, got {t.device}")
        shape, same_dtype = expected[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if same_dtype and t.dtype != U.dtype:
            raise TypeError(f"{name}: expected dtype {U.dtype} like U, got {t.dtype}")
        if same_dtype is False and not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
