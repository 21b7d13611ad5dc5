"""NumPy-style SRU layers: ``SRU`` (a stack) and ``SRUCell`` (one layer) over NumPy or CuPy arrays.

    from sru_cupy.arrays import SRU
    model = SRU(32, 64, num_layers=2, device="cpu", seed=0)      # device="cuda" for CuPy
    h, c, cache = model.forward(x, training=True)                 # x (L, B, 32)
    grad_x, grad_c0, grads = model.backward(cache, grad_h, grad_c)
    for name, g in grads.items():
        model.params[name] -= 0.01 * g                             # in place

Everything is array code: the GEMMs are ``xp.matmul`` (cuBLAS through CuPy on the GPU), layer norm
forward and backward are written out, dropout masks come from ``xp.random``, and the recurrence runs
through ``sru_cupy.launch`` (the CUDA kernels on CuPy arrays, their C++ build on NumPy arrays).
Importing or using this module never imports torch.

The model mirrors the PyTorch ``sru_cupy.SRU`` / ``SRUCell`` (the ``sru`` 2.6 layers): the same
constructor options (minus ``transform_module``), the same initialisation recipe, the same forward
(pre or post layer norm, the skip input is the un-normalised layer input, ``rnn_dropout`` on the
GEMM input, variational dropout on h in every layer but the last, ``weight_proj``,
``input_to_hidden``, k = 4 when has_skip_term and n_in != output_size, ``projection_size`` an int
or one per layer) and parameters named like its ``state_dict()``:

    rnn_lst.{i}.weight (n_in, out*k) or rnn_lst.{i}.weight_proj (n_in, p) + .weight (p, out*k)
    rnn_lst.{i}.weight_c (2*out,)   rnn_lst.{i}.bias (2*out,)   rnn_lst.{i}.scale_x (1,) (buffer)
    rnn_lst.{i}.layer_norm.weight / .bias (n_in, or out with normalize_after)
    input_to_hidden.weight (out, input_size) (proj_input_to_hidden_first and input_size != out)

(``SRUCell`` has the same names without the ``rnn_lst.{i}.`` prefix.) Weights therefore move both
ways between the two implementations (torch is never imported here; its tensors are read through
DLPack):

    model.load_state_dict(torch_sru.state_dict())   # tensors read through DLPack, or convert:
    model.load_state_dict({k: v.detach().cpu().numpy() for k, v in torch_sru.state_dict().items()})
    torch_sru.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})

A state_dict of ``sru`` 3.0's ``SRU`` (U's matrices in ``transform_module``) loads as well.

``save(path)`` writes a .npz with those names plus ``__config__`` (a JSON string with the class and
constructor options), so ``SRU.load(path)`` (or ``sru_cupy.arrays.load(path)``) restores the model.
``amp_recurrence_fp16`` is accepted for compatibility and has no effect (there is no autocast).
"""

import json
import math
import numbers

import numpy as np

from . import interop, launch
from .layout import (SRU3_LINEAR, SRU3_PROJECTED, LayerLayout, StackLayout,
                     convert_sru3_keys)

__all__ = ["SRU", "SRUCell", "load", "layer_norm_forward", "layer_norm_backward"]

FORMAT_VERSION = 1
CONFIG_KEY = "__config__"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default


# -- devices and arrays ---------------------------------------------------------------------------


def _resolve_device(device, xp):
    """-> (xp, device_id or None) from device="cpu"|"cuda"|"cuda:N"|int and/or xp=numpy|cupy."""
    if xp is not None:
        name = getattr(xp, "__name__", "")
        if name not in ("numpy", "cupy"):
            raise ValueError(f"xp: expected the numpy or cupy module, got {xp!r}")
    if device is None:
        device = "cuda" if xp is not None and xp.__name__ == "cupy" else "cpu"
    if isinstance(device, numbers.Integral) and not isinstance(device, bool):
        device = f"cuda:{int(device)}"
    if not isinstance(device, str):
        raise ValueError(f"device: expected 'cpu', 'cuda', 'cuda:N' or a GPU index, got {device!r}")
    if device == "cpu":
        if xp is not None and xp.__name__ != "numpy":
            raise ValueError("device='cpu' needs xp=numpy, got xp=cupy")
        return np, None
    if device == "cuda" or device.startswith("cuda:"):
        if xp is not None and xp.__name__ != "cupy":
            raise ValueError(f"device={device!r} needs xp=cupy, got xp=numpy")
        try:
            import cupy
        except ImportError as error:
            raise ImportError(f"device={device!r} needs CuPy (pip install cupy-cuda13x or "
                              "cupy-cuda12x)") from error
        if device == "cuda":
            index = cupy.cuda.runtime.getDevice()
        else:
            try:
                index = int(device[5:])
            except ValueError:
                raise ValueError(f"device: expected 'cuda:N', got {device!r}") from None
        return cupy, index
    raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


_INT_OPTIONS = ("input_size", "hidden_size", "num_layers", "n_proj")
_FLOAT_OPTIONS = ("dropout", "rnn_dropout", "highway_bias")


def _config(**options):
    """Constructor options (checked by the layouts) normalised to plain int, float, bool, None or
    a list of ints (per-layer projection sizes): the saved ``__config__``."""
    config = {}
    for name, value in options.items():
        if name in _INT_OPTIONS:
            config[name] = int(value)
        elif name == "projection_size":
            config[name] = ([int(v) for v in value] if isinstance(value, (list, tuple))
                            else int(value))
        elif name in _FLOAT_OPTIONS:
            config[name] = float(value)
        elif name == "weight_c_init":
            config[name] = None if value is None else float(value)
        else:
            config[name] = bool(value)
    return config


