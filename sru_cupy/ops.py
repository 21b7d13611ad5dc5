"""The SRU recurrence as a PyTorch custom op with autograd.

``recurrence(U, x, weight_c, bias, c0, ...)`` -> (h, c_last) is what the modules call. Underneath
are two ``torch.library`` operators, ``sru_cupy::recurrence_forward`` and
``sru_cupy::recurrence_backward``, each with a fake (meta) implementation, and an autograd formula
registered on the forward op, so ``torch.compile(fullgraph=True)`` traces through them (eager
calls of ``recurrence`` record the same formula through an ``autograd.Function``, which costs
less per call). They are declared with ``torch.library.define`` and their CPU and CUDA kernels
registered with ``torch.library.impl``, not with ``torch.library.custom_op``: the latter wraps
its kernels to disable dynamo, which imports ``torch._dynamo`` (about a second) on the first
eager call. Their schemas, what each argument is and the kernels' argument order come from the
one description of the call, :mod:`sru_cupy.call`; arguments travel by name.

Tensors reach the kernels without copies, by address: the op checks shapes, dtypes and devices
once (against the call's description), allocates the outputs with PyTorch (its allocator, its
stream) and hands the data pointers to the kernels: on the CPU to the host backend (the C++ build
of the same kernels), on a GPU to the loaded CUDA kernel on PyTorch's current stream of the
tensor's device. Where no C++ compiler exists, CPU tensors run the vectorized PyTorch
implementation in ``torch_fallback``; inside ONNX export, the scan over time there.
"""

import ctypes
import threading
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import implementation, launch, torch_fallback, torch_support, tracing
from .backends import host
from .call import (BACKWARD, DATA, FORWARD, KERNEL_OUTPUTS, MASK, OP_ARGUMENTS, OP_RESULTS,
                   PARAM, PARTIAL, RecurrenceCall, bind_op_arguments, check_hidden_size, op_schema)
from .interop import CUDA_STREAM_LEGACY

torch_support.require("layers", ImportError)  # before the torch.library calls below fail obscurely

#: Storage dtypes and their names in the kernels' instantiations.
STORAGE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                 torch.float64: "float64"}
#: The option arguments of the operators, in schema order (after the arrays).
_OPTION_NAMES = ("hidden_size", "bidirectional", "has_skip_term", "use_tanh", "scale_x")


def _arith_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _describe(args, with_v=None):
    """The call of the operator arguments ``args`` (by name), checked (memoised in eager mode)."""
    U = args["U"]
    _check_U(U)
    describe = RecurrenceCall.checked if torch.compiler.is_compiling() else RecurrenceCall.describe
    return describe(
        U.shape, STORAGE_NAMES[U.dtype], args["hidden_size"], args["bidirectional"],
        args["has_skip_term"], args["use_tanh"], args["scale_x"],
        with_v=args["V"] is not None if with_v is None else with_v,
        store_c=args.get("store_c", True))


def _check_U(U):
    if not isinstance(U, Tensor):
        raise TypeError(f"U: expected a torch.Tensor, got {type(U).__name__}")
    if U.dtype not in STORAGE_NAMES:
        raise TypeError(f"U: expected dtype float16, bfloat16, float32 or float64, got {U.dtype}")
    if U.dim() != 3:
        raise ValueError(f"U: expected rank 3 (L, B, D*k), got shape {tuple(U.shape)}")
    if U.device.type not in ("cpu", "cuda"):
        raise ValueError(f"U: expected a CPU or CUDA tensor, got device {U.device}")


def _check_tensors(kernel, call, args):
    """The inputs of ``kernel`` in ``args`` (by name) against ``call``: tensors on U's device,
    present where required, of their shapes; data tensors of U's dtype, parameters floating,
    mask_pad bool, integer or floating. Messages name the argument."""
    U = args["U"]
    for name, _, _, _ in call.arrays(kernel).inputs:
        t = args.get(name)
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")

    def check_tensor(name, t, kind):
        if t.device != U.device:
            raise ValueError(f"{name}: expected a tensor on {U.device} like U, got {t.device}")
        if kind == DATA:
            if t.dtype != U.dtype:
                raise TypeError(f"{name}: expected dtype {U.dtype} like U, got {t.dtype}")
        elif kind == PARAM:
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        elif t.is_complex():
            raise TypeError(f"{name}: expected a bool, integer or floating dtype, got {t.dtype}")

    call.check(kernel, args, check_tensor)


