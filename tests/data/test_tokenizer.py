"""Tests for idesign.data.tokenizer."""

import doctest
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idesign.data import tokenizer as tokenizer_module
from idesign.data.tokenizer import (
    ABSTAIN,
    ABSTAIN_ID,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    RETRACT,
    RETRACT_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    WordTokenizer,
)

WORDS = ["ada", "was", "born", "in", "lisbon", ".", "q", ":", "?", "1954"]


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer.from_words(WORDS)


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<unk>", "<retract>", "unknown")
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID, RETRACT_ID, ABSTAIN_ID) == (0, 1, 2, 3, 4, 5)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.retract_id, tok.abstain_id) == (
        0, 1, 2, 3, 4, 5)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert tok.id_to_token(RETRACT_ID) == RETRACT and tok.id_to_token(ABSTAIN_ID) == ABSTAIN


def test_from_words_prepends_specials_and_drops_duplicates():
    tok = WordTokenizer.from_words(["b", "a", "b", "unknown", "<pad>"])
    assert tok.vocab == SPECIAL_TOKENS + ("b", "a")
    assert tok.vocab_size == len(tok) == 8
    assert "a" in tok and "c" not in tok


@pytest.mark.parametrize("vocab, message", [
    (["a", "b"], "must start with the special tokens"),
    ([*SPECIAL_TOKENS, "a", "a"], "duplicate"),
    ([*SPECIAL_TOKENS, "a b"], "without whitespace"),
    ([*SPECIAL_TOKENS, ""], "non-empty"),
])
def test_bad_vocab_is_rejected(vocab, message):
    with pytest.raises(ValueError, match=message):
        WordTokenizer(vocab)


def test_encode_maps_words_and_adds_markers(tok):
    ids = tok.encode("ada was born in lisbon .", add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:-1] == [tok.token_to_id(w) for w in "ada was born in lisbon .".split()]
    assert tok.encode("<bos> ada <eos>") == [BOS_ID, tok.token_to_id("ada"), EOS_ID]
    assert tok.encode("  ada \n was\t") == tok.encode("ada was")
    assert tok.encode("") == []


def test_unknown_words_map_to_unk_or_raise_when_strict(tok):
    assert tok.encode("ada paris") == [tok.token_to_id("ada"), UNK_ID]
    strict = WordTokenizer(tok.vocab, strict=True)
    with pytest.raises(KeyError, match="'paris'"):
        strict.encode("ada paris")


def test_decode_skips_only_structural_tokens(tok):
    ids = [PAD_ID, BOS_ID, tok.token_to_id("ada"), RETRACT_ID, ABSTAIN_ID, UNK_ID, EOS_ID, PAD_ID]
    assert tok.decode(ids) == "ada <retract> unknown <unk>"
    assert tok.decode(ids, skip_special=False) == (
        "<pad> <bos> ada <retract> unknown <unk> <eos> <pad>")
    assert tok.decode(np.array(ids, dtype=np.int32)) == tok.decode(ids)


@pytest.mark.parametrize("bad_id", [16, 100, -1])
def test_decode_out_of_range_names_id_and_vocab_size(tok, bad_id):
    with pytest.raises(IndexError, match=rf"{bad_id}.*size {tok.vocab_size}"):
        tok.decode([BOS_ID, bad_id])


def test_encode_batch_pads_right_by_default(tok):
    ids, mask = tok.encode_batch(["ada was", "ada", ""], add_bos=True)
    a, w = tok.token_to_id("ada"), tok.token_to_id("was")
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    assert ids.tolist() == [[BOS_ID, a, w], [BOS_ID, a, PAD_ID], [BOS_ID, PAD_ID, PAD_ID]]
    assert mask.tolist() == [[True, True, True], [True, True, False], [True, False, False]]


def test_encode_batch_pads_left_and_to_max_len(tok):
    ids, mask = tok.encode_batch(["ada was", "ada"], max_len=4, pad_left=True)
    a, w = tok.token_to_id("ada"), tok.token_to_id("was")
    assert ids.tolist() == [[PAD_ID, PAD_ID, a, w], [PAD_ID, PAD_ID, PAD_ID, a]]
    assert mask.tolist() == [[False, False, True, True], [False, False, False, True]]


def test_encode_batch_rejects_sequences_longer_than_max_len(tok):
    with pytest.raises(ValueError, match=r"Text 1 encodes to 3 tokens.*max_len=2"):
        tok.encode_batch(["ada", "ada was born"], max_len=2)


def test_encode_batch_of_nothing_is_empty(tok):
    ids, mask = tok.encode_batch([])
    assert ids.shape == mask.shape == (0, 0)


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded == tok and loaded.vocab == tok.vocab
    assert loaded.encode("ada was born in lisbon") == tok.encode("ada was born in lisbon")
    strict = WordTokenizer(tok.vocab, strict=True)
    strict.save(path)
    assert WordTokenizer.load(path).strict


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"vocab": list(SPECIAL_TOKENS)}))
    with pytest.raises(ValueError, match="not a WordTokenizer file"):
        WordTokenizer.load(path)


_VOCAB = WordTokenizer.from_words(WORDS).vocab


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(_VOCAB), max_size=20))
def test_encode_decode_round_trip(words):
    tok = WordTokenizer(_VOCAB)
    text = " ".join(words)
    ids = tok.encode(text)
    assert len(ids) == len(words)
    assert tok.decode(ids, skip_special=False) == text
    skipped = {"<pad>", "<bos>", "<eos>"}
    assert tok.decode(ids) == " ".join(w for w in words if w not in skipped)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join), max_size=5),
       st.booleans(), st.booleans())
def test_encode_batch_rows_match_encode(texts, pad_left, add_eos):
    tok = WordTokenizer.from_words(WORDS)
    ids, mask = tok.encode_batch(texts, add_bos=True, add_eos=add_eos, pad_left=pad_left)
    for row, text in enumerate(texts):
        expected = tok.encode(text, add_bos=True, add_eos=add_eos)
        assert ids[row][mask[row]].tolist() == expected
        assert (ids[row][~mask[row]] == PAD_ID).all()
        real = np.flatnonzero(mask[row])
        if len(real):  # the real tokens are contiguous, at the padded side's opposite end
            assert real[-1] - real[0] + 1 == len(real)
            assert (real[-1] == ids.shape[1] - 1) if pad_left else (real[0] == 0)


def test_docstring_examples():
    result = doctest.testmod(tokenizer_module)
    assert result.attempted > 0 and result.failed == 0