def _check_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype.name}")
    return dtype


def _to_numpy(array):
    return array if isinstance(array, np.ndarray) else array.get()


def _uniform(rng, shape):
    """Uniform [0, 1) samples from a numpy/cupy Generator or RandomState."""
    if hasattr(rng, "random"):
        return rng.random(size=shape)
    return rng.random_sample(size=shape)


def _dropout_mask(xp, rng, shape, p, dtype):
    """Variational dropout mask: Bernoulli(1 - p) / (1 - p), one value per (batch, column)."""
    keep = _uniform(rng, shape) < (1.0 - p)
    return xp.asarray(keep).astype(dtype) * dtype.type(1.0 / (1.0 - p))


# -- layer norm -----------------------------------------------------------------------------------


def layer_norm_forward(x, weight, bias, eps=LAYER_NORM_EPS):
    """Layer norm over the last axis (biased variance, like torch.nn.LayerNorm).

    -> (y, cache) with cache = (x_hat, rstd, weight) for :func:`layer_norm_backward`."""
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    rstd = 1.0 / (var + eps) ** 0.5
    x_hat = centred * rstd
    return x_hat * weight + bias, (x_hat, rstd, weight)


def layer_norm_backward(cache, grad_y):
    """-> (grad_x, grad_weight, grad_bias) of :func:`layer_norm_forward`."""
    x_hat, rstd, weight = cache
    n = x_hat.shape[-1]
    flat_gy = grad_y.reshape(-1, n)
    flat_xh = x_hat.reshape(-1, n)
    grad_weight = (flat_gy * flat_xh).sum(axis=0)
    grad_bias = flat_gy.sum(axis=0)
    g = grad_y * weight
    grad_x = rstd * (g - g.mean(axis=-1, keepdims=True)
                     - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    return grad_x, grad_weight, grad_bias


# -- common machinery -----------------------------------------------------------------------------


class _ArrayModule:
    """Parameters in ``self.params`` (names as in the torch state_dict), config, save and load."""

    _CONFIG_NAMES = ()

    def _setup(self, config, device, xp, dtype, seed):
        self.config = dict(config)
        self.xp, self.device_id = _resolve_device(device, xp)
        self.dtype = _check_dtype(dtype)
        self.seed = seed
        self._rng = None

    @property
    def rng(self):
        """The model's dropout generator (numpy/cupy ``default_rng(seed)``, made at first use)."""
        if self._rng is None:
            self._rng = self._make_rng(self.seed)
        return self._rng

    @rng.setter
    def rng(self, value):
        self._rng = value

    # -- devices ----------------------------------------------------------------------------------
    @property
    def device(self):
        """"cpu" or "cuda:N"."""
        return "cpu" if self.device_id is None else f"cuda:{self.device_id}"

    def device_guard(self):
        """Context manager making the model's GPU current (a no-op on the CPU)."""
        if self.device_id is None:
            import contextlib
            return contextlib.nullcontext()
        return self.xp.cuda.Device(self.device_id)

    def _make_rng(self, seed):
        with self.device_guard():
            if hasattr(self.xp.random, "default_rng"):
                return self.xp.random.default_rng(seed)
            return self.xp.random.RandomState(seed)

    def _rng_for(self, rng):
        """None -> the model's generator; int -> a fresh ``default_rng(int)`` (on the GPU that
        builds a new generator state every call: pass a Generator when calling often)."""
        if rng is None:
            return self.rng
        if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
            return self._make_rng(int(rng))
        if hasattr(rng, "random") or hasattr(rng, "random_sample"):
            return rng
        raise TypeError(f"rng: expected None, an int seed or a numpy/cupy Generator or "
                        f"RandomState, got {type(rng).__name__}")

    def _asarray(self, value, argname, dtype=None):
        """``value`` as an array of this module's kind and device (None stays None); a dtype
        conversion allocates on the model's device, whichever device is current."""
        if value is None:
            return None
        array = interop.as_array(value, argname)
        if self.xp is np and not isinstance(array, np.ndarray):
            raise TypeError(f"{argname}: the model is on the CPU (NumPy arrays), got a "
                            f"{type(array).__module__}.{type(array).__name__} on a GPU; "
                            "move the model or the array (do not mix NumPy and CuPy arrays)")
        if self.xp is not np:
            if isinstance(array, np.ndarray):
                raise TypeError(f"{argname}: the model is on {self.device} (CuPy arrays), got a "
                                "numpy.ndarray; move it with cupy.asarray (do not mix NumPy and "
                                "CuPy arrays)")
            if array.device.id != self.device_id:
                raise ValueError(f"{argname}: expected an array on {self.device} like the model, "
                                 f"got one on cuda:{array.device.id}")
        if dtype is not None:
            if np.dtype(array.dtype).kind != "f" and np.dtype(array.dtype).name != "bfloat16":
                raise TypeError(f"{argname}: expected a floating dtype, got "
                                f"{np.dtype(array.dtype).name}")
            with self.device_guard():  # a converted copy lives on the model's device
                array = array.astype(dtype, copy=False)
        return array

    # -- parameters -------------------------------------------------------------------------------
    def param_shapes(self):
        """{name: shape} of every entry of ``params`` (buffers included)."""
        raise NotImplementedError

    def trainable_names(self):
        """Names of the parameters that get gradients (not scale_x, not weight_c with v1)."""
        raise NotImplementedError

    def state_dict(self):
        """{name: NumPy array copy} under the torch state_dict names (loadable with strict=True)."""
        return {name: np.array(_to_numpy(self.params[name])) for name in self.param_shapes()}

    def load_state_dict(self, state, strict=True):
        """Copies a mapping of arrays (names as in the torch state_dict) into ``params``.

        Values may be NumPy arrays, CuPy arrays, DLPack producers or array-likes. A torch
        state_dict can be given as it is (its tensors are read through DLPack; torch is not
        imported here) or converted by the caller with
        ``{k: v.detach().cpu().numpy() for k, v in sd.items()}``. A state_dict of ``sru``
        3.0's ``SRU`` (U's matrices in ``transform_module``) loads too (see
        ``layout.convert_sru3_keys``). Checks the names (missing or unexpected keys are errors
        unless ``strict=False``) and every shape; values are copied and cast to the model's dtype.
        Raises KeyError/ValueError/TypeError naming the entry.
        """
        if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
            raise TypeError(f"state: expected a mapping of names to arrays, got "
                            f"{type(state).__name__}")
        state = self._from_sru3(state)
        shapes = self.param_shapes()
        names = [k for k in state.keys() if k != CONFIG_KEY]
        missing = [k for k in shapes if k not in state]
        unexpected = [k for k in names if k not in shapes]
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}.load_state_dict: "
                           + "; ".join(part for part in (
                               f"missing keys {missing}" if missing else "",
                               f"unexpected keys {unexpected}" if unexpected else "") if part)
                           + f" (expected exactly {sorted(shapes)})")
        arrays = {}
        for name in names:
            if name not in shapes:
                continue
            value = _read_array(state[name], name)
            if tuple(value.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: expected shape {tuple(shapes[name])}, got "
                                 f"{tuple(value.shape)}")
            kind = np.dtype(value.dtype).kind
            if kind not in "fiu" and np.dtype(value.dtype).name != "bfloat16":
                raise TypeError(f"{name}: expected a numeric dtype, got "
                                f"{np.dtype(value.dtype).name}")
            arrays[name] = value
        with self.device_guard():
            for name, value in arrays.items():
                if not isinstance(value, np.ndarray) and self.xp is np:
                    value = _to_numpy(value)
                if np.dtype(value.dtype).name == "bfloat16":
                    value = np.asarray(value, dtype=np.float32)
                elif interop.is_cupy(value) and self.xp is not np \
                        and value.device.id != self.device_id:
                    value = value.get()  # through the host: no peer access needed
                self.params[name] = self.xp.array(value, dtype=self.dtype)  # a copy, contiguous
        self._scale_cache = None
        return self

    def _layers(self):
        """The SRUCell objects whose parameters this model holds."""
        raise NotImplementedError

    def _from_sru3(self, state):
        """``state``, or a dict copy of it with each layer's ``sru`` 3.0 transform_module
        entries read as arrays and converted to this model's names."""
        if not any("transform_module." in key for key in state.keys()):
            return state
        state = {key: state[key] for key in state.keys()}
        for cell in self._layers():
            for name in (SRU3_LINEAR,) + SRU3_PROJECTED:
                if cell._key(name) in state:
                    state[cell._key(name)] = _read_array(state[cell._key(name)], cell._key(name))
            convert_sru3_keys(state, cell._prefix, cell.layout)
        return state

    def _config_entry(self):
        return json.dumps({"format": FORMAT_VERSION, "class": type(self).__name__,
                           "dtype": self.dtype.name, "config": self.config}, sort_keys=True)

    def save(self, path):
        """Writes the parameters (torch state_dict names) and ``__config__`` to a .npz file.

        Returns the path written (NumPy appends ".npz" when ``path`` lacks it)."""
        path = str(path)
        if not path.endswith(".npz"):
            path += ".npz"
        entries = self.state_dict()
        entries[CONFIG_KEY] = np.array(self._config_entry())
        np.savez(path, **entries)
        return path

    def load_params(self, path, strict=True):
        """Loads parameters from a .npz file (or any mapping) into this model, checking names and
        shapes. A ``__config__`` entry, when present, must describe this same model."""
        if isinstance(path, (str, bytes)) or hasattr(path, "__fspath__"):
            with np.load(path, allow_pickle=False) as data:
                entries = {k: data[k] for k in data.files}
        else:
            entries = dict(path)
        if CONFIG_KEY in entries:
            meta = _read_meta(entries[CONFIG_KEY], path)
            if meta["class"] != type(self).__name__ or meta["config"] != self.config:
                raise ValueError(
                    f"{path}: saved for {meta['class']}({_format_config(meta['config'])}), not for "
                    f"this {type(self).__name__}({_format_config(self.config)}); use "
                    f"{meta['class']}.load(path) to build the saved model")
        return self.load_state_dict(entries, strict=strict)

    @classmethod
    def load(cls, path, device=None, xp=None, dtype=None):
        """Builds the model saved by :meth:`save` at ``path`` (config and parameters).

        ``dtype`` defaults to the saved one; ``device``/``xp`` to the CPU."""
        with np.load(path, allow_pickle=False) as data:
            entries = {k: data[k] for k in data.files}
        if CONFIG_KEY not in entries:
            raise ValueError(f"{path}: no {CONFIG_KEY!r} entry, so the model's options are "
                             "unknown; build the model yourself and call load_params(path) (a "
                             "torch state_dict saved as .npz has no config)")
        meta = _read_meta(entries[CONFIG_KEY], path)
        target = _CLASSES.get(meta["class"])
        if target is None or (cls is not _ArrayModule and not issubclass(target, cls)):
            raise ValueError(f"{path}: holds a {meta['class']}, not a {cls.__name__}")
        try:
            model = target(**meta["config"], device=device, xp=xp,
                           dtype=dtype if dtype is not None else meta["dtype"])
        except TypeError as error:
            raise ValueError(f"{path}: {CONFIG_KEY} has options {target.__name__} does not take: "
                             f"{error}") from error
        return model.load_state_dict(entries, strict=True)


