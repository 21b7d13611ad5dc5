"""Array-in, array-out SRU recurrence: NumPy on the CPU, CuPy on the GPU, any DLPack producer.

    from sru_cupy import functional as F
    h, c, c_last = F.recurrence_forward(U, x, weight_c, bias, c0, hidden_size=d)
    h, c_last = F.recurrence_inference(U, x, weight_c, bias, c0, hidden_size=d)
    grads = F.recurrence_backward(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, hidden_size=d)

Shapes, with L steps, B batch, d = hidden_size, dirs = 2 if bidirectional else 1, D = dirs * d and
k = 3 (u0, u1, u2) or 4 (plus the learned skip input u3, only with has_skip_term):

    U (L, B, D*k)   x (L, B, D) the skip input (read only when k == 3 and has_skip_term)
    weight_c, bias (2*D,) (forget gate's D values, then the reset gate's; weight_c None = v1)
    c0, mask_h (B, D)   mask_pad (L, B), nonzero = padding   h, c (L, B, D)   c_last (B, D)
    V (L, B, D*2) optional per-step offsets of weight_c: (forget, reset) per column; the gates of
    step t then use weight_c + V_t (the second output of an `sru` custom_m / transform_module)

Inputs. Each array argument may be
  * a ``numpy.ndarray``: runs on the CPU with the host backend (the C++ build of the CUDA kernels);
  * a ``cupy.ndarray``: runs on the GPU holding it, on CuPy's *current stream* of that device (a
    ``with cupy.cuda.Stream():`` block, CUDA graph capture, or ``cupy.cuda.Stream.from_external``
    (``ExternalStream`` on CuPy 13) around another framework's stream), whatever device is
    current;
  * any other DLPack producer (``torch.Tensor``, ``jax.Array``, ...): read through
    ``__dlpack_device__()`` / ``__dlpack__()`` without a copy, CPU memory as a NumPy view
    (``numpy.from_dlpack``) and CUDA memory as a CuPy view (``cupy.from_dlpack``). bfloat16
    producers are accepted too: their DLPack descriptor is relabelled as 16-bit integers (same bits,
    zero copy), viewed as ``ml_dtypes.bfloat16`` on the CPU and passed to the kernels as uint16 bits
    with ``storage_dtype="bfloat16"`` on the GPU. A torch tensor that requires grad must be
    ``.detach()``-ed first (PyTorch refuses to export it).
All arrays of one call must be on the same side: mixing CPU (NumPy) and GPU (CuPy) arrays is a
TypeError, and GPU arrays must be on one device.

Data arrays (U, x, c0, V, c, grad_h, grad_c_last) share U's dtype: float16, float32, float64 or
bfloat16 (``ml_dtypes.bfloat16`` NumPy arrays; on CuPy, uint16/int16 arrays of bfloat16 bits with
``storage_dtype="bfloat16"``). weight_c, bias and mask_h may be any floating dtype and are used in
the arithmetic dtype (float32; float64 for float64 data).

Outputs are always ``numpy.ndarray`` (CPU) or ``cupy.ndarray`` (GPU), never the producer's type;
wrap them back with e.g. ``torch.from_dlpack(h)`` / ``torch.from_numpy(h)``, or pass the producer's
own preallocated tensors in ``out=`` (also converted without a copy, then written in place), which
is also the way to get bfloat16 results into torch tensors. 16-bit outputs on the GPU are uint16
bit patterns when the inputs came as bits (bfloat16).

Streams: the kernels run on CuPy's current stream. Reading a producer's arrays is ordered by the
DLPack protocol (CuPy's stream waits for the producer's current stream), but nothing orders the
producer's later use of the outputs (``out=`` tensors included): the caller owns that. With
PyTorch tensors on a non-default stream, run the call on PyTorch's stream, e.g.
``with cupy.cuda.Stream.from_external(torch.cuda.current_stream()):`` (CuPy 14; on CuPy 13,
``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``), or synchronise CuPy's
stream before PyTorch reads the results. (``sru_cupy.SRU`` and ``sru_cupy.recurrence`` do this
themselves.)

Importing this module imports neither torch nor cupy (CuPy is imported when a CUDA array is seen).
"""

