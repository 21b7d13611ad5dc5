"""The layout of an SRU layer and of a stack of them, derived from the constructor options alone.

``LayerLayout`` holds what one layer's options decide: its sizes (output_size, num_matrices k,
the projection actually used), its parameter names and shapes (the ``sru`` 2.6 state_dict names)
and its initialisation recipe (bounds and per-slot scalings). ``StackLayout`` does the same for a
stack: the optional ``input_to_hidden`` map, each layer's input size, dropout and projection size.
The constructor checks shared by every layer class are here too, and the conversion of ``sru``
3.0's ``transform_module`` keys into these names.

Imports neither torch nor cupy: the torch layers (modules.py, srupp.py) and the array layers
(arrays.py) build from it, so the two derive the same layout by construction. The recipe acts on
arrays through indexing and in-place ``*=`` only, which torch tensors and NumPy arrays share; the
random draws stay with each caller (torch's generator or a NumPy Generator, in the same order).
"""

import math
import numbers
from typing import Dict, List, Optional, Tuple

__all__ = ["LayerLayout", "StackLayout", "check_positive_int", "check_probability",
           "check_projection_size", "layer_projection_sizes", "num_matrices",
           "convert_sru3_keys", "SRU3_LINEAR", "SRU3_PROJECTED"]


# -- constructor checks ----------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(**values):
    """Constructor arguments that must be positive ints (bool is not one), by name."""
    for name, value in values.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


def check_probability(**values):
    """Constructor arguments that must be dropout probabilities, in [0, 1), by name."""
    for name, value in values.items():
        if not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")