def _time_major(x, mask_pad):
    """Batch-first x (B, L, n) and mask_pad (B, L) as time-major views (L, B, n), (L, B)."""
    if mask_pad is not None:
        if mask_pad.ndim != 2:
            raise ValueError(f"mask_pad: expected shape (B, L), got {tuple(mask_pad.shape)}")
        mask_pad = mask_pad.T
    return x.transpose(1, 0, 2), mask_pad


def _read_array(value, name):
    """A state entry as a NumPy or CuPy array: DLPack producers (torch tensors) read through
    DLPack (a GPU bfloat16 tensor as float32), array-likes through np.asarray."""
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        value, bits = interop.convert(value, name)
        if bits:  # bfloat16 on a GPU, as uint16 bits
            value = interop.bf16_bits_to_float32(value)
    elif not (isinstance(value, np.ndarray) or interop.is_cupy(value)):
        value = np.asarray(value)
    return value


def _read_meta(entry, path):
    try:
        meta = json.loads(str(np.asarray(entry)[()]))
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError("not a dict with a 'config' dict")
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {CONFIG_KEY} is not a valid config entry ({error})") from error
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: {CONFIG_KEY} has format {meta.get('format')!r}, this version "
                         f"reads format {FORMAT_VERSION}")
    return meta


def _format_config(config):
    return ", ".join(f"{k}={v!r}" for k, v in sorted(config.items()))