from . import interop, launch
from .call import ARRAYS, PARAM, keywords
from .interop import as_array

__all__ = ["recurrence_forward", "recurrence_inference", "recurrence_backward", "as_array"]

# Arguments read in the arithmetic dtype (launch converts them; bfloat16 bits are decoded here).
_PARAM_ARGS = tuple(name for name, spec in ARRAYS.items() if spec.kind == PARAM)
#: The keyword arguments that are arrays (converted here like the positional ones).
_ARRAY_KEYWORDS = ("mask_h", "mask_pad", "V")

class _Converted:
    """The arguments of one call as NumPy or CuPy arrays, checked to be all one kind."""

    def __init__(self, arrays, storage_dtype, out=None):
        self.arrays = {}
        self.origin = {}
        bits = {}
        for name, value in arrays.items():
            if value is None:
                self.arrays[name] = None
                continue
            self.arrays[name], bits[name] = interop.convert(value, name)
            self.origin[name] = value
        self.out = None
        if out is not None:
            if not isinstance(out, dict):
                raise TypeError(f"out: expected a dict of preallocated outputs, got "
                                f"{interop.type_name(out)}")
            self.out = {}
            for key, value in out.items():
                if value is None:
                    self.out[key] = None
                    continue
                name = f"out[{key!r}]"
                self.out[key], bits[name] = interop.convert(value, name)
                self.origin[name] = value
                if interop.is_numpy(self.out[key]) and not self.out[key].flags.writeable:
                    raise ValueError(f"{name}: the array is read-only")
        self._check_one_kind({**{k: v for k, v in self.arrays.items() if v is not None},
                              **{f"out[{k!r}]": v for k, v in (self.out or {}).items()
                                 if v is not None}})
        self.storage_dtype = storage_dtype
        if bits.get("U") and storage_dtype is None:
            self.storage_dtype = "bfloat16"  # bfloat16 producer on CUDA: U holds the bits
        for name in _PARAM_ARGS:  # parameters are read as values: decode bfloat16 bits
            if bits.get(name):
                self.arrays[name] = interop.bf16_bits_to_float32(self.arrays[name])

    def _check_one_kind(self, named):
        cpu = [n for n, a in named.items() if interop.is_numpy(a)]
        gpu = [n for n, a in named.items() if not interop.is_numpy(a)]
        if cpu and gpu:
            def describe(names, kind):
                parts = []
                for n in names[:4]:
                    source = self.origin.get(n)
                    via = "" if source is None or interop.is_numpy(source) or interop.is_cupy(source) \
                        else f" (from {interop.type_name(source)})"
                    parts.append(f"{n}{via}")
                return f"{', '.join(parts)} {'is' if len(names) == 1 else 'are'} {kind}"
            raise TypeError(
                "mixed NumPy (CPU) and CuPy (GPU) arrays in one call: "
                f"{describe(cpu, 'numpy.ndarray (CPU)')}, {describe(gpu, 'cupy.ndarray (GPU)')}; "
                "pass every array on the same device (cupy.asarray / cupy.asnumpy, or .cpu() / "
                ".cuda() for torch tensors)")

    def __getitem__(self, name):
        return self.arrays[name]


# -- the recurrence -------------------------------------------------------------------------------


