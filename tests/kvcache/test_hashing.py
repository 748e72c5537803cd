"""Chained block keys: prefix semantics, incremental extension, and the documented formula."""

import numpy as np

from kvsim.kvcache.base import Sequence
from kvsim.kvcache.hashing import SequenceBlockHasher, block_fingerprints, chain_block_hashes, salt_key
from kvsim.workload.tokens import key_to_u64

MASK = (1 << 64) - 1


def _mix_int(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_keys(tokens: list[int], block_size: int, salt: str | None) -> list[int]:
    """The module docstring's formula, one Python integer at a time."""
    golden = 0x9E3779B97F4A7C15
    position_multipliers = [_mix_int((k * golden + 0x2545F4914F6CDD1D) & MASK) | 1 for k in range(block_size)]
    state = 0 if salt is None else key_to_u64(("cache_salt", salt))
    keys = []
    for j in range(len(tokens) // block_size):
        block = tokens[j * block_size:(j + 1) * block_size]
        fingerprint = _mix_int(sum(_mix_int(t) * p for t, p in zip(block, position_multipliers)) & MASK)
        weight = _mix_int((j * golden + 0x5851F42D4C957F2D) & MASK) | 1
        state = (state + fingerprint * weight) & MASK
        keys.append(_mix_int(state ^ ((j * 0xD6E8FEB86659FD93) & MASK)))
    return keys


def keys_of(tokens, block_size: int = 4, salt: str | None = None) -> list[int]:
    seq = Sequence(0, np.asarray(tokens, dtype=np.int64), len(tokens), cache_salt=salt)
    return SequenceBlockHasher(block_size).block_keys(seq, len(tokens) // block_size).tolist()


def test_vectorised_keys_match_formula():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 2**31, 64).tolist()
    for salt in (None, "tenant-a"):
        assert keys_of(tokens, 8, salt) == reference_keys(tokens, 8, salt)


def test_equal_prefixes_share_keys_until_first_difference():
    base = list(range(40))
    changed = base.copy()
    changed[13] = 999  # inside block 3 of 4-token blocks
    a, b = keys_of(base), keys_of(changed)
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:]))


def test_position_and_order_matter():
    # The same block content after different prefixes, or with tokens swapped, gets another key.
    assert keys_of([1, 2, 3, 4, 5, 6, 7, 8])[1] != keys_of([9, 9, 9, 9, 5, 6, 7, 8])[1]
    assert keys_of([1, 2, 3, 4])[0] != keys_of([2, 1, 3, 4])[0]
    assert keys_of([1, 2, 3, 4, 1, 2, 3, 4])[0] != keys_of([1, 2, 3, 4, 1, 2, 3, 4])[1]


def test_salt_changes_every_key():
    tokens = list(range(16))
    plain, salted = keys_of(tokens), keys_of(tokens, salt="x")
    assert all(p != s for p, s in zip(plain, salted))
    assert salt_key(None) != salt_key("x")


def test_extension_equals_one_pass():
    tokens = np.arange(100, dtype=np.int64)
    hasher = SequenceBlockHasher(4)
    seq = Sequence(0, tokens[:30], 100, output_token_ids=tokens[30:])
    hasher.block_keys(seq, 3)
    hasher.block_keys(seq, 11)
    extended = hasher.block_keys(seq, 25).tolist()
    one_pass, _ = chain_block_hashes(block_fingerprints(tokens, 4), 0, salt_key(None))
    assert extended == one_pass.tolist()


def test_forked_child_continues_parent_chain():
    hasher = SequenceBlockHasher(4)
    parent = Sequence(1, np.arange(10), 20, output_token_ids=np.arange(100, 110))
    child = Sequence(2, np.arange(10), 20, output_token_ids=np.arange(100, 110))
    hasher.copy_keys(parent, child, 2)
    assert hasher.block_keys(child, 5).tolist() == hasher.block_keys(parent, 5).tolist()


def test_no_collisions_among_many_random_blocks():
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 50, 16 * 200_000)  # a small vocabulary, so blocks differ by little
    keys, _ = chain_block_hashes(block_fingerprints(tokens, 16), 0, salt_key(None))
    fingerprints = block_fingerprints(tokens, 16)
    assert np.unique(keys).shape[0] == keys.shape[0]
    assert np.unique(fingerprints).shape[0] == np.unique(tokens.reshape(-1, 16), axis=0).shape[0]