def load(path, device=None, xp=None, dtype=None):
    """Loads an ``SRU`` or ``SRUCell`` saved with ``save(path)``, whichever the file holds."""
    return _ArrayModule.load.__func__(_ArrayModule, path, device=device, xp=xp, dtype=dtype)


# -- one layer ------------------------------------------------------------------------------------


class SRUCell(_ArrayModule):
    """One SRU layer (uni- or bidirectional) over NumPy or CuPy arrays.

    forward(x, c0=None, mask_pad=None, training=False, rng=None) -> (h, c, cache):
    x (L, B, input_size) ((B, L, input_size) with batch_first, or (B, input_size) for one step),
    c0 (B, output_size), mask_pad (L, B) ((B, L) with batch_first) nonzero at padding; h (L, B,
    output_size) and c (B, output_size), output_size = hidden_size * (2 if bidirectional else 1).
    backward(cache, grad_h, grad_c=None) -> (grad_x, grad_c0, grads) with grads keyed like params.

    The constructor takes the options of the torch ``SRUCell`` (minus transform_module / custom_m),
    plus ``device``/``xp`` ("cpu" -> NumPy, "cuda[:N]" -> CuPy), ``dtype`` (float32 or float64) and
    ``seed`` for the initialisation and the default dropout generator. ``layout`` is the
    ``layout.LayerLayout`` of those options, as in the torch layer (sizes, parameter shapes, the
    initialisation recipe).
    """

    def __init__(self, input_size, hidden_size, dropout=0.0, rnn_dropout=0.0, bidirectional=False,
                 n_proj=0, use_tanh=False, highway_bias=0.0, has_skip_term=True, layer_norm=False,
                 rescale=True, v1=False, amp_recurrence_fp16=True, normalize_after=False,
                 weight_c_init=None, batch_first=False, projection_size=None, *, device=None,
                 xp=None, dtype="float32", seed=None, _params=None, _prefix="", _init_rng=None):
        # Sizes, parameter shapes and the initialisation recipe (and the options' checks), shared
        # with the torch SRUCell.
        self.layout = layout = LayerLayout(input_size, hidden_size, bidirectional=bidirectional, n_proj=n_proj,
                             projection_size=projection_size, has_skip_term=has_skip_term,
                             layer_norm=layer_norm, normalize_after=normalize_after,
                             rescale=rescale, highway_bias=highway_bias, v1=v1, dropout=dropout,
                             rnn_dropout=rnn_dropout, weight_c_init=weight_c_init)
        config = _config(input_size=input_size, hidden_size=hidden_size, dropout=dropout,
                         rnn_dropout=rnn_dropout, bidirectional=bidirectional,
                         n_proj=layout.requested_projection_size, use_tanh=use_tanh,
                         highway_bias=highway_bias, has_skip_term=has_skip_term,
                         layer_norm=layer_norm, rescale=rescale, v1=v1,
                         amp_recurrence_fp16=amp_recurrence_fp16, normalize_after=normalize_after,
                         weight_c_init=weight_c_init, batch_first=batch_first)
        self._setup(config, device, xp, dtype, seed)
        for name, value in config.items():
            if name != "n_proj":
                setattr(self, name, value)
        self.output_size = layout.output_size
        self.projection_size = layout.projection_size
        self.num_matrices = layout.num_matrices
        self._prefix = _prefix
        self.params = {} if _params is None else _params
        self._scale_cache = None
        self.reset_parameters(np.random.default_rng(seed) if _init_rng is None else _init_rng)

    def _key(self, name):
        return self._prefix + name

    def _layers(self):
        return [self]

    def param_shapes(self):
        return {self._key(name): shape for name, shape in self.layout.param_shapes().items()}

    def trainable_names(self):
        skip = {self._key("scale_x")} | ({self._key("weight_c")} if self.v1 else set())
        return [name for name in self.param_shapes() if name not in skip]

    def reset_parameters(self, rng=None):
        """The `sru` initialisation (as the torch SRUCell's), drawn with a NumPy Generator (float64
        on the host, then cast and moved): Var[w] = 1/fan_in, the highway bias, weight_c of variance
        1/2 scaled with the gate weights by sqrt(1/2), compensation for dropout and layer norm."""
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        layout, out = self.layout, self.output_size
        values = {}
        bias = np.zeros(2 * out)
        bias[out:] = layout.highway_bias
        values["bias"] = bias
        values["scale_x"] = np.array([layout.scale_x])
        fan_in = layout.weight_fan_in
        weight = rng.uniform(-layout.weight_bound, layout.weight_bound,
                             size=(fan_in, out * layout.num_matrices))
        if layout.projection_size:
            values["weight_proj"] = rng.uniform(-layout.weight_proj_bound, layout.weight_proj_bound,
                                                size=(self.input_size, layout.projection_size))
        layout.scale_weight(weight.reshape(layout.weight_slots_shape()))  # a view
        values["weight"] = weight
        if layout.v1:
            values["weight_c"] = np.zeros(2 * out)
        else:
            values["weight_c"] = rng.uniform(-layout.weight_c_bound, layout.weight_c_bound,
                                             size=2 * out) * layout.weight_c_scale
        if layout.layer_norm:
            values["layer_norm.weight"] = np.ones(layout.layer_norm_size)
            values["layer_norm.bias"] = np.zeros(layout.layer_norm_size)
        with self.device_guard():
            for name, value in values.items():
                self.params[self._key(name)] = self.xp.asarray(value.astype(self.dtype))
        self._scale_cache = None

    def _scale_x(self):
        """scale_x as a Python float (read from params; one host copy when it changes)."""
        array = self.params[self._key("scale_x")]
        if self._scale_cache is None or self._scale_cache[0] is not array:
            self._scale_cache = (array, float(_to_numpy(array).reshape(-1)[0]))
        return self._scale_cache[1]

    # -- forward / backward -----------------------------------------------------------------------
    def forward(self, x, c0=None, mask_pad=None, training=False, rng=None, keep_cache=True):
        """-> (h (L, B, output_size), c (B, output_size), cache or None).

        ``training`` enables the dropout masks (drawn from ``rng``: None for the model's own
        generator, an int seed for a fresh one (the same masks on every call with that seed), or a
        numpy/cupy Generator). ``keep_cache=False`` runs the
        inference kernel and returns no cache (no backward possible).
        """
        x = self._asarray(x, "x", self.dtype)
        one_step = x.ndim == 2
        if one_step:
            x = x[None] if not self.batch_first else x[:, None]
        mask_pad = self._asarray(mask_pad, "mask_pad")
        if mask_pad is not None and one_step and mask_pad.ndim == 1:
            mask_pad = mask_pad[None] if not self.batch_first else mask_pad[:, None]
        if x.ndim != 3:
            layout = "(B, L, n_in)" if self.batch_first else "(L, B, n_in)"
            raise ValueError(f"x: expected rank 3 {layout} or rank 2 (B, n_in), got shape "
                             f"{tuple(x.shape)}")
        if self.batch_first:
            x, mask_pad = _time_major(x, mask_pad)
        c0 = self._asarray(c0, "c0", self.dtype)
        with self.device_guard():
            h, c, cache = self._forward_time_major(x, c0, mask_pad, training, self._rng_for(rng),
                                                   keep_cache)
            if self.batch_first:
                h = h.transpose(1, 0, 2)
            if one_step:
                h = h[:, 0] if self.batch_first else h[0]
        if cache is not None:
            cache["one_step"] = one_step
            cache["out_shape"] = tuple(h.shape)
        return h, c, cache

    __call__ = forward

    def backward(self, cache, grad_h, grad_c=None):
        """-> (grad_x (like x), grad_c0 (B, output_size), grads {name: array}) for the forward that
        returned ``cache``; grad_h like h (None for zero), grad_c (B, output_size) or None."""
        if not isinstance(cache, dict) or "out_shape" not in cache:
            raise TypeError("cache: expected the cache returned by this cell's "
                            "forward(..., keep_cache=True)")
        with self.device_guard():
            grad_h = self._grad_h(cache, grad_h)
            if cache["one_step"]:
                grad_h = grad_h[:, None] if self.batch_first else grad_h[None]
            if self.batch_first:
                grad_h = grad_h.transpose(1, 0, 2)
            grad_c = self._asarray(grad_c, "grad_c", self.dtype)
            grad_x, grad_c0, grads = self._backward_time_major(cache, grad_h, grad_c)
            if self.batch_first:
                grad_x = grad_x.transpose(1, 0, 2)
            if cache["one_step"]:
                grad_x = grad_x[:, 0] if self.batch_first else grad_x[0]
        return grad_x, grad_c0, grads

    def _grad_h(self, cache, grad_h):
        if grad_h is None:
            return self.xp.zeros(cache["out_shape"], dtype=self.dtype)
        grad_h = self._asarray(grad_h, "grad_h", self.dtype)
        if tuple(grad_h.shape) != cache["out_shape"]:
            raise ValueError(f"grad_h: expected shape {cache['out_shape']} like h, got "
                             f"{tuple(grad_h.shape)}")
        return grad_h

    def _forward_time_major(self, x, c0, mask_pad, training, rng, keep_cache):
        xp, P, k = self.xp, self.params, self._key
        if x.shape[-1] != self.input_size:
            raise ValueError(f"x: expected last axis input_size = {self.input_size}, got "
                             f"{x.shape[-1]}")
        L, B = int(x.shape[0]), int(x.shape[1])
        if c0 is not None and tuple(c0.shape) != (B, self.output_size):
            raise ValueError(f"c0: expected shape (B, output_size) = {(B, self.output_size)}, got "
                             f"{tuple(c0.shape)}")
        if mask_pad is not None and tuple(mask_pad.shape) != (L, B):
            raise ValueError(f"mask_pad: expected shape (L, B) = {(L, B)}"
                             f"{' ((B, L) with batch_first)' if self.batch_first else ''}, got "
                             f"{tuple(mask_pad.shape)}")
        residual = x
        inp, ln_pre = x, None
        if self.layer_norm and not self.normalize_after:
            inp, ln_pre = layer_norm_forward(x, P[k("layer_norm.weight")], P[k("layer_norm.bias")])
        mask_x = None
        if training and self.rnn_dropout > 0:
            mask_x = _dropout_mask(xp, rng, (B, self.input_size), self.rnn_dropout, self.dtype)
            inp = inp * mask_x
        flat = inp.reshape(L * B, self.input_size)
        projected = None
        if self.projection_size:
            projected = xp.matmul(flat, P[k("weight_proj")])
            U = xp.matmul(projected, P[k("weight")])
        else:
            U = xp.matmul(flat, P[k("weight")])
        U = U.reshape(L, B, U.shape[-1])  # explicit: L or B may be 0
        mask_h = None
        if training and self.dropout > 0:
            mask_h = _dropout_mask(xp, rng, (B, self.output_size), self.dropout, self.dtype)
        skip_x = residual if self.has_skip_term and self.num_matrices == 3 else None
        weight_c = None if self.v1 else P[k("weight_c")]
        options = dict(hidden_size=self.hidden_size, bidirectional=self.bidirectional,
                       has_skip_term=self.has_skip_term, use_tanh=self.use_tanh,
                       scale_x=self._scale_x(), mask_h=mask_h, mask_pad=mask_pad)
        h, c, c_last = launch.recurrence_forward(U, skip_x, weight_c, P[k("bias")], c0,
                                                 store_c=keep_cache, **options)
        ln_post = None
        if self.layer_norm and self.normalize_after:
            h, ln_post = layer_norm_forward(h, P[k("layer_norm.weight")], P[k("layer_norm.bias")])
        if not keep_cache:
            return h, c_last, None
        cache = dict(layer=self._prefix, flat=flat, projected=projected, U=U, skip_x=skip_x,
                     c0=c0, c=c, mask_x=mask_x, ln_pre=ln_pre, ln_post=ln_post, options=options,
                     input_shape=tuple(x.shape), h_shape=tuple(h.shape),
                     params={name: P[name] for name in self.param_shapes()})
        return h, c_last, cache

    def _backward_time_major(self, cache, grad_h, grad_c_last):
        xp, k = self.xp, self._key
        P = cache["params"]  # the arrays the forward used
        L, B, n_in = cache["input_shape"]
        if grad_c_last is not None and tuple(grad_c_last.shape) != (B, self.output_size):
            raise ValueError(f"grad_c: expected shape (B, output_size) = {(B, self.output_size)}, "
                             f"got {tuple(grad_c_last.shape)}")
        grads = {}
        if cache["ln_post"] is not None:
            grad_h, grads[k("layer_norm.weight")], grads[k("layer_norm.bias")] = \
                layer_norm_backward(cache["ln_post"], grad_h)
        weight_c = None if self.v1 else P[k("weight_c")]
        g = launch.recurrence_backward(grad_h, grad_c_last, cache["U"], cache["skip_x"], weight_c,
                                       P[k("bias")], cache["c0"], cache["c"], **cache["options"])
        grad_U = g["U"].reshape(L * B, g["U"].shape[-1])
        if self.projection_size:
            grads[k("weight")] = xp.matmul(cache["projected"].T, grad_U)
            grad_projected = xp.matmul(grad_U, P[k("weight")].T)
            grads[k("weight_proj")] = xp.matmul(cache["flat"].T, grad_projected)
            grad_in = xp.matmul(grad_projected, P[k("weight_proj")].T)
        else:
            grads[k("weight")] = xp.matmul(cache["flat"].T, grad_U)
            grad_in = xp.matmul(grad_U, P[k("weight")].T)
        grad_in = grad_in.reshape(L, B, n_in)
        if cache["mask_x"] is not None:
            grad_in = grad_in * cache["mask_x"]
        if cache["ln_pre"] is not None:
            grad_in, grads[k("layer_norm.weight")], grads[k("layer_norm.bias")] = \
                layer_norm_backward(cache["ln_pre"], grad_in)
        if g["x"] is not None:
            grad_in = grad_in + g["x"]
        if not self.v1:
            grads[k("weight_c")] = g["weight_c"].astype(self.dtype, copy=False)
        grads[k("bias")] = g["bias"].astype(self.dtype, copy=False)
        return grad_in, g["c0"], {name: grads[name] for name in self.trainable_names()}


