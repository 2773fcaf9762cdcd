"""Per-text measures that evaluation, serving and monitoring all take: one implementation each.

The `evaluate` modules beside this file (`repetition`) average them over a set of generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def seq_rep(text: str, n: int = 3) -> float:
    """seq-rep-n of one text (Welleck et al. 2019): the share of its word n-grams that repeat an earlier one. 0 for
    text that never repeats itself, near 1 for a loop."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def unknown_share(ids: Sequence[int], unk_id: int | None) -> float:
    """The share of token `ids` that are the unknown token (0 without ids, or for a tokenizer without one)."""
    if unk_id is None or not ids:
        return 0.0
    return sum(t == unk_id for t in ids) / len(ids)


def unknown_shares(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Per text, the share of its tokens (special tokens aside) that the tokenizer does not know."""
    if tokenizer.unk_token_id is None or not texts:
        return np.zeros(len(texts))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([unknown_share(row, tokenizer.unk_token_id) for row in ids])
