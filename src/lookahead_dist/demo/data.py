"""Training text that ships with Python: the interpreter's own documentation (``pydoc_data``).

``pydoc_data.topics`` holds the reference-manual topics that ``help()`` prints, ~460 kB of
English prose and code. It is part of the standard library on every CPython install, so the demo
needs no download. Tokens are the UTF-8 bytes (vocabulary 256), so no tokenizer is needed either.

Batches are a pure function of ``(seed, step)``: every rank draws the same *global* batch of
random windows and keeps its own contiguous slice of it. So a run on N ranks sees exactly the data
a single process would see with the global batch, whatever N is, and runs are repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Corpus", "load_corpus"]

#: Fraction of the text (its tail) held out for validation.
VAL_FRACTION = 0.1


def _document_text() -> str:
    from pydoc_data.topics import topics

    # Sorted keys: the order of the dict literal is an implementation detail of the file.
    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class Corpus:
    """Byte tokens split once into a training head and a validation tail."""

    train: torch.Tensor  # int64 [n_train]
    val: torch.Tensor  # int64 [n_val]
    vocab_size: int = 256

    def batch(
        self, step: int, global_batch: int, seq_len: int, rank: int, world_size: int, *, seed: int, split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice ``(inputs, targets)`` of global batch ``step``; each ``[global_batch/world_size, seq_len]``.

        Windows start at offsets drawn from a generator seeded with ``(seed, split, step)``;
        targets are the inputs shifted by one byte.
        """
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        data = self.train if split == "train" else self.val
        salt = 0 if split == "train" else 1
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + salt)
        starts = torch.randint(0, data.numel() - seq_len - 1, (global_batch,), generator=g)
        per_rank = global_batch // world_size
        mine = starts[rank * per_rank : (rank + 1) * per_rank]
        idx = mine[:, None] + torch.arange(seq_len + 1)
        windows = data[idx]
        return windows[:, :-1], windows[:, 1:]


#: Bytes of standard-library source taken for the ``stdlib`` corpus (about the size of the docs).
STDLIB_BYTES = 1_000_000
CORPORA = ("pydoc", "stdlib")


def _stdlib_source() -> str:
    """The top-level ``.py`` modules of this interpreter's standard library, sorted by name, cut at
    :data:`STDLIB_BYTES`: real Python code, a second task next to the prose (same for one Python version)."""
    import sysconfig
    from pathlib import Path

    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= STDLIB_BYTES:
            break
    return "\n\n".join(parts)[:STDLIB_BYTES]


def load_corpus(name: str = "pydoc") -> Corpus:
    """The byte-tokenised text, 90% train / 10% validation (fixed split).

    ``name``: ``pydoc`` (the documentation topics, default) or ``stdlib`` (standard-library source code).
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    text = _document_text() if name == "pydoc" else _stdlib_source()
    raw = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(raw.numel() * (1.0 - VAL_FRACTION))
    return Corpus(train=raw[:cut].clone(), val=raw[cut:].clone())