def check_projection_size(value, name: str = "projection_size") -> int:
    """A projection size: an int >= 0 (0 for none); returned as a plain int."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0 (0 for no projection), got {value!r}")
    return int(value)


def layer_projection_sizes(projection_size, num_layers: int) -> List[int]:
    """One projection size per layer from ``projection_size``: an int for every layer, or a list
    or tuple of ``num_layers`` ints (as ``sru`` 3.0 takes it)."""
    if isinstance(projection_size, (list, tuple)):
        if len(projection_size) != num_layers:
            raise ValueError(f"projection_size: expected an int or one size per layer "
                             f"(num_layers = {num_layers}), got {len(projection_size)} sizes "
                             f"{list(projection_size)!r}")
        return [check_projection_size(p, f"projection_size[{i}]")
                for i, p in enumerate(projection_size)]
    if not _is_int(projection_size):
        raise ValueError(f"projection_size: expected an int >= 0 or a list/tuple of "
                         f"{num_layers} of them, got {projection_size!r}")
    return [check_projection_size(projection_size)] * num_layers


def num_matrices(input_size: int, output_size: int, has_skip_term: bool = True) -> int:
    """k, the values of U per output unit: 4 when the skip term needs its own learned slot
    (has_skip_term and input_size != output_size), else 3."""
    return 4 if has_skip_term and input_size != output_size else 3


# -- one layer -------------------------------------------------------------------------------------

class LayerLayout:
    """Sizes, parameters and initialisation recipe of one SRU layer (see the module docstring).

    Options as in the ``SRUCell`` constructors: the requested projection is ``n_proj`` (the
    ``sru`` 2.6 name), or ``projection_size`` (3.x's) when that is given; ``transform_module``:
    whether a module of the caller's makes U (then there is no ``weight`` / ``weight_proj``).
    Attributes: the options, ``requested_projection_size``, and ``output_size``,
    ``num_directions``, ``num_matrices``, ``projection_size`` (the one used: a projection only
    when 0 < requested < min(input_size, output_size), as in ``sru`` 2.6), ``layer_norm_size``
    (0 without layer norm), ``scale_x`` (the buffer's value), ``weight_fan_in``.
    """

    def __init__(self, input_size: int, hidden_size: int, bidirectional: bool = False,
                 n_proj: int = 0, has_skip_term: bool = True, layer_norm: bool = False,
                 normalize_after: bool = False, rescale: bool = True, highway_bias: float = 0.0,
                 v1: bool = False, dropout: float = 0.0, rnn_dropout: float = 0.0,
                 weight_c_init: Optional[float] = None, transform_module: bool = False,
                 projection_size: Optional[int] = None):
        check_positive_int(input_size=input_size, hidden_size=hidden_size)
        check_probability(dropout=dropout, rnn_dropout=rnn_dropout)
        if projection_size is None:
            requested = check_projection_size(n_proj, "n_proj")
        else:
            requested = check_projection_size(projection_size)
        self.requested_projection_size = requested
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.bidirectional = bool(bidirectional)
        self.has_skip_term = bool(has_skip_term)
        self.layer_norm = bool(layer_norm)
        self.normalize_after = bool(normalize_after)
        self.rescale = bool(rescale)
        self.highway_bias = highway_bias
        self.v1 = bool(v1)
        self.dropout = float(dropout)
        self.rnn_dropout = float(rnn_dropout)
        self.weight_c_init = weight_c_init
        self.transform_module = bool(transform_module)
        self.num_directions = 2 if self.bidirectional else 1
        self.output_size = self.hidden_size * self.num_directions
        self.num_matrices = num_matrices(self.input_size, self.output_size, self.has_skip_term)
        # A projection only when it makes the GEMM smaller (as in `sru` 2.6).
        self.projection_size = (requested if 0 < requested < min(self.input_size,
                                                                  self.output_size) else 0)
        self.layer_norm_size = 0
        if self.layer_norm:
            self.layer_norm_size = self.output_size if self.normalize_after else self.input_size
        self.scale_x = 1.0
        if self.rescale and self.has_skip_term:
            self.scale_x = math.sqrt(1 + 2 * math.exp(highway_bias))
        self.weight_fan_in = self.projection_size or self.input_size

    # -- parameters --------------------------------------------------------------------------------
    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """{name: shape} in the order of the torch layer's state_dict (buffer scale_x included;
        without a transform module's own entries)."""
        shapes: Dict[str, Tuple[int, ...]] = {}
        if not self.transform_module:
            if self.projection_size:
                shapes["weight_proj"] = (self.input_size, self.projection_size)
            shapes["weight"] = (self.weight_fan_in, self.output_size * self.num_matrices)
        shapes["weight_c"] = (2 * self.output_size,)
        shapes["bias"] = (2 * self.output_size,)
        shapes["scale_x"] = (1,)
        if self.layer_norm:
            shapes["layer_norm.weight"] = (self.layer_norm_size,)
            shapes["layer_norm.bias"] = (self.layer_norm_size,)
        return shapes

    # -- initialisation (the `sru` recipe) ---------------------------------------------------------
    @property
    def weight_bound(self) -> float:
        """``weight`` is drawn uniform in [-bound, bound]: Var = 1 / fan_in."""
        return math.sqrt(3.0 / self.weight_fan_in)

    @property
    def weight_proj_bound(self) -> float:
        """``weight_proj`` is drawn uniform in [-bound, bound]: Var = 1 / input_size."""
        return math.sqrt(3.0 / self.input_size)

    @property
    def weight_c_bound(self) -> float:
        """``weight_c`` is drawn uniform in [-bound, bound], then multiplied by
        ``weight_c_scale`` (unless v1: zero and frozen)."""
        return math.sqrt(3.0) if self.weight_c_init is None else self.weight_c_init

    @property
    def weight_c_scale(self) -> float:
        """sqrt(1/2) with the default weight_c init (variance 1/2, like the gate weights'),
        else 1 (uniform in [-weight_c_init, weight_c_init])."""
        return math.sqrt(0.5) if self.weight_c_init is None else 1.0

    def scale_weight(self, w):
        """Applies the per-slot scalings of the recipe in place to ``w``, the drawn ``weight``
        viewed as (fan_in, num_directions, hidden_size, num_matrices) (a torch tensor under
        no_grad, or a NumPy/CuPy array): sqrt(1 - dropout) on the candidate slot 0 (h's dropout
        mask scales it back), sqrt(1 - rnn_dropout) overall, 0.1 with layer norm, scale_x on the
        learned skip slot 3 with rescale, and sqrt(1/2) on the gate slots 1:3 unless v1."""
        if self.dropout > 0:
            w[..., 0] *= math.sqrt(1 - self.dropout)
        if self.rnn_dropout > 0:
            w *= math.sqrt(1 - self.rnn_dropout)
        if self.layer_norm:
            w *= 0.1
        if self.rescale and self.has_skip_term and self.num_matrices == 4:
            w[..., 3] *= self.scale_x
        if not self.v1:
            w[..., 1:3] *= math.sqrt(0.5)

    def weight_slots_shape(self) -> Tuple[int, int, int, int]:
        """(fan_in, num_directions, hidden_size, num_matrices): ``weight`` as ``scale_weight``
        takes it (a view of the (fan_in, output_size * num_matrices) matrix)."""
        return (self.weight_fan_in, self.num_directions, self.hidden_size, self.num_matrices)


# -- a stack ---------------------------------------------------------------------------------------

class StackLayout:
    """The layers of a stack (``SRU``, ``SRUpp``): ``output_size``, ``num_directions``,
    ``has_input_to_hidden`` (proj_input_to_hidden_first and input_size != output_size: a bias-free
    (input_size -> output_size) map before the first layer), and per layer
    ``layer_input_sizes``, ``layer_dropouts`` (dropout on h in every layer but the last) and
    ``layer_projection_sizes`` (from an int or one size per layer)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int,
                 bidirectional: bool = False, proj_input_to_hidden_first: bool = False,
                 dropout: float = 0.0, projection_size=0):
        check_positive_int(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        check_probability(dropout=dropout)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.hidden_size * self.num_directions
        self.has_input_to_hidden = bool(proj_input_to_hidden_first) and \
            self.input_size != self.output_size
        first = self.output_size if self.has_input_to_hidden else self.input_size
        self.layer_input_sizes = [first] + [self.output_size] * (self.num_layers - 1)
        self.layer_dropouts = [float(dropout)] * (self.num_layers - 1) + [0.0]
        self.layer_projection_sizes = layer_projection_sizes(projection_size, self.num_layers)


# -- sru 3.0 checkpoints ---------------------------------------------------------------------------

SRU3_LINEAR = "transform_module.weight"
SRU3_PROJECTED = ("transform_module.0.weight", "transform_module.1.weight")


def convert_sru3_keys(state, prefix: str, layout: LayerLayout) -> List[str]:
    """Renames, in ``state`` (a mutable mapping), the keys of one layer saved by ``sru`` 3.0's
    ``SRU`` into this layout's names; returns the names written.

    ``sru`` 3.0 keeps U's map in ``transform_module``: a bias-free Linear (``.weight`` (out*k,
    n_in), the transpose of ``weight``) or, for any projection_size > 0, a Sequential of two
    (``.0.weight`` (p, n_in), ``.1.weight`` (out*k, p)). They become ``weight`` (n_in, out*k) or
    ``weight_proj`` + ``weight`` when this layer projects; a projected checkpoint for a layer
    that does not (2.6's rule projects only when p < min(n_in, out)) loads the product of the two
    matrices into ``weight``: the same U up to rounding. The values need ``.T`` and ``@`` (torch
    tensors, NumPy or CuPy arrays). Nothing happens when the layer has a transform module of its
    own or the state already has ``weight``. ValueError for an unprojected checkpoint into a
    projecting layer (no exact conversion) or matrices that do not chain.
    """
    if layout.transform_module or any(prefix + name in state for name in ("weight", "weight_proj")):
        return []
    linear = prefix + SRU3_LINEAR
    first, second = (prefix + name for name in SRU3_PROJECTED)
    if linear in state:
        if layout.projection_size:
            raise ValueError(f"{linear}: a checkpoint of sru 3.0 without projection does not "
                             f"load into a layer with projection_size = "
                             f"{layout.projection_size} (weight_proj); build the layer with "
                             f"projection_size=0")
        state[prefix + "weight"] = state.pop(linear).T
        return [prefix + "weight"]
    if first not in state or second not in state:
        return []
    down, up = state[first], state[second]  # (p, n_in), (out*k, p)
    if len(down.shape) != 2 or len(up.shape) != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"{first}, {second}: expected matrices (p, n_in) and (out*k, p), got "
                         f"shapes {tuple(down.shape)} and {tuple(up.shape)}")
    del state[first], state[second]
    if layout.projection_size:
        state[prefix + "weight_proj"] = down.T
        state[prefix + "weight"] = up.T
        return [prefix + "weight_proj", prefix + "weight"]
    state[prefix + "weight"] = down.T @ up.T
    return [prefix + "weight"]
