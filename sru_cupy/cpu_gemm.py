"""The layers' GEMMs (U = input W, SRU++'s linear maps) on the CPU: through oneDNN where PyTorch's
matmul is slow.

PyTorch's float32 ``matmul`` on the CPU calls MKL's sgemm, whose code paths are chosen by CPU
vendor. On an AMD EPYC with AVX-512 and 2 cores, U = x W for L=128 B=32 d=512 took 32 ms forward
and 100 ms forward+backward through ``matmul``, and 14-15 ms and 46-50 ms as a 1x1 transposed
convolution through oneDNN, the other GEMM engine inside PyTorch (one thread: 62 / 185 ms against
27 / 90 ms). The convolution reads x, W and writes U in the layouts the layer already has, so the
route copies none of them: the R = x.numel() / n rows of x (..., n), contiguous, are viewed as N
channels-last images (N, n, R / N, 1), W (n, m) is the transposed convolution's (n, m, 1, 1)
filters (an ``nn.Linear`` weight (m, n) is a convolution's), and the output (N, m, R / N, 1) in
channels-last order is U (..., m) row-major. Its backward is the convolution's (one call giving
dL/dx and dL/dW).

``$SRU_CUPY_CPU_GEMM`` chooses the route:

- ``auto`` (default): oneDNN for float32 on x86-64 CPUs other than Intel's (on Intel's, MKL is
  fast), when the product is large enough for the convolution's fixed costs (choosing the
  primitive, reordering the weight on every call) to pay off (``onednn_pays_off``); else the
  plain product;
- ``onednn``: oneDNN whenever it can run the product (float32 CPU tensors, oneDNN built in and
  enabled);
- ``matmul``: the plain product (``torch.matmul``, ``F.linear``) always.

TorchScript, tracing, ``torch.compile``, ``torch.export``, ONNX export and autocast always get the
plain product: the compilers choose their own GEMM, and autocast its own dtype.
"""

import os
import platform
from typing import Optional

import torch
from torch import Tensor

from . import cpu, tracing

__all__ = ["matmul", "linear", "apply_linear", "uses_onednn", "onednn_matmul", "route",
           "onednn_pays_off", "describe", "ROUTE_ENV_VAR", "ROUTES"]

ROUTE_ENV_VAR = "SRU_CUPY_CPU_GEMM"
ROUTES = ("auto", "onednn", "matmul")

# Sizes below which the oneDNN route lost to matmul on the machine above, with one thread and two
# (interleaved rounds): it has fixed costs of tens of microseconds, so at least _MIN_MULTIPLY_ADDS
# and _MIN_ROWS rows; for training, its weight gradient (an (n, rows) @ (rows, m) product) lags
# while the rows are few against the input width, so at least _MIN_TRAINING_ROWS and n / 2 rows
# (d=512: forward+backward 1.04x matmul's time at 128 rows, 0.64x at 256; d=1024: 1.13x at 256,
# 0.84x at 512; forward alone 0.6-0.85x from 64 rows on).
_MIN_MULTIPLY_ADDS = 8_000_000
_MIN_ROWS = 64
_MIN_TRAINING_ROWS = 128


def route() -> str:
    """The route $SRU_CUPY_CPU_GEMM names ("auto" when unset). Raises ValueError for another
    value."""
    value = os.environ.get(ROUTE_ENV_VAR) or "auto"
    if value not in ROUTES:
        raise ValueError(f"${ROUTE_ENV_VAR}: expected one of {', '.join(ROUTES)}, got {value!r}")
    return value


