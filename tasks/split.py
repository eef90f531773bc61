"""The catalog's train/eval split (``split.eval_fraction``), by a stable hash of each image's key.

An image is in the eval part when ``blake2b(b"split:" + key, digest_size=8)`` read as a little-endian
integer, divided by 2⁶⁴, is below ``eval_fraction``. The rule depends on the key alone: a key's part never
changes when the catalog grows, is re-sharded or re-ordered, and no list of keys is stored. The "split:"
prefix makes it independent of the trainers' validation hold-out (``tasks.train.row_cache.is_validation``
hashes the bare key), so the validation rows are a fraction of the train part, not of the eval part.

Who reads which part: train-mapper and train-diffusion read only the train part of the catalog's pool
(``codes``), and so does bulk-edit's retrieval memory (``condition: retrieved``); generator samples are
all training. bulk-edit edits only the eval part of the run's catalog (a ``bulk_edit.catalog`` is edited
whole), and evaluate measures the edits bulk-edit planned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

SALT = b"split:"


def split_value(key: str) -> float:
    """The key's position in [0, 1) under the split's hash."""
    digest = hashlib.blake2b(SALT + key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def in_eval(key: str, eval_fraction: float) -> bool:
    """Whether ``key`` is in the eval part (never, for ``eval_fraction`` 0)."""
    return eval_fraction > 0 and split_value(key) < eval_fraction


def train_keys(eval_fraction: float) -> Callable[[str], bool] | None:
    """A key filter for the catalog's training rows (None: no split, keep every key)."""
    return (lambda key: not in_eval(key, eval_fraction)) if eval_fraction > 0 else None


def eval_keys(eval_fraction: float) -> Callable[[str], bool] | None:
    """A key filter for the images bulk-edit edits (None: no split, every image)."""
    return (lambda key: in_eval(key, eval_fraction)) if eval_fraction > 0 else None
