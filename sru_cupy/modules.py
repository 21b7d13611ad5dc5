"""``SRUCell`` and ``SRU``: the PyTorch layers, drop-in for the ``sru`` package (2.6 names).

A layer computes U = x W (one GEMM over all steps, in PyTorch, so cuBLAS on GPU and the autocast
type under AMP), then the fused elementwise recurrence of ``ops.recurrence``. Bias, the highway
scale and the variational dropout mask on h are applied inside the kernel, not in extra passes.

Parameter names and shapes match ``sru`` 2.6: ``weight`` (n_in, out*k) or ``weight_proj`` (n_in,
projection) with ``weight`` (projection, out*k); ``weight_c`` and ``bias`` (2*out,); the buffer
``scale_x`` (1,); ``layer_norm.*``; in ``SRU`` the layers are ``rnn_lst.{i}`` and the optional
``input_to_hidden`` Linear. A state_dict saved by ``sru`` 2.6 loads as it is, and one of ``sru``
3.0's ``SRU`` too (its ``transform_module`` keys are converted: ``layout.convert_sru3_keys``).

Sizes, parameter shapes and the initialisation recipe come from ``layout.LayerLayout`` (shared
with the array layer, arrays.py); ``LayerStack`` is what ``SRU`` and ``SRUpp`` (srupp.py) share.
"""

import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import cpu_gemm, ops
from .layout import LayerLayout, StackLayout, convert_sru3_keys


def _dropout_mask(reference: Tensor, shape: List[int], p: float) -> Tensor:
    """Variational dropout mask: one Bernoulli(1 - p) / (1 - p) value per (batch, column)."""
    return reference.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


def _resolve_transform_module(transform_module, custom_m):
    """``custom_m`` is the `sru` 2.6 name of ``transform_module``; at most one may be given."""
    if custom_m is None:
        return transform_module
    if transform_module is not None:
        raise ValueError("custom_m: an alias of transform_module; give only one of them")
    return custom_m


def format_shape(sizes: List[int]) -> str:
    """Sizes as the error messages write shapes, e.g. (3, 2) (TorchScript has no tuple(shape))."""
    return "(" + ", ".join([str(n) for n in sizes]) + ")"


