"""SRU++ (Lei, *When Attention Meets Fast Recurrence*, EMNLP 2021): SRU layers whose U comes from
self-attention instead of one matrix product, with the API of the ``sru`` package 3.0 (3.0.0.dev6).

In an SRU++ layer the attention sub-layer replaces only the product x W that makes U; the
elementwise recurrence (weight_c, bias, highway, c0, mask_pad, dropout on h) is the one of
``SRUCell``, so ``SRUppCell`` is an ``SRUCell`` that hands its transform module the attention
arguments, and runs the same kernels.

    z = linear1([memory; x])                       (M + L, B, proj), memory optional
    n = z, or LN(z) with normalize_after=False     (pre-norm)
    k, v = linear2(n).chunk(2);  q = n[M:]
    y = alpha * Attention(q, k, v) + z[M:],  then LN(y) with normalize_after=True (the default)
    U = linear3(dropout(y))                        (L, B, out_features)

with multi-head scaled dot-product attention (no positional encoding: the recurrence orders the
steps), alpha a learned scalar starting at ``rezero_init_alpha`` (0), and memory (earlier inputs of
the layer, Transformer-XL style) placed before the input for the keys and values.

Names, defaults and ``state_dict`` keys are those of ``sru`` 3.0.0.dev6: a checkpoint of its
``SRUpp`` loads with ``load_state_dict`` (tests/test_srupp_parity.py). Beyond it: ``batch_first``,
PackedSequence input without a Python loop, autocast, ``torch.compile(fullgraph=True)``,
``torch.jit.script``, ONNX export and ``torch.export`` (README, Deployment), and
attention through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on a GPU).

One difference: where every key of a query is masked, ``sru`` 3.0 takes a softmax over -inf and
returns NaN (in h, c and every gradient). Here a sequence that is padding from end to end gives
h = 0 and c = c0 (its steps are skipped; its keys are not masked, so the attention stays finite)
and an ``attn_mask`` row of -inf gives attention 0 (scaled_dot_product_attention's convention),
so U = linear3(LN(z)) there.

Incremental decoding (unidirectional models, eval mode): carry c and the layers' inputs between
calls, and give each call a causal mask over [memory; input]::

    memory, c = None, None
    for segment in segments:                      # (L_i, B, input_size) each, e.g. one token
        mask = model.causal_attn_mask(segment.shape[0], model.memory_length(memory))
        h, c, state = model(segment, c0=c, attn_mask=mask, memory=memory)
        memory = model.extend_memory(memory, state["saved_inputs"])

The h of the segments, one after the other, equal h of one call over the whole sequence with
``model.causal_attn_mask(L)`` (up to rounding), as long as the memory is kept whole
(``extend_memory(..., max_length=N)`` keeps the last N steps, as Transformer-XL does, and then
the results are an approximation) and the layers have no pre-norm (``layer_norm=True`` with
``normalize_after=False``): as in ``sru`` 3.0, the pre-norm is applied to the input of a layer but
not to its memory.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import cpu_gemm
from .layout import StackLayout, check_positive_int, check_probability, num_matrices
from .modules import LayerStack, SRUCell, format_shape

__all__ = ["SRUppProjectedLinear", "SRUppAttention", "SRUppCell", "SRUpp"]


class SRUppProjectedLinear(nn.Module):
    """U = linear2(dropout(LN(linear1(x)))), no biases: the SRU++ layers without attention.

    forward(input, mask_pad=None, attn_mask=None, memory=None, memory_mask_pad=None): the
    attention arguments are accepted (so any layer of an SRUpp takes them) and ignored.
    """

    def __init__(self, in_features: int, out_features: int, proj_features: int,
                 dropout: float = 0.0, layer_norm: bool = False):
        super().__init__()
        check_positive_int(in_features=in_features, out_features=out_features,
                            proj_features=proj_features)
        check_probability(dropout=dropout)
        self.in_features = in_features
        self.out_features = out_features
        self.proj_features = proj_features
        self.dropout = nn.Dropout(dropout)
        self.linear1 = nn.Linear(in_features, proj_features, bias=False)
        self.linear2 = nn.Linear(proj_features, out_features, bias=False)
        self.layer_norm: Optional[nn.LayerNorm] = (nn.LayerNorm(proj_features) if layer_norm
                                                   else None)
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform weights, the last one scaled by sqrt(1 - dropout) (as in ``sru`` 3.0)."""
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)
        if self.dropout.p > 0:
            with torch.no_grad():
                self.linear2.weight.mul_(math.sqrt(1 - self.dropout.p))

    def forward(self, input: Tensor, mask_pad: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, memory: Optional[Tensor] = None,
                memory_mask_pad: Optional[Tensor] = None) -> Tensor:
        z = self.linear1(input) if torch.jit.is_scripting() else \
            cpu_gemm.apply_linear(self.linear1, input)
        if self.layer_norm is not None:
            z = self.layer_norm(z)
        z = self.dropout(z)
        return self.linear2(z) if torch.jit.is_scripting() else \
            cpu_gemm.apply_linear(self.linear2, z)


