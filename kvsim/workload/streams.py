"""Independent random streams, one per purpose, all derived from one seed.

Each stream is `SeedSequence(seed, spawn_key=(purpose key, *indices))`, so the draws for arrivals,
prompt lengths, reply lengths, think times and classes never share a stream. Changing how many
values one purpose draws (a fixed length made random, say) leaves every other purpose's values as
they were. Indices give per-user streams, so adding users leaves the existing users' requests
unchanged.
"""

from __future__ import annotations

import numpy as np

from kvsim.errors import UserError
from kvsim.workload.tokens import key_to_u64


class RandomStreams:
    """Factory of named random generators derived from one seed."""

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer (got {seed!r})")
        self.seed = int(seed)

    def generator(self, purpose: str, *indices: int) -> np.random.Generator:
        """Return a new generator for `purpose` (and per-user or per-session `indices`).

        The same arguments always give a generator that draws the same values.
        """
        spawn_key = (key_to_u64(("stream", purpose)), *(int(index) for index in indices))
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=spawn_key))
