"""The caption vocabulary: DenseCap's tokenisation, special tokens, building, encoding and decoding phrases."""

from __future__ import annotations

import string
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)


def tokenize(phrase: str) -> list[str]:
    """DenseCap's tokenisation: lower case, punctuation removed, split on whitespace."""
    return phrase.lower().translate(str.maketrans("", "", string.punctuation)).split()


def build_vocab(token_lists: Iterable[Sequence[str]], min_count: int) -> list[str]:
    """Vocabulary: the special tokens, then words seen at least ``min_count`` times (most frequent first, ties by
    spelling, so the order is deterministic).

    Args:
        token_lists: tokenised training phrases.
        min_count: minimum occurrences of a word.

    Returns:
        The vocabulary; index = token id (``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3).
    """
    counts = Counter(w for toks in token_lists for w in toks)
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    return [*SPECIAL_TOKENS, *words]


def encode(tokens: Sequence[str], index: dict[str, int], length: int) -> np.ndarray:
    """Token ids of a phrase padded with ``<pad>`` to ``length`` (unknown words -> ``<unk>``)."""
    out = np.full(length, PAD, dtype=np.int32)
    ids = [index.get(w, UNK) for w in tokens[:length]]
    out[: len(ids)] = ids
    return out


def decode(ids: Iterable[int], vocab: Sequence[str]) -> str:
    """A phrase from token ids (stops at ``<end>``, skips ``<pad>`` and ``<start>``)."""
    words = []
    for i in ids:
        i = int(i)
        if i == END:
            break
        if i not in (PAD, START):
            words.append(vocab[i])
    return " ".join(words)