class SRUppAttention(nn.Module):
    """The attention that makes U in an SRU++ layer.

    forward(input (L, B, in_features), mask_pad=None (L, B), attn_mask=None (L, M + L),
    memory=None (M, B, in_features), memory_mask_pad=None (M, B)) -> U (L, B, out_features).
    ``attn_mask`` is additive (0 to attend, -inf to block; float); ``mask_pad`` and
    ``memory_mask_pad`` are nonzero at padded keys. ``attn_dropout`` drops attention weights in
    training. With ``normalize_after`` the layer norm acts on alpha * attention + z, else on z
    before q, k and v are taken from it (the residual z stays unnormalised).
    """

    def __init__(self, in_features: int, out_features: int, proj_features: int,
                 num_heads: int = 1, dropout: float = 0.0, attn_dropout: float = 0.0,
                 rezero_init_alpha: float = 0.0, layer_norm: bool = False,
                 normalize_after: bool = True):
        super().__init__()
        check_positive_int(in_features=in_features, out_features=out_features,
                            proj_features=proj_features, num_heads=num_heads)
        check_probability(dropout=dropout, attn_dropout=attn_dropout)
        if proj_features % num_heads != 0:
            raise ValueError(f"proj_features, num_heads: proj_features must be a multiple of "
                             f"num_heads, got {proj_features} and {num_heads}")
        self.in_features = in_features
        self.out_features = out_features
        self.proj_features = proj_features
        self.num_heads = num_heads
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = float(attn_dropout)
        self.rezero_init_alpha = float(rezero_init_alpha)
        self.linear1 = nn.Linear(in_features, proj_features, bias=False)
        self.linear2 = nn.Linear(proj_features, proj_features * 2, bias=False)
        self.linear3 = nn.Linear(proj_features, out_features, bias=False)
        self.alpha = nn.Parameter(torch.tensor([self.rezero_init_alpha]))
        self.normalize_after = normalize_after
        self.layer_norm: Optional[nn.LayerNorm] = (nn.LayerNorm(proj_features) if layer_norm
                                                   else None)
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform weights (the last scaled by sqrt(1 - dropout)), alpha at its initial
        value (as in ``sru`` 3.0)."""
        for linear in (self.linear1, self.linear2, self.linear3):
            nn.init.xavier_uniform_(linear.weight)
        with torch.no_grad():
            self.alpha.fill_(self.rezero_init_alpha)
            if self.dropout.p > 0:
                self.linear3.weight.mul_(math.sqrt(1 - self.dropout.p))

    def forward(self, input: Tensor, mask_pad: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, memory: Optional[Tensor] = None,
                memory_mask_pad: Optional[Tensor] = None) -> Tensor:
        if input.dim() != 3:
            raise ValueError(f"input: expected rank 3 (L, B, in_features), got shape "
                             f"{format_shape(input.shape)}")
        L, B = input.shape[0], input.shape[1]
        M = 0
        source = input
        if memory is not None:
            if memory.dim() != 3 or list(memory.shape[1:]) != [B, self.in_features]:
                raise ValueError(f"memory: expected shape (M, B, in_features) = "
                                 f"(M, {B}, {self.in_features}), got {format_shape(memory.shape)}")
            M = memory.shape[0]
            source = torch.cat([memory, input], dim=0)
        z = self.linear1(source) if torch.jit.is_scripting() else \
            cpu_gemm.apply_linear(self.linear1, source)  # (M + L, B, proj)
        residual = z[M:]
        if self.layer_norm is not None and not self.normalize_after:
            z = self.layer_norm(z)
        heads, head_dim = self.num_heads, self.proj_features // self.num_heads
        kv = self.linear2(z) if torch.jit.is_scripting() else cpu_gemm.apply_linear(self.linear2, z)
        k, v = kv.chunk(2, dim=-1)
        # (len, B, proj) -> (B, heads, len, head_dim): head h holds features h*head_dim...
        q = z[M:].reshape(L, B, heads, head_dim).permute(1, 2, 0, 3)
        k = k.reshape(M + L, B, heads, head_dim).permute(1, 2, 0, 3)
        v = v.reshape(M + L, B, heads, head_dim).permute(1, 2, 0, 3)
        mask = self._mask(attn_mask, mask_pad, memory_mask_pad, L, M, B, q.dtype, q.device)
        blocked: Optional[Tensor] = None
        if mask is not None and mask.dtype != torch.bool:
            # A query whose keys are all blocked (e.g. a left-padded step under a causal mask)
            # takes a softmax over a row of -inf: NaN in the ONNX softmax and in some CUDA
            # attention kernels, and in backward 0 * NaN reaches the gradients of k and v. Such
            # rows are unblocked for the kernel and their attention zeroed after it (attention
            # 0, scaled_dot_product_attention's convention, with no gradient through them);
            # the other rows are unchanged.
            blocked = (mask == float("-inf")).all(dim=-1, keepdim=True)
            mask = mask.masked_fill(blocked, 0.0)
        attention = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        if blocked is not None:
            attention = attention.masked_fill(blocked, 0.0)
        attention = attention.permute(2, 0, 1, 3).reshape(L, B, self.proj_features)
        out = attention * self.alpha + residual
        if self.layer_norm is not None and self.normalize_after:
            out = self.layer_norm(out)
        out = self.dropout(out)
        return self.linear3(out) if torch.jit.is_scripting() else \
            cpu_gemm.apply_linear(self.linear3, out)

    @staticmethod
    def _mask(attn_mask: Optional[Tensor], mask_pad: Optional[Tensor],
              memory_mask_pad: Optional[Tensor], L: int, M: int, B: int,
              dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        """The mask for scaled_dot_product_attention: attn_mask (L, M + L) as it is (additive),
        padded keys as False in a bool (B, 1, 1, M + L) mask, or both merged into an additive
        (B, 1, L, M + L) mask. memory_mask_pad is ignored without memory (as in ``sru`` 3.0)."""
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool or not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask: expected an additive float mask (0 to attend, -inf "
                                f"to block), got {attn_mask.dtype}")
            if list(attn_mask.shape) != [L, M + L]:
                raise ValueError(f"attn_mask: expected shape (L, M + L) = "
                                 f"{format_shape([L, M + L])} (M memory steps), got "
                                 f"{format_shape(attn_mask.shape)}")
            attn_mask = attn_mask.to(dtype)
        if mask_pad is None and (M == 0 or memory_mask_pad is None):
            return attn_mask
        pads: List[Tensor] = []
        if M > 0:
            if memory_mask_pad is None:
                pads.append(torch.zeros(M, B, dtype=torch.bool, device=device))
            else:
                if list(memory_mask_pad.shape) != [M, B]:
                    raise ValueError(f"memory_mask_pad: expected shape (M, B) = "
                                     f"{format_shape([M, B])}, got "
                                     f"{format_shape(memory_mask_pad.shape)}")
                pads.append(memory_mask_pad.to(torch.bool))
        if mask_pad is None:
            pads.append(torch.zeros(L, B, dtype=torch.bool, device=device))
        else:
            pads.append(mask_pad.to(torch.bool))
        padded = torch.cat(pads, dim=0).t()[:, None, None, :]  # (B, 1, 1, M + L), True at pads
        # A sequence that is all padding would mask every key of its queries; every one of its
        # steps is skipped by the recurrence (U unused, no gradient), so unmask its keys: finite
        # attention whatever the backend does with fully masked rows.
        padded = padded & ~padded.all(dim=-1, keepdim=True)
        if attn_mask is None:
            return ~padded
        return attn_mask.masked_fill(padded, float("-inf"))

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, proj_features={self.proj_features}, "
                f"num_heads={self.num_heads}, attn_dropout={self.attn_dropout}, "
                f"normalize_after={self.normalize_after}")


class SRUppCell(SRUCell):
    """One SRU++ layer: an SRUCell whose U comes from ``transform_module`` (an SRUppAttention or
    SRUppProjectedLinear, or a module with the same forward), given the attention arguments.

    forward(input, c0=None, mask_pad=None, attn_mask=None, memory=None, memory_mask_pad=None)
    -> (h, c): input (L, B, input_size) ((B, L, input_size) with ``batch_first``, (B,
    input_size) for one step); memory (M, B, input_size) ((B, M, input_size)); the rest as in
    SRUppAttention and SRUCell. Defaults are those of ``sru`` 3.0's SRUCell (post layer norm, no
    rescale, weight_c uniform in [-1, 1]).
    """

    def __init__(self, input_size: int, hidden_size: int, dropout: float = 0.0,
                 rnn_dropout: float = 0.0, bidirectional: bool = False, projection_size: int = 0,
                 highway_bias: float = 0.0, layer_norm: bool = False, normalize_after: bool = True,
                 transform_module: Optional[nn.Module] = None, rescale: bool = False,
                 has_skip_term: bool = True, use_tanh: bool = False, v1: bool = False,
                 amp_recurrence_fp16: bool = True, weight_c_init: float = 1.0,
                 batch_first: bool = False):
        if transform_module is None:
            raise ValueError("transform_module: SRUppCell needs the module that makes U "
                             "(SRUppAttention or SRUppProjectedLinear), got None")
        super().__init__(input_size, hidden_size, dropout=dropout, rnn_dropout=rnn_dropout,
                         bidirectional=bidirectional, projection_size=projection_size,
                         highway_bias=highway_bias, layer_norm=layer_norm,
                         normalize_after=normalize_after, transform_module=transform_module,
                         rescale=rescale, has_skip_term=has_skip_term, use_tanh=use_tanh, v1=v1,
                         amp_recurrence_fp16=amp_recurrence_fp16, weight_c_init=weight_c_init,
                         batch_first=batch_first)

    def _transform(self, input: Tensor, mask_pad: Optional[Tensor], attn_mask: Optional[Tensor],
                   memory: Optional[Tensor], memory_mask_pad: Optional[Tensor]
                   ) -> Tuple[Tensor, Optional[Tensor]]:
        """(U, None): U from the attention or projected-linear transform module; SRU++ has no V."""
        U = self.transform_module(input, mask_pad=mask_pad, attn_mask=attn_mask, memory=memory,
                                  memory_mask_pad=memory_mask_pad)
        self._check_U(U)
        return U, None

    def forward(self, input: Tensor, c0: Optional[Tensor] = None,
                mask_pad: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                memory: Optional[Tensor] = None,
                memory_mask_pad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self._forward(input, c0, mask_pad, attn_mask, memory, memory_mask_pad)


class SRUpp(LayerStack):
    """A stack of SRU++ layers, with the constructor and forward of ``sru`` 3.0's ``SRUpp``.

    forward(input, c0=None, mask_pad=None, attn_mask=None, memory=None, memory_mask_pad=None)
    -> (h, c, {"saved_inputs": [input of each layer]}).

    input (L, B, input_size), (B, L, input_size) with ``batch_first``, or a PackedSequence; c0
    (num_layers, B, output_size); mask_pad (L, B) nonzero at padding; attn_mask (L, M + L)
    additive; memory a list with one tensor (M, B, layer input size) or None per layer (usually
    the previous call's saved inputs; attn_mask and memory_mask_pad serve every layer, so the
    layers' memories have one length M); memory_mask_pad (M, B). With ``batch_first`` the batch
    axis comes first in input, mask_pad, memory, memory_mask_pad, h and the saved inputs.

    Layer i has attention when ``(i + 1) % attention_every_n_layers == 0``, or, when
    ``attention_last_n_layers`` is given (not -1; not both), when it is one of the last ones; the
    other layers use SRUppProjectedLinear. See the module docstring for incremental decoding.
    """

    def __init__(self, input_size: int, hidden_size: int, proj_size: int, num_layers: int = 2,
                 dropout: float = 0.0, attn_dropout: float = 0.0, num_heads: int = 1,
                 bidirectional: bool = False, layer_norm: bool = False,
                 normalize_after: bool = False, attn_layer_norm: bool = True,
                 highway_bias: float = -2.0, attention_every_n_layers: int = 1,
                 attention_last_n_layers: int = -1, rescale: bool = False,
                 nn_rnn_compatible_return: bool = False, proj_input_to_hidden_first: bool = False,
                 weight_c_init: float = 1.0, batch_first: bool = False):
        stack = StackLayout(input_size, hidden_size, num_layers, bidirectional=bidirectional,
                            proj_input_to_hidden_first=proj_input_to_hidden_first,
                            dropout=dropout)
        check_positive_int(proj_size=proj_size,
                           attention_every_n_layers=attention_every_n_layers)
        if attention_every_n_layers != 1 and attention_last_n_layers != -1:
            raise ValueError(f"attention_every_n_layers, attention_last_n_layers: give at most "
                             f"one of them, got {attention_every_n_layers} and "
                             f"{attention_last_n_layers}")
        super().__init__(stack, bidirectional, dropout, layer_norm, nn_rnn_compatible_return,
                         batch_first)
        self.proj_size = proj_size
        self.num_heads = num_heads
        self.rnn_lst = nn.ModuleList()  # registered first: its keys come first in state_dict
        self._add_input_to_hidden(stack)
        self._reset_input_to_hidden()
        for i in range(num_layers):
            in_features = stack.layer_input_sizes[i]
            out_features = self.output_size * num_matrices(in_features, self.output_size)
            if self.layer_has_attention(i, num_layers, attention_every_n_layers,
                                        attention_last_n_layers):
                transform = SRUppAttention(in_features, out_features, proj_size,
                                           num_heads=num_heads, dropout=dropout,
                                           attn_dropout=attn_dropout, layer_norm=attn_layer_norm)
            else:
                transform = SRUppProjectedLinear(in_features, out_features, proj_size,
                                                 dropout=dropout, layer_norm=attn_layer_norm)
            self.rnn_lst.append(SRUppCell(
                in_features, hidden_size, dropout=stack.layer_dropouts[i],
                bidirectional=bidirectional, layer_norm=layer_norm,
                normalize_after=normalize_after, highway_bias=highway_bias, rescale=rescale,
                transform_module=transform, weight_c_init=weight_c_init))

    @staticmethod
    def layer_has_attention(index: int, num_layers: int, attention_every_n_layers: int = 1,
                            attention_last_n_layers: int = -1) -> bool:
        """Whether layer ``index`` (0-based) of ``num_layers`` gets attention."""
        if attention_last_n_layers != -1:
            return num_layers - index <= attention_last_n_layers
        return (index + 1) % attention_every_n_layers == 0

    def _reset_input_to_hidden(self):
        """Xavier-uniform (as in ``sru`` 3.0), not nn.Linear's default."""
        if self.input_to_hidden is not None:
            nn.init.xavier_uniform_(self.input_to_hidden.weight)

    # -- incremental decoding ----------------------------------------------------------------------
    def memory_length(self, memory: Optional[List[Optional[Tensor]]]) -> int:
        """The number of steps in ``memory`` (0 for None)."""
        steps = [m.shape[1 if self.batch_first else 0] for m in memory or [] if m is not None]
        return steps[0] if steps else 0

    def causal_attn_mask(self, length: int, memory_length: int = 0,
                         dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """(length, memory_length + length) additive mask: query t sees the memory and the input
        steps up to t (0), not the later ones (-inf)."""
        blocked = torch.full((length, memory_length + length), float("-inf"), dtype=dtype,
                             device=device if device is not None else self.rnn_lst[0].bias.device)
        return torch.triu(blocked, diagonal=memory_length + 1)

    def extend_memory(self, memory: Optional[List[Optional[Tensor]]], saved_inputs: List[Tensor],
                      max_length: Optional[int] = None) -> List[Tensor]:
        """The memory for the next call: each layer's ``memory`` followed by this call's
        ``saved_inputs``, keeping the last ``max_length`` steps when given."""
        axis = 1 if self.batch_first else 0
        if memory is None:
            memory = [None] * len(saved_inputs)
        out = []
        for old, new in zip(memory, saved_inputs):
            steps = new if old is None else torch.cat([old, new], dim=axis)
            if max_length is not None:
                steps = steps.narrow(axis, max(0, steps.shape[axis] - max_length),
                                     min(max_length, steps.shape[axis]))
            out.append(steps.detach())
        return out

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, input, c0: Optional[Tensor] = None, mask_pad: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None,
                memory: Optional[List[Optional[Tensor]]] = None,
                memory_mask_pad: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Dict[str, List[Tensor]]]:
        input, mask_pad, lengths = self._stack_input(input, c0, mask_pad)
        batch_first = self.batch_first
        if batch_first and memory_mask_pad is not None:
            memory_mask_pad = memory_mask_pad.transpose(0, 1)
        if memory is not None:
            if not isinstance(memory, (list, tuple)) or len(memory) != self.num_layers:
                got = (f"{len(memory)} items" if isinstance(memory, (list, tuple))
                       else type(memory).__name__)
                raise ValueError(f"memory: expected a list of {self.num_layers} tensors (or None),"
                                 f" one per layer, got {got}")
        x = self._first_layer_input(input)
        saved_inputs = []
        finals = []
        for i, layer in enumerate(self.rnn_lst):
            saved_inputs.append(x.transpose(0, 1) if batch_first else x)
            memory_i = None if memory is None else memory[i]
            if memory_i is not None and batch_first:
                memory_i = memory_i.transpose(0, 1)
            x, c = layer._forward_time_major(x, None if c0 is None else c0[i], mask_pad,
                                             attn_mask, memory_i, memory_mask_pad)
            finals.append(c)
        h, c_all = self._stack_output(x, finals, lengths)
        return h, c_all, {"saved_inputs": saved_inputs}

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, proj_size={self.proj_size}, "
                f"num_layers={self.num_layers}, num_heads={self.num_heads}"
                + (", bidirectional=True" if self.bidirectional else "")
                + (", batch_first=True" if self.batch_first else ""))
