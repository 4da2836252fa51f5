"""WordPiece tokenizer over the closed clinical-text vocabulary (HF ``tokenizers``, no torch).

The vocabulary is the template vocabulary of :mod:`cadnode.text.clinical` (whole words) plus
single characters (``a``, ``##a``...) so that a word outside the template still breaks into
pieces instead of one ``[UNK]``. ``[PAD]`` is id 0 (the model's padding index). Every encoding is
``[CLS] text [SEP]`` padded / truncated to ``max_len``; ``max_len`` lives in tokenizer.json itself
(its padding and truncation settings), so a model package carries it.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
DEFAULT_MAX_LEN = 64
_CHARS = string.ascii_lowercase + string.digits


class ClinicalTokenizer:
    """Text -> fixed-length (input_ids, attention_mask) int64 arrays."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        padding = tokenizer.padding
        if not padding or not padding.get("length"):
            raise ValueError("tokenizer.json has no fixed padding length (not a cadnode tokenizer)")
        if tokenizer.token_to_id(PAD) != 0:
            raise ValueError("tokenizer.json must map [PAD] to id 0")
        self._tok = tokenizer
        self.max_len: int = int(padding["length"])

    @classmethod
    def build_from_vocabulary(cls, words: Iterable[str],
                              max_len: int = DEFAULT_MAX_LEN) -> ClinicalTokenizer:
        """Deterministic tokenizer: specials, then sorted words, then character pieces."""
        if max_len < 3:
            raise ValueError("max_len must leave room for [CLS] and [SEP]")
        vocab: dict[str, int] = {}
        for token in (*SPECIAL_TOKENS, *sorted({w.lower() for w in words}),
                      *_CHARS, *(f"##{c}" for c in _CHARS)):
            vocab.setdefault(token, len(vocab))
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                                    strip_accents=True, handle_chinese_chars=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])])
        tok.enable_truncation(max_length=max_len)
        tok.enable_padding(pad_id=0, pad_token=PAD, length=max_len)
        return cls(tok)

    @classmethod
    def for_template(cls, max_len: int = DEFAULT_MAX_LEN) -> ClinicalTokenizer:
        """The tokenizer of the model's own text encoder: the clinical text's vocabulary."""
        from cadnode.text.clinical import template_vocabulary

        return cls.build_from_vocabulary(template_vocabulary(), max_len)

    @classmethod
    def from_pretrained_file(cls, path: str | Path, max_len: int) -> ClinicalTokenizer:
        """A pretrained tower's ``tokenizer.json``, padded and truncated to ``max_len`` (what
        the package ships, so the node encodes exactly as training did)."""
        tok = Tokenizer.from_file(str(path))
        if tok.token_to_id(PAD) != 0:
            raise ValueError(f"{path}: [PAD] is not id 0")
        tok.enable_truncation(max_length=max_len)
        tok.enable_padding(pad_id=0, pad_token=PAD, length=max_len)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> ClinicalTokenizer:
        """Load the tokenizer.json of a model package."""
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path), pretty=True)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def tokens(self, text: str) -> list[str]:
        """The word pieces of one text (with specials and padding), for debugging and tests."""
        return list(self._tok.encode(text).tokens)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 of shape (max_len,)."""
        enc = self._tok.encode(text)
        return (np.asarray(enc.ids, dtype=np.int64),
                np.asarray(enc.attention_mask, dtype=np.int64))

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 of shape (len(texts), max_len)."""
        encs = self._tok.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encs], dtype=np.int64).reshape(len(encs), self.max_len)
        mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
        return ids, mask.reshape(len(encs), self.max_len)
