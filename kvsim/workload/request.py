"""The request a workload produces and an engine serves."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True, eq=False)
class Request:
    """One inference request: when it arrives, what its prompt is and how long its reply will be.

    Prompts carry token ids so that prefix sharing is exact: equal content has equal ids. Synthetic and
    length-only inputs get deterministic ids from `kvsim.workload.tokens`.
    """

    request_id: int
    arrival_time_s: float
    prompt_token_ids: np.ndarray
    output_tokens: int
    session_id: str | None = None
    parent_request_id: int | None = None
    n: int = 1
    """Sampling fan-out: the number of sequences generated from this prompt."""
    cache_salt: str | None = None
    """Prefix-cache namespace (a cache salt or LoRA adapter): only equal salts share cached blocks."""
    priority: int = 0
    """Lower values are served first under the priority scheduling policy, as in vLLM."""
    request_class: str = "default"
    output_token_ids: np.ndarray | None = field(default=None)
    """The reply's token ids, when known (trace replays of multi-turn sessions); otherwise derived."""

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_token_ids.shape[0])

    @property
    def total_tokens(self) -> int:
        """Prompt plus reply: the length the sequence reaches when it finishes."""
        return self.prompt_tokens + self.output_tokens
