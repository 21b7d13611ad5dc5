"""What each feature of the package needs of PyTorch: one table, and the check that enforces it.

:data:`FEATURES` maps a feature to the oldest PyTorch release that has every API the feature uses,
with the signature used; :func:`require` raises a :class:`TorchVersionError` naming the feature,
that release, the installed one and the route to take instead. The layers check at
``import sru_cupy.ops`` (an ``ImportError``), the ONNX export where it starts (``sru_cupy.export``).

The releases are read from PyTorch's own sources at each release (the ``torch`` wheels 2.1 to
2.10), API by API:

- ``torch.library.define(qualname, schema, tags=...)`` and ``torch.library.impl(qualname, types)``
  (the function forms), ``torch.Tag.pt2_compliant_tag``: 2.2. ``torch.compiler.is_compiling``:
  2.3. ``torch.library.register_fake``, ``torch.library.register_autograd(op, backward,
  setup_context=...)`` and ``torch.is_autocast_enabled(device_type)``: 2.4. So the layers, and with
  them TorchScript, ``torch.compile(fullgraph=True)`` over the custom op and ``torch.export``
  holding it, need 2.4. ``torch.nn.functional.scaled_dot_product_attention`` (SRU++): 2.0.
- ONNX: ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`` and ``torch.export.Dim.AUTO``:
  2.5; ``torch._higher_order_ops.scan`` appears in 2.6 as ``scan_op(fn, init, xs, dim, reverse,
  additional_inputs)``, and takes ``scan_op(fn, init, xs, additional_inputs)`` from 2.7; the
  exporter translates it into ONNX ``Scan`` (``torch/onnx/_internal/exporter/_torchlib/ops/hop.py``)
  and ``torch.onnx.is_in_onnx_export()`` is true inside the dynamo-based export from 2.8.

Not required (the code adapts to older releases): ``Tensor.__dlpack__(stream=..., max_version=...)``
exists from 2.9 (older releases take ``stream`` alone and give a legacy capsule, which
``sru_cupy.functional`` asks for instead); ``torch.backends.mkldnn.conv.fp32_precision`` exists from
2.9 (older releases have no such setting: oneDNN convolutions compute in float32, which
``sru_cupy.cpu_gemm`` assumes where the setting is absent).
"""

import dataclasses
import re

import torch

__all__ = ["FEATURES", "Feature", "TorchVersionError", "installed_version", "require", "missing"]

#: The newest release the package is tested with.
TESTED = (2, 13)


@dataclasses.dataclass(frozen=True)
class Feature:
    """A feature's needs: the oldest release, the PyTorch APIs behind it and what to do instead."""

    title: str  # what the feature is, to follow "needed for"
    minimum: tuple  # (major, minor)
    apis: str  # the PyTorch APIs and the release that brought each
    alternative: str  # the route on an older PyTorch


#: feature -> what it needs. Every key is checked by a :func:`require` call in the package.
FEATURES = {
    "layers": Feature(
        "the PyTorch layers (SRU, SRUCell, SRUpp, SRUppCell, sru_cupy.ops), TorchScript, "
        "torch.compile and torch.export of them",
        (2, 4),
        "torch.library.register_fake and register_autograd and torch.is_autocast_enabled(device) "
        "(2.4), torch.compiler.is_compiling (2.3), torch.library.define/impl with tags and "
        "torch.Tag.pt2_compliant_tag (2.2)",
        "upgrade torch, or use the NumPy/CuPy layers of sru_cupy.arrays, which need no torch"),
    "onnx_export": Feature(
        "ONNX export of the SRU layers",
        (2, 8),
        "the ONNX Scan translation of torch._higher_order_ops.scan and is_in_onnx_export() "
        "inside torch.onnx.export(dynamo=True) (2.8), scan_op(fn, init, xs, additional_inputs) "
        "(2.7), torch.onnx.export(dynamo=True, dynamic_shapes=...) and torch.export.Dim.AUTO "
        "(2.5)",
        "upgrade torch, or deploy with torch.export or TorchScript"),
}


class TorchVersionError(RuntimeError):
    """The installed PyTorch is too old for a feature (or lacks one of its APIs)."""


def _format(version):
    return "%d.%d" % version


def installed_version():
    """The installed PyTorch as ``(major, minor)``: ``"2.8.0+cpu"`` and ``"2.8.0.dev20250601"`` are
    both ``(2, 8)`` (a nightly counts as the release it leads to)."""
    text = str(torch.__version__)
    match = re.match(r"^\s*(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"torch.__version__: expected a version such as '2.8.0', got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _feature(feature):
    if feature not in FEATURES:
        raise ValueError(f"feature: expected one of {', '.join(sorted(FEATURES))}, "
                         f"got {feature!r}")
    return FEATURES[feature]


def require(feature, error=TorchVersionError):
    """Raises ``error`` (a :class:`TorchVersionError` unless another class is given, e.g.
    ``ImportError`` at import time) when the installed PyTorch is older than ``feature`` needs; the
    message names the feature, the release it needs and why, the installed release and the
    alternative."""
    needs = _feature(feature)
    if installed_version() < needs.minimum:
        raise error(f"torch >= {_format(needs.minimum)} is needed for {needs.title} "
                    f"({needs.apis}); torch {torch.__version__} is installed: "
                    f"{needs.alternative}")


def missing(feature, api):
    """The :class:`TorchVersionError` (to raise) for a PyTorch new enough for ``feature`` that lacks
    ``api`` anyway, a private API a later release moved or changed."""
    needs = _feature(feature)
    return TorchVersionError(
        f"{needs.title[:1].upper()}{needs.title[1:]}: needs {api}, which torch {torch.__version__} "
        f"lacks (sru_cupy is tested with torch {_format(TESTED)}): {needs.alternative}")
