"""A word-level tokenizer built offline from a fixed vocabulary.

Ids ``0..3`` are always the special tokens ``<pad>``, ``<bos>``, ``<eos>``,
``<unk>`` (in that order); the given vocabulary words follow in the given order.
Text is split on whitespace; words not in the vocabulary map to ``<unk>``.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

__all__ = ["WordTokenizer", "SPECIAL_TOKENS", "PAD", "BOS", "EOS", "UNK"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
_FORMAT = "alignshift.WordTokenizer"


class WordTokenizer:
    """Whitespace word tokenizer.

    ``WordTokenizer(vocab)``: ``vocab`` is a list of distinct, non-empty words
    without whitespace. The special tokens may be omitted (they are prepended)
    or given as the first four entries in the canonical order; anywhere else
    they raise ``ValueError``.
    """

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __init__(self, vocab: Iterable[str]):
        words = list(vocab)
        if tuple(words[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS:
            words = words[len(SPECIAL_TOKENS):]
        tokens = list(SPECIAL_TOKENS)
        seen = set(tokens)
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w or w != w.strip() or len(w.split()) != 1:
                raise ValueError(f"vocab entry {i}: {w!r} is not a non-empty word without whitespace")
            if w in seen:
                raise ValueError(f"vocab entry {i}: {w!r} is duplicated or a misplaced special token")
            seen.add(w)
            tokens.append(w)
        self._id_to_token: list[str] = tokens
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab(self) -> list[str]:
        """All tokens, specials included, indexed by id."""
        return list(self._id_to_token)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((self.pad_id, self.bos_id, self.eos_id, self.unk_id))

    def token_to_id(self, token: str) -> int:
        return self._token_to_id.get(token, self.unk_id)

    def id_to_token(self, idx: int) -> str:
        idx = int(idx)
        if not 0 <= idx < self.vocab_size:
            raise ValueError(f"token id {idx} out of range [0, {self.vocab_size})")
        return self._id_to_token[idx]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self._id_to_token == other._id_to_token

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"

    # ------------------------------------------------------------ encode/decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Whitespace-split ``text`` into ids (unknown words -> ``unk_id``)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self._token_to_id.get(w, self.unk_id) for w in text.split()]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Join tokens with single spaces.

        With ``skip_special`` the ``<pad>``, ``<bos>`` and ``<eos>`` tokens are
        dropped (``<unk>`` is kept, since it stands for a real word).
        """
        skip = (self.pad_id, self.bos_id, self.eos_id) if skip_special else ()
        out = []
        for i in ids:
            i = int(i)
            if i in skip:
                continue
            out.append(self.id_to_token(i))
        return " ".join(out)

    # ------------------------------------------------------------- persistence
    def to_json(self) -> dict:
        return {"format": _FORMAT, "version": 1, "vocab": list(self._id_to_token)}

    @classmethod
    def from_json(cls, obj: dict) -> "WordTokenizer":
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or "vocab" not in obj:
            raise ValueError("not a serialized WordTokenizer")
        return cls(obj["vocab"])

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_json(json.load(f))