def _prepared(call, kernel, args):
    """The inputs as the kernels read them, converted by PyTorch (its allocator, its stream):
    contiguous data with negative views materialised, parameters in the arithmetic dtype, mask_pad
    as bytes. Nothing else is allocated afterwards, which keeps launches legal inside CUDA graph
    capture."""
    arith = _arith_dtype(args["U"].dtype)
    prepared = {}
    for name, _, kind, _ in call.arrays(kernel).inputs:
        t = args.get(name)
        if t is None:
            continue
        if kind == PARAM:
            if t.dtype != arith:  # (a same-dtype .to() still costs a microsecond a call)
                t = t.to(arith)
        elif kind == MASK and t.dtype not in (torch.bool, torch.uint8):
            t = t != 0
        prepared[name] = t.resolve_neg().contiguous()
    return prepared


def _allocated(kernel, call, U):
    """The outputs of ``kernel``, by name: fresh tensors where they take part, empty (0,) ones
    where they do not (as the operators return them)."""
    arith = _arith_dtype(U.dtype)
    outputs = {name: U.new_empty(shape, dtype=arith if kind == PARTIAL else U.dtype)
               for name, shape, kind, _ in call.arrays(kernel).outputs}
    for name in KERNEL_OUTPUTS[kernel]:
        if name not in outputs:
            outputs[name] = U.new_empty((0,))
    return outputs


