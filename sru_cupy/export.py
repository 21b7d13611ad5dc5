"""ONNX export of the layers.

``torch.jit.script`` and ``torch.export.export`` keep the custom op ``sru_cupy::recurrence_forward``
(TorchScript and an ExportedProgram run it wherever sru_cupy is imported). An ONNX file must run
without sru_cupy: inside ``torch.onnx.export`` (``tracing.onnx_exporting()``) ``ops.recurrence``
runs ``torch_fallback.recurrence_scan`` instead of the op, one ``torch._higher_order_ops.scan``
per direction whose body is one step's elementwise math, which the dynamo-based exporter
translates into an ONNX ``Scan`` node. So the plain

    torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=...)

works on SRU, SRUCell, SRUpp and SRUppCell; ``export_onnx`` adds dynamic sequence length, batch
size and memory length and names the inputs and outputs. (An ExportedProgram made by torch.export
holds the custom op and is not translated: export the module.) An SRUpp's ONNX outputs are h, c
and the saved input of each layer (``state["saved_inputs"]`` flattened, the next call's memory);
its memory input is one tensor per layer. SRU++ attention (scaled_dot_product_attention) exports
as standard operations; a query whose keys are all masked gets attention 0 as in PyTorch.
"""

from typing import Optional, Sequence

import torch

from . import torch_support
from .srupp import SRUpp, SRUppCell

__all__ = ["export_onnx"]


def export_onnx(model: torch.nn.Module, args: Sequence, path, *, dynamic: bool = True,
                input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True, ...)`` for an SRU, SRUCell, SRUpp or
    SRUppCell, with dynamic sizes and named inputs and outputs.

    ``args`` is the forward's positional arguments, any trailing ones left out, any of them
    None: (input, c0, mask_pad) for SRU and SRUCell, (input, c0, mask_pad, attn_mask, memory,
    memory_mask_pad) for SRUpp and SRUppCell. With ``dynamic`` the sequence length, batch size
    and memory length are dynamic axes. The ONNX inputs are named after the arguments given (an
    SRUpp's memory, a list with one tensor per layer, gives memory_0, memory_1, ...) and the
    outputs h, c (and for SRUpp the inputs of the layers, saved_input_0, saved_input_1, ..., the
    next call's memory), unless names are given. Other keyword arguments go to
    ``torch.onnx.export``. Returns its ONNXProgram.
    """

    torch_support.require("onnx_export")
    args = tuple(args)
    attention = isinstance(model, (SRUpp, SRUppCell))
    arg_names = ["input", "c0", "mask_pad"] + (
        ["attn_mask", "memory", "memory_mask_pad"] if attention else [])
    if len(args) > len(arg_names):
        raise ValueError(f"args: expected at most {len(arg_names)} values "
                         f"({', '.join(arg_names)}) for {type(model).__name__}, got {len(args)}")
    given = dict(zip(arg_names, args))
    memory = given.get("memory")
    if isinstance(model, SRUpp) and memory is not None:
        if not isinstance(memory, (list, tuple)) or any(m is None for m in memory):
            raise ValueError("memory: export_onnx expects None or a list of tensors, one per "
                             "layer (no None entries)")
    if dynamic and "dynamic_shapes" not in kwargs:
        kwargs["dynamic_shapes"] = _dynamic_shapes(model, given)
    present = []
    for name, value in given.items():
        if isinstance(value, (list, tuple)):
            present += [f"{name}_{i}" for i in range(len(value))]
        elif value is not None:
            present.append(name)
    outputs = ["h", "c"]
    if isinstance(model, SRUpp):
        outputs += [f"saved_input_{i}" for i in range(model.num_layers)]
    return torch.onnx.export(model, args, path, dynamo=True,
                             input_names=list(input_names or present),
                             output_names=list(output_names or outputs), **kwargs)


def _dynamic_shapes(model: torch.nn.Module, given: dict) -> tuple:
    """``dynamic_shapes`` for the arguments ``given`` (name -> value): the length L, batch size B
    and, with memory, the key count M + L of attn_mask dynamic. The memory length M is left for
    torch.export to infer (Dim.AUTO) from attn_mask's guard M + L = keys: two named dimensions
    and their sum would give the sum the range of sizes of at least 2 each, refusing M + L < 4."""
    Dim = torch.export.Dim
    length, batch = Dim("length"), Dim("batch")
    batch_first = bool(getattr(model, "batch_first", False))
    with_memory = given.get("memory") is not None
    if with_memory and not hasattr(Dim, "AUTO"):
        raise torch_support.missing("onnx_export", "torch.export.Dim.AUTO (for the memory length)")

    def steps(time):  # a (steps, batch, ...) tensor in the module's layout
        return {0: batch, 1: time} if batch_first else {0: time, 1: batch}

    one_step = given["input"].dim() == 2
    shapes = []
    for name, value in given.items():
        if value is None:
            shapes.append(None)
        elif name == "input":
            shapes.append({0: batch} if one_step else steps(length))
        elif name == "c0":
            shapes.append({value.dim() - 2: batch})
        elif name == "mask_pad":
            shapes.append(steps(length) if value.dim() == 2 else {0: batch})
        elif name == "attn_mask":  # (L, M + L)
            keys = Dim("keys") if with_memory else length
            shapes.append(({1: keys} if with_memory else None) if one_step
                          else {0: length, 1: keys})
        elif name == "memory":
            shapes.append([steps(Dim.AUTO)] * len(value) if isinstance(value, (list, tuple))
                          else steps(Dim.AUTO))
        else:  # memory_mask_pad
            shapes.append(steps(Dim.AUTO) if with_memory else None)
    return tuple(shapes)