def recurrence_forward(U, x, weight_c, bias, c0=None, *, hidden_size, **options):
    """SRU recurrence forward (training variant: keeps the state of every step for backward).

    Args:
        U: (L, B, D*k) the GEMM output x W, k = 3 or 4.
        x: (L, B, D) the skip input, read when k == 3 and has_skip_term (else may be None).
        weight_c: (2*D,) (or (2, D)) peephole weights v_f, v_r; None for v1 (zero).
        bias: (2*D,) (or (2, D)) gate biases b_f, b_r.
        c0: (B, D) initial state, None for zeros.
        hidden_size: d; D = d * (2 if bidirectional else 1).
        bidirectional, has_skip_term, use_tanh: the options (default False, True, False).
        scale_x: the skip scale (used when k == 3 and has_skip_term).
        mask_h: (B, D) variational dropout mask on h, None for none.
        mask_pad: (L, B) nonzero at padded steps, None for none.
        store_c: False runs the inference kernel and returns c as None.
        storage_dtype: "bfloat16" for CuPy uint16/int16 arrays holding bfloat16 bits.
        out: dict with preallocated C-contiguous outputs "h", "c", "c_last" (optional, any of them;
            NumPy/CuPy arrays or DLPack producers, written in place on CuPy's current stream: the
            caller orders the producer's later reads, see the module docstring).
        V: (L, B, D*2) per-step offsets of weight_c ((forget, reset) per column), None for none.

    Returns:
        (h (L, B, D), c (L, B, D) or None, c_last (B, D)) as NumPy or CuPy arrays in U's dtype.
    """
    options = keywords("recurrence_forward", options, launch.FORWARD_KEYWORDS)
    return launch.recurrence_forward(
        *_converted(dict(U=U, x=x, weight_c=weight_c, bias=bias, c0=c0), options),
        hidden_size=hidden_size, **options)


def _converted(arrays, options):
    """The positional arrays as NumPy or CuPy arrays (in order), and ``options`` updated in place
    with its array keywords, ``out`` and ``storage_dtype`` converted."""
    a = _Converted({**arrays, **{k: options[k] for k in _ARRAY_KEYWORDS}},
                   options["storage_dtype"], options["out"])
    options.update({k: a[k] for k in _ARRAY_KEYWORDS}, storage_dtype=a.storage_dtype, out=a.out)
    return [a[name] for name in arrays]


def recurrence_inference(U, x, weight_c, bias, c0=None, *, hidden_size, **options):
    """SRU recurrence forward without the per-step state (nothing kept for backward).

    Same arguments as :func:`recurrence_forward` (``out`` may hold "h" and "c_last").
    Returns (h (L, B, D), c_last (B, D)).
    """
    if "store_c" in options:
        raise TypeError("recurrence_inference() got an unexpected keyword argument 'store_c'")
    h, _, c_last = recurrence_forward(U, x, weight_c, bias, c0, hidden_size=hidden_size,
                                      store_c=False, **options)
    return h, c_last


def recurrence_backward(grad_h, grad_c_last, U, x, weight_c, bias, c0, c, *, hidden_size,
                        **options):
    """Gradients of the SRU recurrence.

    Args:
        grad_h: (L, B, D) dL/dh.
        grad_c_last: (B, D) dL/dc_last, or None (zero).
        U, x, weight_c, bias, c0: the forward's inputs (as for :func:`recurrence_forward`).
        c: (L, B, D) the forward's per-step state (``recurrence_forward(...)[1]``).
        mask_h, mask_pad, hidden_size, bidirectional, has_skip_term, use_tanh, scale_x: as forward.
        V: the forward's per-step offsets of weight_c, or None.
        out: dict with preallocated outputs "U", "x", "c0", "weight_c_partial", "bias_partial",
            "V".
        reduce_params: False leaves the sums over the batch of the parameter gradients to the
            caller ("weight_c" and "bias" are then absent).

    Returns:
        dict of NumPy or CuPy arrays: "U" (L, B, D*k), "x" (L, B, D) or None when the recurrence
        does not read x, "c0" (B, D) (in U's dtype); "weight_c", "bias" (2*D,) and their per-column
        partials "weight_c_partial", "bias_partial" (2, B, D) in the arithmetic dtype ("weight_c" is
        the gradient w.r.t. v even when weight_c is None); "V" (L, B, D*2) in U's dtype, or None
        without V.
    """
    options = keywords("recurrence_backward", options, launch.BACKWARD_KEYWORDS)
    return launch.recurrence_backward(
        *_converted(dict(grad_h=grad_h, grad_c_last=grad_c_last, U=U, x=x, weight_c=weight_c,
                         bias=bias, c0=c0, c=c), options),
        hidden_size=hidden_size, **options)