def _time_major(input: Tensor, mask_pad: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Batch-first input (B, L, n) and mask_pad (B, L) as time-major (L, B, n), (L, B): input as
    one contiguous copy, which both the GEMM (a 2-D view) and the kernel's skip input read (each
    would otherwise copy the transposed view itself); mask_pad as a view."""
    if mask_pad is not None:
        if mask_pad.dim() != 2:
            raise ValueError(f"mask_pad: expected shape (B, L), got "
                             f"{format_shape(mask_pad.shape)}")
        mask_pad = mask_pad.transpose(0, 1)
    return input.transpose(0, 1).contiguous(), mask_pad


def _refresh_scale_x(module, incompatible_keys):
    module._scale_x_value = float(module.scale_x.reshape(-1)[0])


def _load_other_layouts(module, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs):
    """The `sru` package's other layouts load as ours: 2.6 stores the transform module as
    ``custom_m``; 3.0 keeps U's matrices in a ``transform_module`` of its own (see
    ``layout.convert_sru3_keys``; contiguous copies, so that ``assign=True`` gets them too)."""
    old = prefix + "custom_m."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "transform_module." + key[len(old):]] = state_dict.pop(key)
    try:
        converted = convert_sru3_keys(state_dict, prefix, module.layout)
    except ValueError as error:
        error_msgs.append(str(error))
        return
    for key in converted:
        state_dict[key] = state_dict[key].contiguous()


class SRUCell(nn.Module):
    """One SRU layer (unidirectional or bidirectional).

    forward(input, c0=None, mask_pad=None) -> (h, c): input (L, B, input_size) or (B, L,
    input_size) with ``batch_first``, or (B, input_size) for one step; c0 (B, output_size);
    mask_pad (L, B) ((B, L) with ``batch_first``), nonzero at padding. h (L, B, output_size) and
    c (B, output_size), output_size = hidden_size * (2 if bidirectional else 1).

    ``layout`` is the ``layout.LayerLayout`` of the constructor options: sizes, parameter names
    and shapes, and the initialisation recipe that ``reset_parameters`` draws with.
    """

    # For TorchScript: the parameters that may be None.
    weight_proj: Optional[Tensor]
    weight: Optional[Tensor]

    def __init__(self, input_size: int, hidden_size: int, dropout: float = 0.0,
                 rnn_dropout: float = 0.0, bidirectional: bool = False, n_proj: int = 0,
                 use_tanh: bool = False, highway_bias: float = 0.0, has_skip_term: bool = True,
                 layer_norm: bool = False, rescale: bool = True, v1: bool = False,
                 transform_module: Optional[nn.Module] = None, amp_recurrence_fp16: bool = True,
                 normalize_after: bool = False, weight_c_init: Optional[float] = None,
                 batch_first: bool = False, projection_size: Optional[int] = None,
                 custom_m: Optional[nn.Module] = None):
        super().__init__()
        transform_module = _resolve_transform_module(transform_module, custom_m)
        # Sizes, parameter shapes and the initialisation recipe, shared with arrays.SRUCell.
        self.layout = LayerLayout(
            input_size, hidden_size, bidirectional=bidirectional, n_proj=n_proj,
            projection_size=projection_size, has_skip_term=has_skip_term, layer_norm=layer_norm,
            normalize_after=normalize_after, rescale=rescale, highway_bias=highway_bias, v1=v1,
            dropout=dropout, rnn_dropout=rnn_dropout, weight_c_init=weight_c_init,
            transform_module=transform_module is not None)
        layout = self.layout
        for name in ("input_size", "hidden_size", "output_size", "dropout", "rnn_dropout",
                     "projection_size", "num_matrices"):  # checked or derived there
            setattr(self, name, getattr(layout, name))
        self.bidirectional = bidirectional
        self.has_skip_term = has_skip_term
        self.highway_bias = highway_bias
        self.v1 = v1
        self.rescale = rescale
        self.use_tanh = use_tanh
        self.activation_type = 1 if use_tanh else 0
        self.amp_recurrence_fp16 = amp_recurrence_fp16
        self.normalize_after = normalize_after
        self.weight_c_init = weight_c_init
        self.batch_first = batch_first
        self.transform_module = transform_module

        shapes = layout.param_shapes()
        self.weight_proj = None
        self.weight = None
        for name in ("weight_proj", "weight", "weight_c", "bias"):
            if name in shapes:
                setattr(self, name, nn.Parameter(torch.empty(shapes[name])))
        self.register_buffer("scale_x", torch.ones(shapes["scale_x"]))
        # scale_x as a Python float for the kernel: reading the buffer in forward would sync the
        # device and break torch.compile(fullgraph=True). Kept equal to the buffer by
        # reset_parameters and after load_state_dict.
        self._scale_x_value = 1.0
        self.register_load_state_dict_post_hook(_refresh_scale_x)
        self.register_load_state_dict_pre_hook(_load_other_layouts)
        self.layer_norm = None
        if layout.layer_norm:
            self.layer_norm = nn.LayerNorm(layout.layer_norm_size)
        self.reset_parameters()

    def reset_parameters(self):
        """The `sru` initialisation (``layout``'s recipe): Var[w] = 1/fan_in, the highway bias,
        weight_c of variance 1/2 scaled with the gate weights by sqrt(1/2), and compensation for
        dropout and layer norm."""
        layout = self.layout
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.output_size:] = layout.highway_bias
            self.scale_x.fill_(layout.scale_x)
            self._scale_x_value = float(self.scale_x[0])
            if self.weight is not None:
                self.weight.uniform_(-layout.weight_bound, layout.weight_bound)
                if self.weight_proj is not None:
                    self.weight_proj.uniform_(-layout.weight_proj_bound, layout.weight_proj_bound)
                layout.scale_weight(self.weight.view(layout.weight_slots_shape()))
            elif hasattr(self.transform_module, "reset_parameters"):
                self.transform_module.reset_parameters()
            if layout.v1:
                self.weight_c.zero_()
                self.weight_c.requires_grad_(False)
            else:
                self.weight_c.uniform_(-layout.weight_c_bound, layout.weight_c_bound)
                self.weight_c.mul_(layout.weight_c_scale)
            if self.layer_norm is not None:
                self.layer_norm.reset_parameters()

    # -- forward ---------------------------------------------------------------------------------
    def compute_U(self, input: Tensor) -> Tensor:
        """U = input W (L, B, output_size * num_matrices), or the transform module's U."""
        if self.transform_module is not None:
            return self.compute_UV(input)[0]
        weight_proj, weight = self.weight_proj, self.weight  # locals: TorchScript refines them
        if weight_proj is not None:
            input = cpu_gemm.matmul(input, weight_proj)
        assert weight is not None  # present whenever there is no transform module
        return cpu_gemm.matmul(input, weight)

    def compute_UV(self, input: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """(U, V): U as ``compute_U``; V (L, B, 2 * output_size) the per-step offsets of weight_c
        when the transform module returns (U, V), else None."""
        if self.transform_module is None:
            return self.compute_U(input), None
        out = self.transform_module(input)
        V: Optional[Tensor] = None
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(f"transform_module: expected U or (U, V), got {len(out)} values")
            U, V = out[0], out[1]
        else:
            U = out
        self._check_U(U)
        if V is not None:
            expected_V = list(U.shape[:-1]) + [2 * self.output_size]
            if list(V.shape) != expected_V:
                raise ValueError(f"transform_module: expected V of shape (L, B, 2 * output_size) "
                                 f"= {format_shape(expected_V)}, got {format_shape(V.shape)}")
        return U, V

    def _check_U(self, U: Tensor):
        """The transform module's U must have output_size * num_matrices columns."""
        expected = self.output_size * self.num_matrices
        if U.shape[-1] != expected:
            raise ValueError(f"transform_module: expected U with last axis {expected}, got "
                             f"shape {format_shape(U.shape)}")

    def _transform(self, input: Tensor, mask_pad: Optional[Tensor], attn_mask: Optional[Tensor],
                   memory: Optional[Tensor], memory_mask_pad: Optional[Tensor]
                   ) -> Tuple[Tensor, Optional[Tensor]]:
        """(U, V) for the recurrence, as ``compute_UV``; the attention arguments are used by
        SRUppCell (srupp.py)."""
        return self.compute_UV(input)

    def _check_input(self, input: Tensor):
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
        if input.dim() != 3:
            layout = "(B, L, n_in)" if self.batch_first else "(L, B, n_in)"
            raise ValueError(f"input: expected rank 3 {layout} or rank 2 (B, n_in), got shape "
                             f"{format_shape(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input: expected last axis input_size = {self.input_size}, got "
                             f"{input.shape[-1]}")
        if not input.is_floating_point():
            raise TypeError(f"input: expected a floating dtype, got {input.dtype}")
        if input.device != self.bias.device:
            raise ValueError(f"input: expected a tensor on the module's device {self.bias.device},"
                             f" got {input.device}")

    def forward(self, input: Tensor, c0: Optional[Tensor] = None,
                mask_pad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self._forward(input, c0, mask_pad)

    def _forward(self, input: Tensor, c0: Optional[Tensor], mask_pad: Optional[Tensor],
                 attn_mask: Optional[Tensor] = None, memory: Optional[Tensor] = None,
                 memory_mask_pad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """forward of SRUCell and SRUppCell (which adds the attention arguments): one step or
        batch-first input (memory and memory_mask_pad batch-first too) made time-major, checked,
        and run through ``_forward_time_major``."""
        one_step = isinstance(input, Tensor) and input.dim() == 2
        if one_step:
            input = input.unsqueeze(1 if self.batch_first else 0)
            if mask_pad is not None and mask_pad.dim() == 1:
                mask_pad = mask_pad.unsqueeze(1 if self.batch_first else 0)
        self._check_input(input)
        if self.batch_first:
            input, mask_pad = _time_major(input, mask_pad)
            if memory is not None:
                memory = memory.transpose(0, 1)
            if memory_mask_pad is not None:
                memory_mask_pad = memory_mask_pad.transpose(0, 1)
        h, c = self._forward_time_major(input, c0, mask_pad, attn_mask, memory, memory_mask_pad)
        if self.batch_first:
            h = h.transpose(0, 1)
        if one_step:
            h = h.squeeze(1 if self.batch_first else 0)
        return h, c

    def _forward_time_major(self, input: Tensor, c0: Optional[Tensor],
                            mask_pad: Optional[Tensor], attn_mask: Optional[Tensor] = None,
                            memory: Optional[Tensor] = None,
                            memory_mask_pad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        L, B = input.shape[0], input.shape[1]
        if c0 is not None:
            if list(c0.shape) != [B, self.output_size]:
                raise ValueError(f"c0: expected shape (B, output_size) = "
                                 f"{format_shape([B, self.output_size])}, got "
                                 f"{format_shape(c0.shape)}")
            if c0.device != input.device:
                raise ValueError(f"c0: expected a tensor on {input.device} like input, got "
                                 f"{c0.device}")
        if mask_pad is not None:
            if list(mask_pad.shape) != [L, B]:
                expected, got = [L, B], list(mask_pad.shape)
                if self.batch_first:  # as the caller gave it, (B, L)
                    expected, got = [B, L], got[::-1]
                raise ValueError(f"mask_pad: expected shape {format_shape(expected)}, got "
                                 f"{format_shape(got)}")
            if mask_pad.device != input.device:
                raise ValueError(f"mask_pad: expected a tensor on {input.device} like input, got "
                                 f"{mask_pad.device}")

        residual = input
        if self.layer_norm is not None and not self.normalize_after:
            input = self.layer_norm(input)
        if self.training and self.rnn_dropout > 0:
            input = input * _dropout_mask(input, [B, input.shape[-1]], self.rnn_dropout)
        U, V = self._transform(input, mask_pad, attn_mask, memory, memory_mask_pad)
        mask_h: Optional[Tensor] = None
        if self.training and self.dropout > 0:
            mask_h = _dropout_mask(self.bias.detach(), [B, self.output_size], self.dropout)

        dtype = self._recurrence_dtype(U)
        U = U.to(dtype)
        x = residual.to(dtype) if self.has_skip_term and self.num_matrices == 3 else None
        if c0 is not None:
            c0 = c0.to(dtype)
        weight_c: Optional[Tensor] = None if self.v1 else self.weight_c
        if V is not None:
            V = V.to(dtype)
            if weight_c is not None:
                # sru 2.6 adds weight_c to V as flat vectors, so with V its entries are read in
                # V's layout, (forget, reset) per column: the same reordering gives its results.
                weight_c = weight_c.view(self.output_size, 2).t().reshape(-1)
        h, c = self._recurrence(U, x, weight_c, c0, mask_h, mask_pad, V)
        if self.layer_norm is not None and self.normalize_after:
            h = self.layer_norm(h)
        return h, c

    def _recurrence(self, U: Tensor, x: Optional[Tensor], weight_c: Optional[Tensor],
                    c0: Optional[Tensor], mask_h: Optional[Tensor], mask_pad: Optional[Tensor],
                    V: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(h, c_last) of the recurrence over U with this layer's bias and options."""
        if torch.jit.is_scripting():
            # TorchScript calls the custom op itself (ops.recurrence's checks are Python); the
            # op's autograd formula is registered with the dispatcher, so gradients flow.
            needs_grad = torch.is_grad_enabled() and (
                U.requires_grad or self.bias.requires_grad
                or (x is not None and x.requires_grad)
                or (weight_c is not None and weight_c.requires_grad)
                or (c0 is not None and c0.requires_grad) or (V is not None and V.requires_grad))
            h, _, c = torch.ops.sru_cupy.recurrence_forward(
                U, x, weight_c, self.bias, c0, mask_h, mask_pad, self.hidden_size,
                self.bidirectional, self.has_skip_term, self.use_tanh, self._scale_x_value,
                needs_grad, V)
            return h, c
        else:  # (inside ONNX export, ops.recurrence is a scan over time in standard operations)
            return ops.recurrence(U, x, weight_c, self.bias, c0, hidden_size=self.hidden_size,
                                  bidirectional=self.bidirectional,
                                  has_skip_term=self.has_skip_term, use_tanh=self.use_tanh,
                                  scale_x=self._scale_x_value, mask_h=mask_h, mask_pad=mask_pad,
                                  V=V)

    def _recurrence_dtype(self, U: Tensor) -> torch.dtype:
        # Under autocast U comes from the GEMM in a 16-bit type: keep it as the kernel's storage
        # type (float32 arithmetic inside) or widen it to float32, as amp_recurrence_fp16 says.
        if U.dtype == torch.float16 or U.dtype == torch.bfloat16:
            if torch.jit.is_scripting():  # TorchScript knows the CUDA autocast state only
                autocast = U.is_cuda and torch.is_autocast_enabled()
            else:
                autocast = torch.is_autocast_enabled(U.device.type)
            if autocast:
                return U.dtype if self.amp_recurrence_fp16 else torch.float32
        return U.dtype

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("projection_size", 0), ("dropout", 0.0), ("rnn_dropout", 0.0),
                              ("bidirectional", False), ("highway_bias", 0.0),
                              ("use_tanh", False), ("v1", False), ("has_skip_term", True),
                              ("normalize_after", False), ("batch_first", False)):
            value = getattr(self, name)
            if value != default:
                s += f", {name}={value}"
        s += f", rescale={self.rescale}"
        if self.layer_norm is not None:
            s += ", layer_norm=True"
        return s


class LayerStack(nn.Module):
    """What the stacks ``SRU`` and ``SRUpp`` (srupp.py) share: the options of the stack, the
    optional ``input_to_hidden`` map before the first layer, the checks and time-major conversion
    of their input (batch_first, PackedSequence), and their h and final c in the caller's layout.

    A subclass builds ``rnn_lst`` (its layers, each with ``_forward_time_major``) and runs them
    between ``_stack_input`` and ``_stack_output``."""

    def __init__(self, stack: StackLayout, bidirectional: bool, dropout: float, layer_norm: bool,
                 nn_rnn_compatible_return: bool, batch_first: bool):
        super().__init__()
        for name in ("input_size", "hidden_size", "output_size", "num_layers", "num_directions"):
            setattr(self, name, getattr(stack, name))
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.use_layer_norm = layer_norm
        self.nn_rnn_compatible_return = nn_rnn_compatible_return
        self.batch_first = batch_first
        self.input_to_hidden = None

    def _add_input_to_hidden(self, stack: StackLayout):
        """Registers ``input_to_hidden`` (a bias-free Linear, with nn.Linear's initialisation)
        when the layout has one; the subclass calls it where the module order of its state_dict
        wants it."""
        if stack.has_input_to_hidden:
            self.input_to_hidden = nn.Linear(self.input_size, self.output_size, bias=False)

    def _reset_input_to_hidden(self):
        if self.input_to_hidden is not None:
            self.input_to_hidden.reset_parameters()

    def reset_parameters(self):
        for layer in self.rnn_lst:
            layer.reset_parameters()
        self._reset_input_to_hidden()

    def __getitem__(self, n: int):
        """Layer ``n`` (as in ``sru`` 3.0)."""
        return self.rnn_lst[n]

    def _stack_input(self, input: Tensor, c0: Optional[Tensor], mask_pad: Optional[Tensor]
                     ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The stack's input, checked: (input (L, B, n) time-major, mask_pad (L, B) or None, the
        lengths of a PackedSequence input (whose lengths give mask_pad) or None)."""
        batch_first = self.batch_first
        lengths: Optional[Tensor] = None
        if not torch.jit.is_scripting():  # TorchScript takes tensors only
            if isinstance(input, PackedSequence):
                if mask_pad is not None:
                    raise ValueError("mask_pad: must be None for PackedSequence input (the "
                                     "lengths give the padding)")
                input, lengths = pad_packed_sequence(input)  # (L, B, n), batch in original order
                steps = torch.arange(input.shape[0], device=input.device).unsqueeze(1)
                mask_pad = steps >= lengths.to(input.device).unsqueeze(0)
            elif not isinstance(input, Tensor):
                raise TypeError(f"input: expected a torch.Tensor or PackedSequence, got "
                                f"{type(input).__name__}")
        if lengths is None:
            if input.dim() != 3:
                layout = "(B, L, n_in)" if batch_first else "(L, B, n_in)"
                raise ValueError(f"input: expected rank 3 {layout}, got shape "
                                 f"{format_shape(input.shape)}")
            if batch_first:
                input, mask_pad = _time_major(input, mask_pad)
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input: expected last axis input_size = {self.input_size}, got "
                             f"{input.shape[-1]}")
        if not input.is_floating_point():
            raise TypeError(f"input: expected a floating dtype, got {input.dtype}")
        device = self.rnn_lst[0].bias.device
        if input.device != device:
            raise ValueError(f"input: expected a tensor on the module's device {device}, got "
                             f"{input.device}")
        if c0 is not None:
            expected = [self.num_layers, input.shape[1], self.output_size]
            if list(c0.shape) != expected:
                raise ValueError(f"c0: expected shape (num_layers, B, output_size) = "
                                 f"{format_shape(expected)}, got {format_shape(c0.shape)}")
        return input, mask_pad, lengths

    def _first_layer_input(self, input: Tensor) -> Tensor:
        """input_to_hidden(input) when the stack has that map, else input."""
        if self.input_to_hidden is not None:
            if torch.jit.is_scripting():
                return self.input_to_hidden(input)
            return cpu_gemm.apply_linear(self.input_to_hidden, input)
        return input

    def _stack_output(self, h: Tensor, finals: List[Tensor], lengths: Optional[Tensor]
                      ) -> Tuple[Tensor, Tensor]:
        """(h, c) as the caller gets them: h of the last layer (L, B, output_size) time-major in,
        a PackedSequence for packed input (not under TorchScript, which takes tensors only) or
        batch-first with ``batch_first``; c the layers' final states ``finals`` (B,
        output_size) each, stacked as (num_layers, B, output_size), or as (num_layers * dirs, B,
        hidden_size) like nn.LSTM's with ``nn_rnn_compatible_return``."""
        c = torch.stack(finals)
        if self.nn_rnn_compatible_return:
            layers, B, dirs = c.shape[0], c.shape[1], c.shape[2] // self.hidden_size
            c = (c.view(layers, B, dirs, self.hidden_size).transpose(1, 2)
                 .reshape(layers * dirs, B, self.hidden_size))
        if not torch.jit.is_scripting():
            if lengths is not None:
                return pack_padded_sequence(h, lengths, enforce_sorted=False), c
        if self.batch_first:
            h = h.transpose(0, 1)
        return h, c


class SRU(LayerStack):
    """A stack of SRU layers, with the constructor and forward of the ``sru`` package.

    forward(input, c0=None, mask_pad=None) -> (h, c): input (L, B, input_size), (B, L, input_size)
    with ``batch_first``, or a PackedSequence; c0 (num_layers, B, output_size); mask_pad (L, B)
    ((B, L) with batch_first), nonzero at padding. h (L, B, output_size) (a PackedSequence for
    packed input) and c (num_layers, B, output_size), or (num_layers * dirs, B, hidden_size) like
    nn.LSTM's with ``nn_rnn_compatible_return``.

    ``projection_size`` is an int for every layer or one size per layer (as in ``sru`` 3.0); a
    layer projects only when its size is below min(its input size, output_size) (as in 2.6).
    State dicts of ``sru`` 2.6 and of 3.0's ``SRU`` (U's matrices in ``transform_module``) load.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2,
                 dropout: float = 0.0, rnn_dropout: float = 0.0, bidirectional: bool = False,
                 projection_size: Union[int, Sequence[int]] = 0, use_tanh: bool = False,
                 layer_norm: bool = False, highway_bias: float = 0.0, has_skip_term: bool = True,
                 rescale: bool = False, v1: bool = False, nn_rnn_compatible_return: bool = False,
                 transform_module=None, proj_input_to_hidden_first: bool = False,
                 amp_recurrence_fp16: bool = True, normalize_after: bool = False,
                 weight_c_init: Optional[float] = None, batch_first: bool = False,
                 custom_m=None):
        stack = StackLayout(input_size, hidden_size, num_layers, bidirectional=bidirectional,
                            proj_input_to_hidden_first=proj_input_to_hidden_first,
                            dropout=dropout, projection_size=projection_size)
        super().__init__(stack, bidirectional, dropout, layer_norm, nn_rnn_compatible_return,
                         batch_first)
        transform_module = _resolve_transform_module(transform_module, custom_m)
        self.rnn_dropout = rnn_dropout
        self.projection_size = projection_size
        self.has_skip_term = has_skip_term
        if rnn_dropout > 0:
            warnings.warn("rnn_dropout > 0 is deprecated in the sru package; prefer dropout")
        self._add_input_to_hidden(stack)  # before rnn_lst: sru 2.6's state_dict order
        layers = []
        for i in range(num_layers):
            module = transform_module
            if isinstance(transform_module, (list, tuple)):
                module = transform_module[i]
            elif transform_module is not None and i > 0:
                import copy
                module = copy.deepcopy(transform_module)
            layers.append(SRUCell(
                stack.layer_input_sizes[i], hidden_size, dropout=stack.layer_dropouts[i],
                rnn_dropout=rnn_dropout, bidirectional=bidirectional,
                n_proj=stack.layer_projection_sizes[i], use_tanh=use_tanh, layer_norm=layer_norm,
                highway_bias=highway_bias, has_skip_term=has_skip_term, rescale=rescale, v1=v1,
                transform_module=module, amp_recurrence_fp16=amp_recurrence_fp16,
                normalize_after=normalize_after, weight_c_init=weight_c_init))
        self.rnn_lst = nn.ModuleList(layers)

    def forward(self, input: Tensor, c0: Optional[Tensor] = None,
                mask_pad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        input, mask_pad, lengths = self._stack_input(input, c0, mask_pad)
        prev = self._first_layer_input(input)
        finals: List[Tensor] = []
        for i, layer in enumerate(self.rnn_lst):
            prev, c = layer._forward_time_major(prev, None if c0 is None else c0[i], mask_pad)
            finals.append(c)
        return self._stack_output(prev, finals, lengths)

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
                + (", bidirectional=True" if self.bidirectional else "")
                + (", batch_first=True" if self.batch_first else ""))
