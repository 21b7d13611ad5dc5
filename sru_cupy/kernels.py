"""The CUDA kernel sources and the list of their instantiations.

Every compile path (CuPy/NVRTC on a GPU, pynvrtc to PTX without one, the host C++ compiler) takes
its source text and kernel names from here, so they all build the same thing.

The sources live in the top-level ``cuda/`` folder of the repository and are installed as the
package data folder ``sru_cupy/cuda``. Local ``#include "..."`` lines are expanded into one text,
so a cache keyed on that text is invalidated by a change in any header.
"""

import hashlib
import os
import re

SOURCE_FILE = "sru_recurrence.cu"
HOST_EMULATION_HEADER = "sru_host_emulation.h"

#: Storage dtype name -> C++ storage type in the kernels.
STORAGE_TYPES = {
    "float32": "float",
    "float64": "double",
    "float16": "sru_half",
    "bfloat16": "sru_bfloat16",
}

#: Arithmetic (and parameter) dtype for each storage dtype.
ARITHMETIC_DTYPES = {
    "float32": "float32",
    "float64": "float64",
    "float16": "float32",
    "bfloat16": "float32",
}

#: Values per column per step in U: 3 (u0, u1, u2), or 4 with the learned skip slot u3.
K_VALUES = (3, 4)

KERNELS = ("sru_recurrence_forward", "sru_recurrence_backward")

#: Values of the template parameter WITH_V: whether an instantiation reads V (the per-step offsets
#: of weight_c). Kernels without it have no code for V, which keeps their register count down.
WITH_V_VALUES = (False, True)

#: Columns one thread runs (template parameter N): 1 on the GPU, where neighbouring threads reading
#: neighbouring columns coalesce. The host runs more, as the lanes of SIMD vectors (its backend
#: chooses how many for the CPU's instruction set).
GPU_COLUMNS_PER_THREAD = 1

#: Bits of the kernels' ``flags`` argument (SRU_FLAG_* in the source).
FLAG_SKIP = 1
FLAG_TANH = 2

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.MULTILINE)


def source_dir():
    """The folder holding the .cu sources: package data when installed, else the repository's."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "cuda"), os.path.join(os.path.dirname(here), "cuda")):
        if os.path.isfile(os.path.join(candidate, SOURCE_FILE)):
            return candidate
    raise FileNotFoundError(
        f"sru_cupy: kernel source {SOURCE_FILE!r} not found in {os.path.join(here, 'cuda')!r} "
        "(installed package data) nor in the repository's cuda/ folder; the installation is incomplete"
    )


def _expand(name, directory, seen):
    path = os.path.join(directory, name)
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def replace(match):
        include = match.group(1)
        if include in seen:  # every header is #pragma once
            return f"// {include} already included\n"
        seen.add(include)
        return f"// begin {include}\n{_expand(include, directory, seen)}\n// end {include}\n"

    text = _PRAGMA_ONCE.sub("", text)  # once expanded, the guard is the `seen` set
    return _INCLUDE.sub(replace, text)


def assembled_source(with_host_emulation=False):
    """The kernel source as one text with local includes expanded.

    With ``with_host_emulation`` the host emulation header comes first, for the C++ compiler.
    """
    directory = source_dir()
    seen = set()
    parts = []
    if with_host_emulation:
        seen.add(HOST_EMULATION_HEADER)
        parts.append(_expand(HOST_EMULATION_HEADER, directory, seen))
    parts.append(_expand(SOURCE_FILE, directory, seen))
    return "\n".join(parts)


def source_hash(*extra):
    """A hex digest of the assembled sources (both variants) and any extra strings (flags, tools)."""
    digest = hashlib.sha256()
    digest.update(assembled_source(with_host_emulation=True).encode())
    for item in extra:
        digest.update(b"\0" + str(item).encode())
    return digest.hexdigest()


def kernel_name(kernel, dtype, k, columns=GPU_COLUMNS_PER_THREAD, with_v=False):
    """The name expression of one instantiation, e.g. ``sru_recurrence_forward<float, 3, false, 1>``.

    ``with_v``: the instantiation that reads V, the per-step offsets of weight_c (template
    parameter WITH_V); the launch layer picks it exactly when V is given. The columns per thread
    stay the last template argument (the host backend reads them from there)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if dtype not in STORAGE_TYPES:
        raise TypeError(f"dtype: expected one of {tuple(STORAGE_TYPES)}, got {dtype!r}")
    if k not in K_VALUES:
        raise ValueError(f"k: expected one of {K_VALUES}, got {k!r}")
    if not isinstance(columns, int) or isinstance(columns, bool) or not 1 <= columns <= 64:
        raise ValueError(f"columns: expected an int from 1 to 64, got {columns!r}")
    if not isinstance(with_v, bool):
        raise TypeError(f"with_v: expected a bool, got {with_v!r}")
    return f"{kernel}<{STORAGE_TYPES[dtype]}, {k}, {'true' if with_v else 'false'}, {columns}>"


def all_kernel_names(columns=(GPU_COLUMNS_PER_THREAD,)):
    """Every instantiation the package launches, for each columns-per-thread value in ``columns``:
    both kernels, every storage type and k, without and with V.

    The default is the GPU set (what NVRTC and the PTX builds compile)."""
    return [kernel_name(kernel, dtype, k, n, with_v)
            for n in columns for kernel in KERNELS for dtype in STORAGE_TYPES for k in K_VALUES
            for with_v in WITH_V_VALUES]
