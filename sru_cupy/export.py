"""Deployment: the recurrence as a scan over time in standard PyTorch operations, for ONNX export.

``torch.jit.script`` and ``torch.export.export`` keep the custom op ``sru_cupy::recurrence_forward``
(TorchScript and an ExportedProgram run it wherever sru_cupy is imported). An ONNX file must run
without sru_cupy: inside ``torch.onnx.export`` (``onnx_exporting()``) the layers call
``recurrence_scan`` instead of the op, one ``torch._higher_order_ops.scan`` per direction whose
body is one step's elementwise math, which the dynamo-based exporter translates into an ONNX
``Scan`` node. So the plain

    torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=...)

works on SRU, SRUCell, SRUpp and SRUppCell; ``export_onnx`` adds dynamic sequence length, batch
size and memory length and names the inputs and outputs. (An ExportedProgram made by torch.export
holds the custom op and is not translated: export the module.) An SRUpp's ONNX outputs are h, c
and the saved input of each layer (``state["saved_inputs"]`` flattened, the next call's memory);
its memory input is one tensor per layer. SRU++ attention (scaled_dot_product_attention) exports
as standard operations; a query whose keys are all masked gets attention 0 as in PyTorch.

The step (one column; the math of cuda/sru_recurrence.cu):

    f = sigmoid(u1 + v_f c + b_f)    r = sigmoid(u2 + v_r c + b_r)    c' = (c - u0) f + u0
    g = c' or tanh(c')    h = (g - x') m r + x'  (skip)  or  g m r    padded step: c' = c, h = 0
"""

import sys
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import torch_support

__all__ = ["recurrence_scan", "onnx_exporting", "export_onnx"]


def _scan_op():
    """PyTorch's scan operator (a private one: the ONNX exporter writes it as ONNX Scan)."""
    torch_support.require("onnx_export")
    try:
        from torch._higher_order_ops.scan import scan_op
    except ImportError as error:
        raise torch_support.missing("onnx_export", "torch._higher_order_ops.scan.scan_op") \
            from error
    return scan_op


def _direction_scan(u, skip, v, b, c0, m, pad, V, use_tanh, reverse):
    """One direction over time: u (L, B, d, k), skip (L, B, d) or None, v, b (2, d), c0 (B, d),
    m (B, d) or None, pad (L, B, 1) bool or None, V (L, B, d, 2) or None -> (h, c (L, B, d),
    c_last (B, d)), time order kept (``reverse`` runs t = L-1 .. 0)."""
    scan_op = _scan_op()
    xs = [u] + [t for t in (skip, pad, V) if t is not None]
    if reverse:
        xs = [t.flip(0) for t in xs]
    additional = [v, b] + ([m] if m is not None else [])
    has_skip, has_pad, has_V, has_m = skip is not None, pad is not None, V is not None, \
        m is not None

    def step(c, u_t, *rest):
        rest = list(rest)
        skip_t = rest.pop(0) if has_skip else None
        pad_t = rest.pop(0) if has_pad else None
        V_t = rest.pop(0) if has_V else None
        v_, b_ = rest.pop(0), rest.pop(0)
        m_ = rest.pop(0) if has_m else None
        v_f, v_r = v_[0], v_[1]
        if V_t is not None:
            v_f, v_r = v_f + V_t[..., 0], v_r + V_t[..., 1]
        f = torch.sigmoid(u_t[..., 1] + v_f * c + b_[0])
        r = torch.sigmoid(u_t[..., 2] + v_r * c + b_[1])
        c_new = (c - u_t[..., 0]) * f + u_t[..., 0]
        g = torch.tanh(c_new) if use_tanh else c_new
        gate = r if m_ is None else m_ * r
        h = (g - skip_t) * gate + skip_t if skip_t is not None else g * gate
        if pad_t is not None:
            c_new = torch.where(pad_t, c, c_new)
            h = torch.where(pad_t, 0.0, h)
        return [c_new, h, c_new.clone()]  # the carry and its per-step copy must not alias

    c_last, h, c = scan_op(step, [c0], xs, tuple(additional))
    if reverse:
        h, c = h.flip(0), c.flip(0)
    return h, c, c_last


def recurrence_scan(U: Tensor, x: Optional[Tensor], weight_c: Optional[Tensor], bias: Tensor,
                    c0: Optional[Tensor], mask_h: Optional[Tensor], mask_pad: Optional[Tensor],
                    hidden_size: int, bidirectional: bool, has_skip_term: bool, use_tanh: bool,
                    scale_x: float, store_c: bool, V: Optional[Tensor] = None):
    """``sru_cupy::recurrence_forward`` (same arguments and results) as scans over time, for
    inference: no gradient flows back (the inputs are detached; in torch 2.13 the scan's autograd
    fails on symbolic sizes when the ONNX exporter decomposes the graph)."""
    U, x, weight_c, bias, c0, mask_h, V = (None if t is None else t.detach()
                                           for t in (U, x, weight_c, bias, c0, mask_h, V))
    dirs = 2 if bidirectional else 1
    L, B, d = U.shape[0], U.shape[1], hidden_size
    D = dirs * d
    A = torch.float64 if U.dtype == torch.float64 else torch.float32
    u = U.to(A).reshape(L, B, dirs, d, -1)
    k = U.shape[2] // D
    v = (weight_c.to(A).reshape(2, dirs, d) if weight_c is not None
         else torch.zeros((2, dirs, d), dtype=A, device=U.device))
    b = bias.to(A).reshape(2, dirs, d)
    state0 = (c0.to(A).reshape(B, dirs, d) if c0 is not None
              else torch.zeros((B, dirs, d), dtype=A, device=U.device))
    m = mask_h.to(A).reshape(B, dirs, d) if mask_h is not None else None
    pad = (mask_pad != 0).reshape(L, B, 1) if mask_pad is not None else None
    steps = V.to(A).reshape(L, B, dirs, d, 2) if V is not None else None
    skip = None
    if has_skip_term:
        skip = u[..., 3] if k == 4 else x.to(A).reshape(L, B, dirs, d) * scale_x
    hs: List[Tensor] = []
    cs: List[Tensor] = []
    lasts: List[Tensor] = []
    for j in range(dirs):
        h_j, c_j, last_j = _direction_scan(
            u[:, :, j].contiguous(), None if skip is None else skip[:, :, j].contiguous(),
            v[:, j], b[:, j], state0[:, j].contiguous(), None if m is None else m[:, j],
            pad, None if steps is None else steps[:, :, j].contiguous(), use_tanh, j == 1)
        hs.append(h_j)
        cs.append(c_j)
        lasts.append(last_j)
    h = torch.stack(hs, dim=2).reshape(L, B, D).to(U.dtype)
    c = torch.stack(cs, dim=2).reshape(L, B, D).to(U.dtype) if store_c else U.new_empty((0,))
    c_last = torch.stack(lasts, dim=1).reshape(B, D).to(U.dtype)
    return h, c, c_last


def onnx_exporting() -> bool:
    """True inside ``torch.onnx.export`` (torch.onnx is not imported for the check); False under
    TorchScript, which cannot compile the check, so scripted code may call it too."""
    if torch.jit.is_scripting():
        return False
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


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
    from .srupp import SRUpp, SRUppCell  # srupp imports modules, which imports this module

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