# -- the stack ------------------------------------------------------------------------------------


class SRU(_ArrayModule):
    """A stack of SRU layers over NumPy or CuPy arrays, like the torch ``sru_cupy.SRU``.

    forward(x, c0=None, mask_pad=None, training=False, rng=None) -> (h, c, cache):
    x (L, B, input_size) ((B, L, input_size) with batch_first); c0 (num_layers, B, output_size);
    mask_pad (L, B) ((B, L) with batch_first), nonzero at padding. h (L, B, output_size) and c
    (num_layers, B, output_size) (or (num_layers * dirs, B, hidden_size) with
    nn_rnn_compatible_return); cache holds what backward needs (None with keep_cache=False).

    backward(cache, grad_h, grad_c=None) -> (grad_x, grad_c0, grads): grad_x like x, grad_c0
    (num_layers, B, output_size) like c0 (whether or not one was given), grads an entry for every
    trainable parameter keyed like ``params`` (all but the scale_x buffers and, with v1, weight_c).
    Backward reads the parameter arrays the forward used: update them after backward.

    The constructor takes the options of the torch ``SRU`` (minus transform_module / custom_m),
    plus ``device``/``xp`` ("cpu" -> NumPy, "cuda[:N]" -> CuPy), ``dtype`` (float32 or float64) and
    ``seed`` for the initialisation and the default dropout generator.
    """

    def __init__(self, input_size, hidden_size, num_layers=2, dropout=0.0, rnn_dropout=0.0,
                 bidirectional=False, projection_size=0, use_tanh=False, layer_norm=False,
                 highway_bias=0.0, has_skip_term=True, rescale=False, v1=False,
                 nn_rnn_compatible_return=False, proj_input_to_hidden_first=False,
                 amp_recurrence_fp16=True, normalize_after=False, weight_c_init=None,
                 batch_first=False, *, device=None, xp=None, dtype="float32", seed=None):
        stack = StackLayout(input_size, hidden_size, num_layers, bidirectional=bidirectional,
                            proj_input_to_hidden_first=proj_input_to_hidden_first,
                            dropout=dropout, projection_size=projection_size)
        config = _config(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                         dropout=dropout, rnn_dropout=rnn_dropout, bidirectional=bidirectional,
                         projection_size=projection_size, use_tanh=use_tanh, layer_norm=layer_norm,
                         highway_bias=highway_bias, has_skip_term=has_skip_term, rescale=rescale,
                         v1=v1, nn_rnn_compatible_return=nn_rnn_compatible_return,
                         proj_input_to_hidden_first=proj_input_to_hidden_first,
                         amp_recurrence_fp16=amp_recurrence_fp16, normalize_after=normalize_after,
                         weight_c_init=weight_c_init, batch_first=batch_first)
        self._setup(config, device, xp, dtype, seed)
        for name in ("input_size", "hidden_size", "num_layers", "num_directions", "output_size",
                     "has_input_to_hidden"):
            setattr(self, name, getattr(stack, name))
        self.bidirectional = bool(bidirectional)
        self.batch_first = bool(batch_first)
        self.nn_rnn_compatible_return = bool(nn_rnn_compatible_return)
        self.params = {}
        init_rng = np.random.default_rng(seed)
        self.rnn_lst = [
            SRUCell(stack.layer_input_sizes[i], self.hidden_size, dropout=stack.layer_dropouts[i],
                    rnn_dropout=rnn_dropout, bidirectional=bidirectional,
                    n_proj=stack.layer_projection_sizes[i], use_tanh=use_tanh,
                    layer_norm=layer_norm, highway_bias=highway_bias,
                    has_skip_term=has_skip_term, rescale=rescale, v1=v1,
                    amp_recurrence_fp16=amp_recurrence_fp16, normalize_after=normalize_after,
                    weight_c_init=weight_c_init, device=self.device, xp=self.xp,
                    dtype=self.dtype, _params=self.params, _prefix=f"rnn_lst.{i}.",
                    _init_rng=init_rng)
            for i in range(self.num_layers)]
        self._reset_input_to_hidden(init_rng)

    def _reset_input_to_hidden(self, rng):
        if self.has_input_to_hidden:
            # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(self.input_size)
            value = rng.uniform(-bound, bound, size=(self.output_size, self.input_size))
            with self.device_guard():
                self.params["input_to_hidden.weight"] = self.xp.asarray(value.astype(self.dtype))

    def reset_parameters(self, seed=None):
        """Draws every parameter again with the initialisation recipe."""
        rng = np.random.default_rng(seed)
        for cell in self.rnn_lst:
            cell.reset_parameters(rng)
        self._reset_input_to_hidden(rng)

    def param_shapes(self):
        shapes = {}
        if self.has_input_to_hidden:
            shapes["input_to_hidden.weight"] = (self.output_size, self.input_size)
        for cell in self.rnn_lst:
            shapes.update(cell.param_shapes())
        return shapes

    def trainable_names(self):
        names = ["input_to_hidden.weight"] if self.has_input_to_hidden else []
        for cell in self.rnn_lst:
            names += cell.trainable_names()
        return names

    def _layers(self):
        return self.rnn_lst

    def load_state_dict(self, state, strict=True):
        super().load_state_dict(state, strict=strict)
        for cell in self.rnn_lst:
            cell._scale_cache = None
        return self

    def forward(self, x, c0=None, mask_pad=None, training=False, rng=None, keep_cache=True):
        """-> (h, c, cache); see the class docstring. ``rng``: None for the model's generator, an
        int seed for a fresh one (the same masks on every call with that seed), or a numpy/cupy
        Generator (or RandomState)."""
        x = self._asarray(x, "x", self.dtype)
        if x.ndim != 3:
            raise ValueError(f"x: expected rank 3 "
                             f"{'(B, L, n_in)' if self.batch_first else '(L, B, n_in)'}, got shape "
                             f"{tuple(x.shape)}")
        mask_pad = self._asarray(mask_pad, "mask_pad")
        if self.batch_first:
            x, mask_pad = _time_major(x, mask_pad)
        B = int(x.shape[1])
        if x.shape[-1] != self.input_size:
            raise ValueError(f"x: expected last axis input_size = {self.input_size}, got "
                             f"{x.shape[-1]}")
        c0 = self._asarray(c0, "c0", self.dtype)
        if c0 is not None and tuple(c0.shape) != (self.num_layers, B, self.output_size):
            raise ValueError(f"c0: expected shape (num_layers, B, output_size) = "
                             f"{(self.num_layers, B, self.output_size)}, got {tuple(c0.shape)}")
        rng = self._rng_for(rng)
        with self.device_guard():
            prev = x
            if self.has_input_to_hidden:
                prev = self.xp.matmul(x, self.params["input_to_hidden.weight"].T)
            finals, caches = [], []
            for i, cell in enumerate(self.rnn_lst):
                prev, c, cache = cell._forward_time_major(
                    prev, None if c0 is None else c0[i], mask_pad, training, rng, keep_cache)
                finals.append(c)
                caches.append(cache)
            c_all = self.xp.stack(finals)
            if self.nn_rnn_compatible_return:
                c_all = (c_all.reshape(self.num_layers, B, self.num_directions, self.hidden_size)
                         .transpose(0, 2, 1, 3)
                         .reshape(self.num_layers * self.num_directions, B, self.hidden_size))
            h = prev.transpose(1, 0, 2) if self.batch_first else prev
        if not keep_cache:
            return h, c_all, None
        cache = dict(model=self, layers=caches, x=x, B=B, h_shape=tuple(h.shape),
                     c_shape=tuple(c_all.shape),
                     input_to_hidden=self.params.get("input_to_hidden.weight"))
        return h, c_all, cache

    __call__ = forward

    def backward(self, cache, grad_h, grad_c=None):
        """-> (grad_x like x, grad_c0 (num_layers, B, output_size) like c0, grads {name: array} for
        every trainable parameter).

        ``grad_h`` is dL/dh (None for zero), ``grad_c`` dL/dc (None for zero)."""
        if not isinstance(cache, dict) or cache.get("model") is not self:
            raise TypeError("cache: expected the cache returned by this model's "
                            "forward(..., keep_cache=True)")
        xp = self.xp
        with self.device_guard():
            if grad_h is None:
                grad_h = xp.zeros(cache["h_shape"], dtype=self.dtype)
            grad_h = self._asarray(grad_h, "grad_h", self.dtype)
            if tuple(grad_h.shape) != cache["h_shape"]:
                raise ValueError(f"grad_h: expected shape {cache['h_shape']} like h, got "
                                 f"{tuple(grad_h.shape)}")
            grad_c = self._asarray(grad_c, "grad_c", self.dtype)
            if grad_c is not None:
                if tuple(grad_c.shape) != cache["c_shape"]:
                    raise ValueError(f"grad_c: expected shape {cache['c_shape']} like c, got "
                                     f"{tuple(grad_c.shape)}")
                if self.nn_rnn_compatible_return:
                    grad_c = (grad_c.reshape(self.num_layers, self.num_directions, cache["B"],
                                             self.hidden_size)
                              .transpose(0, 2, 1, 3)
                              .reshape(self.num_layers, cache["B"], self.output_size))
            grad = grad_h.transpose(1, 0, 2) if self.batch_first else grad_h
            grads, grad_c0 = {}, [None] * self.num_layers
            for i in range(self.num_layers - 1, -1, -1):
                grad, grad_c0[i], layer_grads = self.rnn_lst[i]._backward_time_major(
                    cache["layers"][i], xp.ascontiguousarray(grad),
                    None if grad_c is None else xp.ascontiguousarray(grad_c[i]))
                grads.update(layer_grads)
            if self.has_input_to_hidden:
                x = cache["x"]
                n = self.input_size
                grads["input_to_hidden.weight"] = xp.matmul(
                    grad.reshape(-1, self.output_size).T, x.reshape(-1, n))
                grad = xp.matmul(grad, cache["input_to_hidden"])
            grad_c0 = xp.stack(grad_c0)  # like c0: (num_layers, B, output_size)
            grad_x = grad.transpose(1, 0, 2) if self.batch_first else grad
        return grad_x, grad_c0, {name: grads[name] for name in self.trainable_names()}


_CLASSES = {"SRU": SRU, "SRUCell": SRUCell}