def _cpu_address(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _cuda_address(t):
    # A device address as an 8-byte value is what a pointer parameter takes (None: null).
    return None if t is None else np.uint64(t.data_ptr())


def _current_raw_stream(index):
    """The raw handle of PyTorch's current stream of device ``index`` (the default stream named
    explicitly as cudaStreamLegacy, never CuPy's 0)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    handle = raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream
    return handle or CUDA_STREAM_LEGACY


def _run(kernel, call, arrays, device):
    """Runs ``kernel`` over ``arrays`` (contiguous tensors by name, checked) on their device."""
    addresses = {name: t for name, t in arrays.items() if t is not None}
    if device.type == "cpu":
        launch.run_checked(kernel, call, {n: _cpu_address(t) for n, t in addresses.items()},
                           host, None)
        return
    from .backends import cupy_backend
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not cupy_backend.is_loaded(index):  # a first call: loading is refused inside capture
        with torch.cuda.device(index):
            cupy_backend.check_capture(index, torch.cuda.is_current_stream_capturing())
            cupy_backend.ensure_loaded(index)
    stream = (index, _current_raw_stream(index))
    if torch.cuda.current_device() == index:
        launch.run_checked(kernel, call, {n: _cuda_address(t) for n, t in addresses.items()},
                           cupy_backend, None, stream)
    else:
        with torch.cuda.device(index):
            launch.run_checked(kernel, call,
                               {n: _cuda_address(t) for n, t in addresses.items()},
                               cupy_backend, None, stream)


def _empty_call_results(kernel, call, args, outputs):
    """What the kernels would give for a call without steps or batch: L == 0 leaves the final
    state c0 (forward) and passes dL/dc_last on to c0 (backward); B == 0 has nothing to write."""
    if call.B == 0:
        return
    if kernel == FORWARD:
        c0 = args["c0"]
        outputs["c_last"].copy_(c0) if c0 is not None else outputs["c_last"].zero_()
    else:
        for name in ("grad_weight_c_partial", "grad_bias_partial", "grad_V"):
            outputs[name].zero_()
        grad_c_last = args["grad_c_last"]
        if grad_c_last is not None:
            outputs["grad_c0"].copy_(grad_c_last)
        else:
            outputs["grad_c0"].zero_()


#: Set by ``recurrence`` around its own call of the forward operator, whose arguments it has just
#: checked against the same description: the operator then does not check them a second time.
#: Per thread, and only in eager mode; any other caller (torch.ops, TorchScript, a compiled graph,
#: the autograd engine running the backward) is checked by the operator.
_checked_by_caller = threading.local()


def _implementation(kernel, args, kwargs):
    """The CPU and CUDA implementation of both operators."""
    args = bind_op_arguments(kernel, args, kwargs)  # the schema makes hidden_size an int
    checked = getattr(_checked_by_caller, "call", None)
    _checked_by_caller.call = None
    U = args["U"]
    if checked is not None and kernel == FORWARD and checked[1] is U:
        call = checked[0]
    else:
        call = _describe(args)
        _check_tensors(kernel, call, args)
    if U.device.type == "cpu" and implementation.for_torch_cpu() == implementation.TORCH:
        run = (torch_fallback.recurrence_forward if kernel == FORWARD
               else torch_fallback.recurrence_backward)
        return run(call, args)
    outputs = _allocated(kernel, call, U)
    if call.empty:
        _empty_call_results(kernel, call, args, outputs)
    else:
        _run(kernel, call, {**_prepared(call, kernel, args), **outputs}, U.device)
    if kernel == FORWARD:
        return tuple(outputs[name] for name in OP_RESULTS[FORWARD])
    D = call.D
    outputs["grad_weight_c"] = outputs.pop("grad_weight_c_partial").sum(1).reshape(2 * D)
    outputs["grad_bias"] = outputs.pop("grad_bias_partial").sum(1).reshape(2 * D)
    return tuple(outputs[name] for name in OP_RESULTS[BACKWARD])


def _fake(kernel, args, kwargs):
    """The operators' fake (meta) implementation: outputs of the right shapes, symbolic sizes
    kept symbolic."""
    args = bind_op_arguments(kernel, args, kwargs)
    U = args["U"]
    call = RecurrenceCall.traced(U.shape, STORAGE_NAMES.get(U.dtype, "float32"),
                                 *(args[name] for name in _OPTION_NAMES),
                                 with_v=args["V"] is not None, store_c=args.get("store_c", True))
    outputs = _allocated(kernel, call, U)
    if kernel == FORWARD:
        return tuple(outputs[name] for name in OP_RESULTS[FORWARD])
    arith = _arith_dtype(U.dtype)
    outputs["grad_weight_c"] = U.new_empty((2 * call.D,), dtype=arith)
    outputs["grad_bias"] = U.new_empty((2 * call.D,), dtype=arith)
    return tuple(outputs[name] for name in OP_RESULTS[BACKWARD])


#: pt2_compliant, as ``custom_op`` would tag them: fake implementations and an autograd formula
#: make the operators safe to trace.
_TAGS = (torch.Tag.pt2_compliant_tag,)
_KERNEL_DEVICES = ("cpu", "cuda")
_OP_NAMES = {FORWARD: "sru_cupy::recurrence_forward", BACKWARD: "sru_cupy::recurrence_backward"}

for _kernel, _name in _OP_NAMES.items():
    torch.library.define(_name, op_schema(_kernel), tags=_TAGS)
    torch.library.impl(_name, _KERNEL_DEVICES)(
        lambda *args, _kernel=_kernel, **kwargs: _implementation(_kernel, args, kwargs))
    torch.library.register_fake(_name)(
        lambda *args, _kernel=_kernel, **kwargs: _fake(_kernel, args, kwargs))


def _setup_context(ctx, inputs, output):
    args = bind_op_arguments(FORWARD, inputs, {})
    h, c, c_last = output
    # Gradients of unused outputs stay None rather than zeros: the stored c (L, B, D) is never a
    # loss input, and zero-filling its gradient would cost a full pass over memory per backward.
    ctx.set_materialize_grads(False)
    ctx.options = {name: args[name] for name in _OPTION_NAMES}
    ctx.store_c = args["store_c"]
    ctx.given = {name for name in ("x", "weight_c", "c0", "V") if args[name] is not None}
    U = args["U"]
    ctx.reads_x = args["has_skip_term"] and U.shape[2] == 3 * c_last.shape[1]
    ctx.param_dtypes = {name: args[name].dtype for name in ("weight_c", "bias")
                        if args[name] is not None}
    ctx.save_for_backward(*(args[name] for name in _SAVED), c)


#: The forward's inputs the backward reads (then c, the forward's output).
_SAVED = ("U", "x", "weight_c", "bias", "c0", "mask_h", "mask_pad", "V")


def _backward(ctx, grad_h, grad_c, grad_c_last):
    saved = dict(zip(_SAVED + ("c",), ctx.saved_tensors))
    if not ctx.store_c:
        raise RuntimeError("sru_cupy: backward through a recurrence run with store_c=False "
                           "(the inference variant keeps no per-step state)")
    if grad_h is None:  # only c_last was used
        grad_h = torch.zeros_like(saved["c"])
    values = dict(saved, grad_h=grad_h, grad_c_last=grad_c_last, **ctx.options)
    grads = dict(zip(OP_RESULTS[BACKWARD], recurrence_backward_op(
        *(values[name] for name, _ in OP_ARGUMENTS[BACKWARD]))))
    result = {
        "U": grads["grad_U"],
        "x": grads["grad_x"] if "x" in ctx.given and ctx.reads_x else None,
        "weight_c": (grads["grad_weight_c"].to(ctx.param_dtypes["weight_c"])
                     if "weight_c" in ctx.given else None),
        "bias": grads["grad_bias"].to(ctx.param_dtypes["bias"]),
        "c0": grads["grad_c0"] if "c0" in ctx.given else None,
        "V": grads["grad_V"] if "V" in ctx.given else None,
    }
    return tuple(result.get(name) for name, _ in OP_ARGUMENTS[FORWARD])


torch.library.register_autograd(_OP_NAMES[FORWARD], _backward, setup_context=_setup_context)

#: The operators as callables (``OpOverload``), what the modules, tests and benchmarks call.
recurrence_forward_op = torch.ops.sru_cupy.recurrence_forward.default
recurrence_backward_op = torch.ops.sru_cupy.recurrence_backward.default


class _EagerRecurrence(torch.autograd.Function):
    """:func:`recurrence`'s eager route: the forward operator under an autograd node of its own
    with the very formula registered on the operator (``_setup_context``, ``_backward``). Called
    with grad mode off in here, the operator skips PyTorch's wrapper of registered formulas, which
    re-binds all 14 operator arguments on every forward that records a graph (it took about
    35 us of a 500 us training step of a tiny layer on the CPU, more on a GPU machine's host).
    Compiled, traced and scripted code, and anyone calling
    ``torch.ops.sru_cupy.recurrence_forward``, get the registered formula."""

    @staticmethod
    def forward(*inputs):
        return recurrence_forward_op(*inputs)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


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
    weight_c, bias, c0 and V. Inside ONNX export, the scan over time of ``torch_fallback``.
    """
    args = dict(U=U, x=x, weight_c=weight_c, bias=bias, c0=c0, mask_h=mask_h, mask_pad=mask_pad,
                hidden_size=hidden_size, bidirectional=bidirectional,
                has_skip_term=has_skip_term, use_tanh=use_tanh, scale_x=float(scale_x), V=V)
    check_hidden_size(hidden_size, TypeError)
    if tracing.onnx_exporting():  # standard ONNX operations: a Scan over time
        call = RecurrenceCall.traced(U.shape, STORAGE_NAMES.get(U.dtype, "float32"),
                                     *(args[name] for name in _OPTION_NAMES),
                                     with_v=V is not None, store_c=False)
        h, _, c_last = torch_fallback.recurrence_scan(call, args)
        return h, c_last
    # c is kept only where a backward may follow (the inference variant otherwise); what is not a
    # tensor is refused by the checks below
    args["store_c"] = torch.is_grad_enabled() and any(
        getattr(t, "requires_grad", False) for t in (U, x, weight_c, bias, c0, V))
    call = _describe(args)
    _check_tensors(FORWARD, call, args)
    eager = not torch.compiler.is_compiling()
    if eager and U.device.type == "cpu":
        implementation.announce_once(implementation.for_torch_cpu)
    if eager:
        _checked_by_caller.call = (call, U)
    forward = (_EagerRecurrence.apply if args["store_c"] and eager and not torch.jit.is_tracing()
               else recurrence_forward_op)
    try:
        h, _, c_last = forward(*(args[name] for name, _ in OP_ARGUMENTS[FORWARD]))
    finally:
        if eager:
            _checked_by_caller.call = None
    return h, c_last
