"""Tokenizers of imported checkpoints: :class:`Tokenizer` (a ``tokenizers.Tokenizer`` with the special ids
generation needs) and :func:`load_tokenizer`, checked against the model's vocabulary. Re-exported by
:mod:`idesign.models.importers` and :mod:`idesign.models`."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idesign.models._hub import resolve_checkpoint

@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json``) with the ids idesign's generation needs.

    Attributes:
      backend: the ``tokenizers.Tokenizer``.
      eos_id: end-of-sequence id, or None if the checkpoint names none.
      bos_id: beginning-of-sequence id, or None.
      pad_id: id written into left padding (never attended to; defaults to ``eos_id``, else 0).

    >>> import tokenizers, idesign as ids
    >>> backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    >>> backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    >>> tok = ids.models.Tokenizer(backend, eos_id=0)
    >>> tok.encode("a b a"), tok.decode([1, 2])
    ([1, 2, 1], 'a b')
    >>> tokens, valid = tok.batch(["a", "b a"])
    >>> tokens.tolist(), valid.tolist()
    ([[0, 1], [2, 1]], [[False, True], [True, True]])
    """

    backend: Any
    eos_id: int | None = None
    bos_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self):
        if self.pad_id is None:
            object.__setattr__(self, "pad_id", self.eos_id if self.eos_id is not None else 0)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``."""
        return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    def batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [B, T] int32, valid [B, T] bool)``, left-padded with ``pad_id`` (as :func:`idesign.generate` wants)."""
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        width = max(1, max((len(r) for r in rows), default=1))
        tokens = np.full((len(rows), width), self.pad_id, np.int32)
        valid = np.zeros((len(rows), width), bool)
        for i, r in enumerate(rows):
            if r:
                tokens[i, width - len(r):], valid[i, width - len(r):] = r, True
        return tokens, valid


def _special_id(backend: Any, value: Any) -> int | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return backend.token_to_id(value)
    return None


def load_tokenizer(checkpoint: str | os.PathLike, *, vocab_size: int | None = None,
                   revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (its ``tokenizer.json``) or hub id, checked against the model.

    Args:
      checkpoint: a directory with ``tokenizer.json`` (and optionally ``tokenizer_config.json`` and
        ``config.json``, for the special ids), or a hub id.
      vocab_size: the model's vocabulary size; defaults to ``config.json``'s when present. Every id
        the tokenizer can produce must be below it (models may pad their vocabulary, so it may be larger).
      revision: hub revision, for a hub id.

    Returns:
      A :class:`Tokenizer`.

    Raises:
      ValueError: the tokenizer produces ids the model's embedding does not have.

    >>> import tempfile, pathlib, tokenizers, idesign as ids
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(d / "tokenizer.json"))
    >>> ids.models.load_tokenizer(d, vocab_size=8).vocab_size
    2
    """
    import tokenizers

    directory = resolve_checkpoint(checkpoint, revision=revision)
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer.json (the `tokenizers` library's format; "
                                "save one with tokenizer.save_pretrained(dir) from a fast tokenizer).")
    backend = tokenizers.Tokenizer.from_file(str(file))
    hf = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    extra = (json.loads((directory / "tokenizer_config.json").read_text())
             if (directory / "tokenizer_config.json").is_file() else {})
    tokenizer = Tokenizer(backend, eos_id=_special_id(backend, hf.get("eos_token_id", extra.get("eos_token"))),
                          bos_id=_special_id(backend, hf.get("bos_token_id", extra.get("bos_token"))),
                          pad_id=_special_id(backend, extra.get("pad_token")))
    vocab_size = vocab_size if vocab_size is not None else hf.get("vocab_size")
    if vocab_size is not None:
        largest = max(backend.get_vocab(with_added_tokens=True).values(), default=-1)
        if largest >= vocab_size:
            raise ValueError(f"tokenizer {file} does not match the model: it has {tokenizer.vocab_size} tokens with "
                             f"ids up to {largest}, but the model's vocab_size is {vocab_size} (ids >= {vocab_size} "
                             "have no embedding). Load the tokenizer that was saved with this model.")
    return tokenizer
