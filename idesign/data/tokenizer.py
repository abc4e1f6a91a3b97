"""A whitespace word-level tokenizer over a fixed vocabulary.

The synthetic worlds in :mod:`idesign.data` are written in a closed vocabulary of single-word
tokens, so a word-level tokenizer makes every answer exactly one token: a query's gold answer is a
single id and "did the model say it" is one comparison, not a string match.

The first six ids are fixed for every vocabulary, so later work can refer to them as constants:

======  ============  =================================================================
id      token         meaning
======  ============  =================================================================
0       ``<pad>``     padding
1       ``<bos>``     beginning of a document or prompt
2       ``<eos>``     end of a document
3       ``<unk>``     any word outside the vocabulary
4       ``<retract>`` retraction marker ("I take back what I just said")
5       ``unknown``   the abstain answer, spelled as an ordinary word
======  ============  =================================================================

``<retract>`` and ``unknown`` are reserved: the synthetic worlds never use them in training
documents, so a model only produces them once later training teaches it to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
UNK = "<unk>"
RETRACT = "<retract>"
ABSTAIN = "unknown"

SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, RETRACT, ABSTAIN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, RETRACT_ID, ABSTAIN_ID = range(len(SPECIAL_TOKENS))

# Structural tokens carry no content; `decode(skip_special=True)` drops only these, so <unk>,
# <retract> and the abstain word stay visible in decoded text.
_SKIPPABLE_IDS = frozenset({PAD_ID, BOS_ID, EOS_ID})

_FILE_FORMAT = "idesign.data.WordTokenizer"
_FILE_VERSION = 1


class WordTokenizer:
    """Splits text on whitespace and maps each word to an id in a fixed vocabulary.

    Args:
        vocab: every token, in id order. It must start with :data:`SPECIAL_TOKENS`; tokens
            must be unique, non-empty and free of whitespace. :meth:`from_words` prepends the
            special tokens for you.
        strict: if True, :meth:`encode` raises on a word outside the vocabulary instead of
            mapping it to ``<unk>``.

    Example:
        >>> tok = WordTokenizer.from_words(["ada", "was", "born", "in", "lisbon", "."])
        >>> tok.encode("ada was born in lisbon .", add_bos=True)
        [1, 6, 7, 8, 9, 10, 11]
        >>> tok.decode([1, 6, 7, 8, 9, 10, 11, 2])
        'ada was born in lisbon .'
        >>> tok.encode("ada was born in paris")[-1] == tok.unk_id
        True
    """

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID
    retract_id: int = RETRACT_ID
    abstain_id: int = ABSTAIN_ID

    def __init__(self, vocab: Sequence[str], *, strict: bool = False):
        vocab = tuple(vocab)
        _check_vocab(vocab)
        self._vocab = vocab
        self._ids = {token: i for i, token in enumerate(vocab)}
        self.strict = strict

    @classmethod
    def from_words(cls, words: Iterable[str], *, strict: bool = False) -> WordTokenizer:
        """Builds a tokenizer from content words; special tokens are prepended, duplicates dropped.

        Example:
            >>> tok = WordTokenizer.from_words(["b", "a", "b", "unknown"])
            >>> tok.vocab_size, tok.id_to_token(6), tok.id_to_token(7)
            (8, 'b', 'a')
        """
        ordered = dict.fromkeys(SPECIAL_TOKENS)
        ordered.update(dict.fromkeys(words))
        return cls(list(ordered), strict=strict)

    @property
    def vocab(self) -> tuple[str, ...]:
        """All tokens in id order."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WordTokenizer):
            return NotImplemented
        return self._vocab == other._vocab and self.strict == other.strict

    def __hash__(self) -> int:
        return hash((self._vocab, self.strict))

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, strict={self.strict})"

    def token_to_id(self, token: str) -> int:
        """The id of ``token``; ``<unk>``'s id if absent (raises instead when ``strict``).

        Example:
            >>> WordTokenizer.from_words(["cat"]).token_to_id("cat")
            6
        """
        token_id = self._ids.get(token)
        if token_id is not None:
            return token_id
        if self.strict:
            raise KeyError(
                    f"Word {token!r} is not in the vocabulary (vocab_size={self.vocab_size}); "
                    "pass strict=False to map unknown words to <unk>."
            )
        return UNK_ID

    def id_to_token(self, token_id: int) -> str:
        """The token with id ``token_id``.

        Example:
            >>> WordTokenizer.from_words(["cat"]).id_to_token(4)
            '<retract>'
        """
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(
                    f"Token id {token_id} is out of range for a vocabulary of size "
                    f"{self.vocab_size} "
                    f"(valid ids are 0..{self.vocab_size - 1})."
            )
        return self._vocab[token_id]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Splits ``text`` on whitespace and maps each word to its id.

        Special tokens written in the text (``"<bos> q : ..."``) map to their ids like any word.

        Example:
            >>> WordTokenizer.from_words(["hi"]).encode("hi hi", add_eos=True)
            [6, 6, 2]
        """
        ids = [self.token_to_id(word) for word in text.split()]
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def encode_batch(
            self,
            texts: Sequence[str],
            *,
            add_bos: bool = False,
            add_eos: bool = False,
            max_len: int | None = None,
            pad_left: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads a batch to a rectangle.

        Args:
            texts: the strings to encode.
            add_bos: prepend ``<bos>`` to each sequence.
            add_eos: append ``<eos>`` to each sequence.
            max_len: the padded length; defaults to the longest sequence. A longer sequence raises
                rather than being silently truncated.
            pad_left: put the padding before the tokens, as needed to batch prompts for generation.

        Returns:
            ``(ids, mask)``: int32 ids of shape ``[N, L]`` padded with ``<pad>``, and a bool mask
            of the same shape that is True on real tokens.

        Example:
            >>> tok = WordTokenizer.from_words(["a", "b"])
            >>> ids, mask = tok.encode_batch(["a b", "a"], pad_left=True)
            >>> ids.tolist(), mask.tolist()
            ([[6, 7], [0, 6]], [[True, True], [False, True]])
        """
        sequences = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        longest = max((len(s) for s in sequences), default=0)
        length = longest if max_len is None else max_len
        if length < longest:
            index = next(i for i, s in enumerate(sequences) if len(s) > length)
            raise ValueError(
                    f"Text {index} encodes to {len(sequences[index])} tokens, "
                    f"more than max_len={length}."
            )
        ids = np.full((len(sequences), length), PAD_ID, dtype=np.int32)
        mask = np.zeros((len(sequences), length), dtype=bool)
        for row, seq in enumerate(sequences):
            cols = slice(length - len(seq), length) if pad_left else slice(0, len(seq))
            ids[row, cols] = seq
            mask[row, cols] = True
        return ids, mask

    def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special: bool = True) -> str:
        """Joins the tokens of ``ids`` with single spaces.

        Args:
            ids: token ids (a list or a 1-D array).
            skip_special: drop ``<pad>``, ``<bos>`` and ``<eos>``. ``<unk>``, ``<retract>`` and the
                abstain word ``unknown`` are always kept: they carry meaning.

        Example:
            >>> tok = WordTokenizer.from_words(["a"])
            >>> tok.decode([1, 6, 4, 5, 2, 0]), tok.decode([1, 6, 2], skip_special=False)
            ('a <retract> unknown', '<bos> a <eos>')
        """
        tokens = (self.id_to_token(i) for i in np.asarray(ids).reshape(-1).tolist()
                            if not (skip_special and i in _SKIPPABLE_IDS))
        return " ".join(tokens)

    def save(self, path: str | Path) -> None:
        """Writes the vocabulary as JSON.

        Example:
            >>> import tempfile, pathlib
            >>> tok = WordTokenizer.from_words(["a"])
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "tok.json"
            >>> tok.save(path); WordTokenizer.load(path) == tok
            True
        """
        payload = {"format": _FILE_FORMAT, "version": _FILE_VERSION, "strict": self.strict,
                              "vocab": list(self._vocab)}
        Path(path).write_text(json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Reads a tokenizer written by :meth:`save`."""
        payload = json.loads(Path(path).read_text())
        if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
            raise ValueError(
                f"{path} is not a WordTokenizer file (expected format {_FILE_FORMAT!r})."
            )
        if payload.get("version") != _FILE_VERSION:
            raise ValueError(
                    f"{path} has WordTokenizer file version {payload.get('version')!r}; "
                    f"this code reads version {_FILE_VERSION}."
            )
        return cls(payload["vocab"], strict=bool(payload.get("strict", False)))


def _check_vocab(vocab: tuple[str, ...]) -> None:
    if vocab[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise ValueError(
                f"vocab must start with the special tokens {SPECIAL_TOKENS}, got "
                f"{vocab[: len(SPECIAL_TOKENS)]}; use WordTokenizer.from_words to prepend them."
        )
    seen: set[str] = set()
    for i, token in enumerate(vocab):
        if not isinstance(token, str) or not token or token.split() != [token]:
            raise ValueError(
                    f"vocab[{i}] = {token!r} is not a valid token: expected a non-empty string "
                    "without whitespace."
            )
        if token in seen:
            raise ValueError(f"vocab[{i}] = {token!r} is a duplicate; tokens must be unique.")
        seen.add(token)
