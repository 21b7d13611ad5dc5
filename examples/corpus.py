"""Text for the character-level language model, with no download.

The default corpus is the source of a fixed list of pure-Python modules of the standard library
(``STDLIB_MODULES``), read from the running interpreter's own installation in that order and
joined. Every CPython install ships these files, so the corpus is the same on every machine with the
same Python version (it changes a little between versions, as the files do). It is Python code with
plenty of English in docstrings and comments: about 0.7 million characters, 100 distinct (on
Python 3.11).

    text, description = stdlib_corpus()
    vocab = Vocabulary(text)
    ids = vocab.encode(text)                    # torch.int64 tensor of character ids
    train, held_out = split(ids, held_out_fraction=0.1)

The files are read as text, never imported (importing turtle, say, would start Tk).
"""

import importlib.util
import os
import sys
import sysconfig
from typing import List, Tuple

import torch

#: Modules whose source makes the default corpus, in this order. All are pure Python, present in
#: CPython 3.9 and later, and nearly pure ASCII (shlex, with its table of accented letters, is left
#: out: 60 rare characters would inflate the vocabulary by half).
STDLIB_MODULES = (
    "argparse", "difflib", "textwrap", "calendar", "fractions", "heapq", "string", "pprint",
    "random", "statistics", "functools", "dataclasses", "doctest", "cmd", "gettext", "enum",
)

#: Below this many characters the default corpus is too small to be meaningful (for example on a
#: Python whose standard library ships as bytecode only); the caller is asked for --data then.
MIN_CORPUS_CHARS = 100_000


def module_source(name: str) -> str:
    """The source text of a standard library module, read without importing it; '' if absent."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], name.replace(".", os.sep) + ".py")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    # Not a plain file (a zipped standard library, say): ask the module's loader for the source.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "get_source"):
        return ""
    try:
        return spec.loader.get_source(name) or ""
    except (ImportError, OSError):
        return ""


def stdlib_corpus(modules=STDLIB_MODULES) -> Tuple[str, str]:
    """(text, description): the modules' sources joined in order, and a line saying what it is."""
    parts: List[str] = []
    found: List[str] = []
    for name in modules:
        source = module_source(name)
        if source:
            parts.append(source)
            found.append(name)
    text = normalize("\n".join(parts))
    if len(text) < MIN_CORPUS_CHARS:
        raise RuntimeError(
            f"the standard library sources of this Python give only {len(text):,} characters "
            f"(modules found: {', '.join(found) or 'none'}); pass a text file with --data PATH")
    version = ".".join(map(str, sys.version_info[:3]))
    description = (f"source of {len(found)} modules of the Python {version} standard library "
                   f"({', '.join(found)})")
    return text, description


def file_corpus(path: str) -> Tuple[str, str]:
    """(text, description) for a UTF-8 text file (undecodable bytes become U+FFFD)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = normalize(f.read())
    if len(text) < 1000:
        raise RuntimeError(f"{path}: only {len(text)} characters; a language model needs more")
    return text, f"the file {path}"


def normalize(text: str) -> str:
    """Unix line endings, so the corpus does not depend on how the files were checked out."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


class Vocabulary:
    """The distinct characters of a text, sorted, numbered 0..size-1."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split(ids: torch.Tensor, held_out_fraction: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the last ``held_out_fraction`` of the text."""
    n_held_out = max(1, int(len(ids) * held_out_fraction))
    return ids[:-n_held_out], ids[-n_held_out:]
