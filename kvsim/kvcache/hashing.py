"""Chained block hashes for prefix caching, computed with numpy over a whole sequence at once.

vLLM keys a cached block by a hash of the parent block's hash, the block's token ids and extra keys
such as a cache salt or LoRA adapter. Equal blocks at different positions or after different
prefixes therefore get different keys, and a cache hit is always a prefix. Hashing block by block
in Python is too slow for long traces: 4,000 prompts of 15k tokens are ~4 M blocks of 16. The chain
here is therefore built from sums that numpy computes for all blocks of a sequence in one pass:

    u_k  = mix(token_k)                                 one 64-bit value per token
    f_j  = mix(sum_k u_{j,k} * P_k)                     fingerprint of block j (P_k: odd, per position in the block)
    S_j  = salt_key + sum_{i <= j} f_i * W_i            chain state (W_i: odd, per block index)
    h_j  = mix(S_j xor j * C)                           the key of block j

`mix` is the SplitMix64 finaliser (a bijection on 64-bit words), all arithmetic wraps modulo 2**64,
and S_j plays the role of the parent hash: it depends on the salt and on every block up to j, in
order. A sequence's hashes can be extended from its last chain state. The hasher computes all the
blocks a sequence will fill, reply included, in one pass.

Collision odds: treating the mixed fingerprints as independent uniform 64-bit values, two different
prefixes get the same key with probability about 2**-64. A cache of M blocks queried Q times then
returns a false hit with probability at most about Q * M / 2**64, e.g. 5e-6 for M = Q = 10**7. The
constants are fixed, not keyed, so adversarial inputs could be built to collide. Simulator inputs
are not adversarial.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np

from kvsim.kvcache.base import Sequence
from kvsim.workload.tokens import key_to_u64

# Odd 64-bit constants: the golden-ratio increment of SplitMix64 and arbitrary seeds.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_POSITION_SEED = np.uint64(0x2545F4914F6CDD1D)
_BLOCK_INDEX_SEED = np.uint64(0x5851F42D4C957F2D)
_INDEX_TAG = np.uint64(0xD6E8FEB86659FD93)
_NO_SALT_KEY = np.uint64(0)


def mix64(values: np.ndarray) -> np.ndarray:
    """Apply the SplitMix64 finaliser element-wise to a uint64 array (wrapping arithmetic)."""
    # Integer overflow in numpy array arithmetic wraps silently. Only scalar arithmetic warns, and
    # every operand here is an array.
    z = values.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@functools.lru_cache(maxsize=16)
def _position_multipliers(block_size: int) -> np.ndarray:
    positions = np.arange(block_size, dtype=np.uint64)
    multipliers = mix64(positions * _GOLDEN + _POSITION_SEED) | np.uint64(1)
    multipliers.setflags(write=False)
    return multipliers


def salt_key(cache_salt: str | None) -> np.uint64:
    """Return the initial chain state of a prefix-cache namespace (one shared namespace for no salt)."""
    if cache_salt is None:
        return _NO_SALT_KEY
    return np.uint64(key_to_u64(("cache_salt", cache_salt)))


def block_fingerprints(token_ids: np.ndarray, block_size: int) -> np.ndarray:
    """Fingerprint each full block of `token_ids` (whose length must be a multiple of `block_size`)."""
    num_blocks = token_ids.shape[0] // block_size
    if num_blocks * block_size != token_ids.shape[0]:
        raise ValueError(f"{token_ids.shape[0]} token ids do not make whole blocks of {block_size}")
    tokens = token_ids.astype(np.uint64).reshape(num_blocks, block_size)
    weighted = mix64(tokens) * _position_multipliers(block_size)
    return mix64(weighted.sum(axis=1, dtype=np.uint64))


def chain_block_hashes(fingerprints: np.ndarray, first_block_index: int,
                       prev_chain_state: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """Chain block fingerprints onto `prev_chain_state` and return the blocks' keys and chain states.

    `first_block_index` is the position of the first fingerprint's block in its sequence. The last
    chain state is where the next block's chain continues.
    """
    num_blocks = fingerprints.shape[0]
    indices = np.arange(first_block_index, first_block_index + num_blocks, dtype=np.uint64)
    weights = mix64(indices * _GOLDEN + _BLOCK_INDEX_SEED) | np.uint64(1)
    states = np.cumsum(fingerprints * weights, dtype=np.uint64) + prev_chain_state
    keys = mix64(states ^ (indices * _INDEX_TAG))
    return keys, states


class _ChainCache:
    """Block keys and chain states computed so far for one sequence."""

    __slots__ = ("keys", "states", "num_blocks", "initial_state")

    def __init__(self, capacity_blocks: int, initial_state: np.uint64) -> None:
        self.keys = np.empty(capacity_blocks, dtype=np.uint64)
        self.states = np.empty(capacity_blocks, dtype=np.uint64)
        self.num_blocks = 0
        self.initial_state = initial_state

    def state_after(self, num_blocks: int) -> np.uint64:
        """Return the chain state after the first `num_blocks` blocks (the salt key when there are none)."""
        return self.initial_state if num_blocks == 0 else self.states[num_blocks - 1]

    def reserve(self, num_blocks: int) -> None:
        if num_blocks <= self.keys.shape[0]:
            return
        capacity = max(num_blocks, 2 * self.keys.shape[0])
        for name in ("keys", "states"):
            grown = np.empty(capacity, dtype=np.uint64)
            grown[:self.num_blocks] = getattr(self, name)[:self.num_blocks]
            setattr(self, name, grown)


class SequenceBlockHasher:
    """Per-sequence cache of block keys for one block size, extended as a sequence grows.

    Keys are cached per `Sequence` object and dropped with it, so a waiting sequence that is looked
    up every step is hashed once. A forked child can start from a copy of its parent's keys.
    """

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._caches: weakref.WeakKeyDictionary[Sequence, _ChainCache] = weakref.WeakKeyDictionary()

    def block_keys(self, seq: Sequence, num_blocks: int) -> np.ndarray:
        """Return the keys of `seq`'s first `num_blocks` full blocks, hashing the ones not cached yet."""
        cache = self._caches.get(seq)
        if cache is None:
            cache = _ChainCache(max(num_blocks, 16), salt_key(seq.cache_salt))
            self._caches[seq] = cache
        if num_blocks > cache.num_blocks:
            self._extend(seq, cache, num_blocks)
        return cache.keys[:num_blocks]

    def copy_keys(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Give `child` the first `num_blocks` keys of `parent`, whose blocks it shares after a fork.

        Later blocks of the child chain onto the parent's state and hash the child's own tokens.
        """
        self.block_keys(parent, num_blocks)
        parent_cache = self._caches[parent]
        cache = _ChainCache(max(num_blocks, 16), parent_cache.initial_state)
        cache.keys[:num_blocks] = parent_cache.keys[:num_blocks]
        cache.states[:num_blocks] = parent_cache.states[:num_blocks]
        cache.num_blocks = num_blocks
        self._caches[child] = cache

    def forget(self, seq: Sequence) -> None:
        """Drop `seq`'s cached keys (a later call recomputes them)."""
        self._caches.pop(seq, None)

    def _extend(self, seq: Sequence, cache: _ChainCache, num_blocks: int) -> None:
        # Hash every full block the sequence will ever have in one numpy pass: its token ids are known
        # in advance, and block-by-block extension during decode costs a numpy call per block.
        num_blocks = max(num_blocks, seq.final_num_tokens // self.block_size)
        start_tokens = cache.num_blocks * self.block_size
        tokens = seq.token_ids(num_blocks * self.block_size)
        if tokens.shape[0] < num_blocks * self.block_size:
            raise ValueError(f"sequence {seq.seq_id} has {tokens.shape[0]} tokens, "
                             f"fewer than {num_blocks} blocks of {self.block_size}")
        fingerprints = block_fingerprints(tokens[start_tokens:], self.block_size)
        keys, states = chain_block_hashes(fingerprints, cache.num_blocks, cache.state_after(cache.num_blocks))
        cache.reserve(num_blocks)
        cache.keys[cache.num_blocks:num_blocks] = keys
        cache.states[cache.num_blocks:num_blocks] = states
        cache.num_blocks = num_blocks
