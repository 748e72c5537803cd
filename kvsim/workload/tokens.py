"""Deterministic token ids for synthetic and length-only content.

Equal content must get equal ids, and different content different ids, so that prefix caching in the
simulator hits exactly where a real engine would. Ids are a 64-bit mix (SplitMix64 finaliser) of a
content key and the position within that content, folded into a 31-bit vocabulary-like range.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def key_to_u64(key: str | int | tuple) -> int:
    """Stable 64-bit key for any content identity (independent of Python's hash seed)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(values: np.ndarray) -> np.ndarray:
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def content_token_ids(key: str | int | tuple, length: int, start: int = 0) -> np.ndarray:
    """Token ids of positions [start, start + length) of the content identified by `key`."""
    base = np.uint64(key_to_u64(key))
    positions = np.arange(start, start + length, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix(positions * np.uint64(0x9E3779B97F4A7C15) + base)
    return (mixed >> np.uint64(33)).astype(np.int64)


def output_token_ids(request_id: int, length: int, start: int = 0) -> np.ndarray:
    """Token ids a request generates, derived from its id so a later turn can reuse them."""
    return content_token_ids(("output", request_id), length, start)


def block_content_token_ids(keys: list, block_tokens: int, num_tokens: int) -> np.ndarray:
    """Token ids of content made of consecutive blocks, block i being the content of `keys[i]`.

    Equal to concatenating `content_token_ids(key, block_tokens)` over `keys` and keeping the first
    `num_tokens` ids, but computed in one vectorized pass (a Mooncake prompt has ~80 blocks).
    """
    if num_tokens > len(keys) * block_tokens:
        raise ValueError(f"{len(keys)} blocks of {block_tokens} tokens cannot hold {num_tokens} tokens")
    bases = np.fromiter((key_to_u64(key) for key in keys), dtype=np.uint64, count=len(keys))
    positions = np.arange(block_tokens, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix(positions[None, :] * np.uint64(0x9E3779B97F4A7C15) + bases[:, None])
    return (mixed.reshape(-1)[:num_tokens] >> np.uint64(33)).astype(np.int64)
