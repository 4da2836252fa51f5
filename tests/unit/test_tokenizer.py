"""ClinicalTokenizer: vocabulary, fixed-length int64 encoding, save / load round trip."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from cadnode.dicom.views import ViewInfo
from cadnode.text.clinical import build_clinical_text, template_vocabulary
from cadnode.text.tokenizer import ClinicalTokenizer


@pytest.fixture(scope="module")
def tok() -> ClinicalTokenizer:
    return ClinicalTokenizer.build_from_vocabulary(template_vocabulary(), max_len=64)


def test_specials_and_vocabulary(tok: ClinicalTokenizer) -> None:
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == \
        [0, 1, 2, 3, 4]
    for word in template_vocabulary():
        assert tok.token_to_id(word) is not None, word


def test_encode_shape_dtype_and_no_unk(tok: ClinicalTokenizer) -> None:
    text = build_clinical_text(Dataset(), ViewInfo("L", "MLO", True, "t"))
    ids, mask = tok.encode(text)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == (64,) and mask.shape == (64,)
    n = int(mask.sum())
    assert ids[0] == 2 and ids[n - 1] == 3  # [CLS] ... [SEP]
    assert (ids[n:] == 0).all() and (mask[n:] == 0).all() and (mask[:n] == 1).all()
    assert 1 not in ids  # no [UNK]: every template word is a whole token
    assert tok.tokens(text)[1:4] == ["exam", ":", "age"]


def test_truncation_and_oov_pieces() -> None:
    tok = ClinicalTokenizer.build_from_vocabulary(template_vocabulary(), max_len=8)
    ids, mask = tok.encode("exam " * 50)
    assert ids.shape == (8,) and mask.all() and ids[-1] == 3
    pieces = tok.tokens("zebra")
    assert "[UNK]" not in pieces and pieces[1] == "z"  # falls back to characters


def test_save_load_roundtrip(tok: ClinicalTokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = ClinicalTokenizer.from_file(path)
    assert again.max_len == 64 and again.vocab_size == tok.vocab_size
    text = build_clinical_text(Dataset(), ViewInfo("R", "CC", True, "t"))
    for a, b in zip(tok.encode(text), again.encode(text), strict=True):
        np.testing.assert_array_equal(a, b)
    ids, mask = again.encode_batch([text, "exam"])
    assert ids.shape == (2, 64) and mask[1].sum() == 3


def test_build_is_deterministic(tmp_path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    ClinicalTokenizer.build_from_vocabulary(template_vocabulary()).save(a)
    ClinicalTokenizer.build_from_vocabulary(reversed(template_vocabulary())).save(b)
    assert a.read_bytes() == b.read_bytes()


def test_rejects_tokenizer_without_fixed_length(tmp_path) -> None:
    from tokenizers import Tokenizer, models

    raw = Tokenizer(models.WordPiece(vocab={"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    path = tmp_path / "t.json"
    raw.save(str(path))
    with pytest.raises(ValueError, match="padding length"):
        ClinicalTokenizer.from_file(path)