def onednn_pays_off(rows: int, n: int, m: int, training: bool) -> bool:
    """Whether the auto route sends an (rows, n) @ (n, m) product to oneDNN; ``training``: its
    backward will run too."""
    if rows * n * m < _MIN_MULTIPLY_ADDS or rows < _MIN_ROWS:
        return False
    return not training or rows >= max(_MIN_TRAINING_ROWS, n // 2)


def _matmul_is_generic_here() -> bool:
    """True on x86-64 CPUs whose vendor /proc/cpuinfo names and is not Intel: MKL chooses its
    code by vendor, and its sgemm ran at less than half oneDNN's rate on an AMD EPYC."""
    vendor = cpu.vendor()
    return platform.machine().lower() in ("x86_64", "amd64") and vendor is not None \
        and vendor != "GenuineIntel"


def _onednn_usable(input: Tensor, weight: Tensor) -> bool:
    """Whether the oneDNN route can run this product (in eager mode) with matmul's meaning."""
    return (input.device.type == "cpu" and weight.device.type == "cpu"
            and input.dtype == torch.float32 and weight.dtype == torch.float32
            and input.dim() >= 2 and weight.dim() == 2 and input.shape[-1] == weight.shape[0]
            and input.is_contiguous() and input.numel() > 0 and weight.shape[1] > 0
            and _images(input.numel() // weight.shape[0], weight.shape[0]) > 0
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and _full_precision_convolutions()
            and not torch.is_autocast_enabled("cpu"))


def _full_precision_convolutions() -> bool:
    """False where the user has let oneDNN's float32 convolutions compute in a lower precision
    (``torch.backends.mkldnn.conv.fp32_precision``): the layers' GEMM then stays a matmul,
    under matmul's own precision setting."""
    conv = getattr(torch.backends.mkldnn, "conv", None)
    return getattr(conv, "fp32_precision", "none") in ("none", "ieee")


def uses_onednn(input: Tensor, weight: Tensor) -> bool:
    """Whether ``matmul(input, weight)`` runs through oneDNN."""
    if tracing.compiling_or_tracing():
        return False  # first: the rest of the checks are not for tracers to see
    if input.device.type != "cpu" or input.dtype != torch.float32:
        return False  # before the route: a CUDA run never reads $SRU_CUPY_CPU_GEMM
    chosen = route()
    if chosen == "matmul":
        return False
    if chosen == "auto":  # the size rule first: it is cheap, and most small products stop there
        if weight.dim() != 2 or weight.shape[0] == 0:
            return False
        n, m = weight.shape
        training = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)
        if not (_matmul_is_generic_here()
                and onednn_pays_off(input.numel() // n, n, m, training)):
            return False
    return _onednn_usable(input, weight)


def _images(rows: int, n: int) -> int:
    """How many channels-last images the (rows, n) input is viewed as, so that PyTorch runs the 1x1
    convolution in oneDNN; 0 when no split does. PyTorch's condition for float32: at least 16
    images (below that, with one thread, it takes its own im2col and BLAS path), or one image of
    more than 20480 values with several threads. 16 to 64 images were as fast as one or faster
    (forward+backward up to 10 % at 1024-4096 rows, 2 threads)."""
    for images in range(16, 65):
        if rows % images == 0:
            return images
    return 1 if torch.get_num_threads() > 1 and rows * n > 20480 else 0


def _onednn_product(input: Tensor, weight: Tensor, transposed: bool,
                    bias: Optional[Tensor] = None) -> Tensor:
    """input (..., n) times the weight, (n, m) when ``transposed`` else (m, n), as a 1x1
    convolution over channels-last images of the input's rows (input contiguous, float32, on the
    CPU, ``_images`` not 0). A transposed convolution's filters are (in, out, 1, 1), a
    convolution's (out, in, 1, 1): either way the weight's own layout, so the weight is never
    copied (PyTorch copies dL/dW once inside the convolution's backward)."""
    n = input.shape[-1]
    m = weight.shape[1] if transposed else weight.shape[0]
    rows = input.numel() // n
    images = _images(rows, n)
    # (rows, n) row-major is the channels-last layout of images (images, n, rows / images, 1).
    image = input.reshape(images, rows // images, 1, n).permute(0, 3, 1, 2)
    filters = weight.unsqueeze(-1).unsqueeze(-1)
    if transposed:
        out = torch.nn.functional.conv_transpose2d(image, filters, bias)
    else:
        out = torch.nn.functional.conv2d(image, filters, bias)
    # (images, m, rows / images, 1) in channels-last order is (rows, m) row-major
    return out.permute(0, 2, 3, 1).reshape(input.shape[:-1] + (m,))


def onednn_matmul(input: Tensor, weight: Tensor) -> Tensor:
    """input (..., n) @ weight (n, m) through oneDNN (see ``_onednn_product``)."""
    return _onednn_product(input, weight, transposed=True)


def describe() -> str:
    """Which route float32 products on this CPU take, in words (for reports)."""
    try:
        chosen = route()
    except ValueError as error:
        return f"unusable: {error}"
    setting = f"${ROUTE_ENV_VAR}={chosen}"
    if chosen == "matmul":
        return f"torch.matmul ({setting})"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return f"torch.matmul (oneDNN is not built into this PyTorch, or disabled; {setting})"
    if chosen == "onednn":
        return f"oneDNN 1x1 convolutions for float32 ({setting})"
    vendor = cpu.vendor() or "unknown"
    if _matmul_is_generic_here():
        return (f"oneDNN 1x1 convolutions for float32 products that pay off, torch.matmul for the "
                f"rest (CPU vendor {vendor}; {setting})")
    return f"torch.matmul (CPU vendor {vendor}; ${ROUTE_ENV_VAR}=onednn for oneDNN; {setting})"


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.linear(input, weight, bias)`` for weight (m, n), through oneDNN on
    the CPU where that is faster (see the module docstring)."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return torch.nn.functional.linear(input, weight, bias)
    else:
        if (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")) \
                and uses_onednn(input, weight.t()):
            return _onednn_product(input, weight, transposed=False, bias=bias)
        return torch.nn.functional.linear(input, weight, bias)


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling the module would run forward hooks (its own or global ones)."""
    hooks = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(hooks, "_global_forward_hooks", None)
                or getattr(hooks, "_global_forward_pre_hooks", None))


def apply_linear(module: torch.nn.Module, input: Tensor) -> Tensor:
    """``module(input)``, with a plain ``nn.Linear`` (that type exactly, no hooks) taking
    ``linear``'s route. Anything else, a subclass, a quantized or hooked module, or any module
    under torch.fx tracing (where it stays a leaf), is called as it is, so quantization and
    tracing tools see the ``nn.Linear`` they expect. (TorchScript: call the module itself.)"""
    if type(module) is torch.nn.Linear and not _has_hooks(module) and not tracing.fx_tracing():
        return linear(input, module.weight, module.bias)
    return module(input)


def matmul(input: Tensor, weight: Tensor) -> Tensor:
    """``torch.matmul(input, weight)`` for input (..., n) and weight (n, m), through oneDNN on the
    CPU where that is faster (see the module docstring)."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return torch.matmul(input, weight)
    else:
        if uses_onednn(input, weight):
            return onednn_matmul(input, weight)
        return torch.matmul(input, weight)
