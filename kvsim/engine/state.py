"""Per-request state the engine keeps while a request waits, runs, is preempted and finishes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import simpy

from kvsim.kvcache.base import Sequence
from kvsim.workload.request import Request


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"
    REJECTED = "rejected"


@dataclass(eq=False, slots=True)
class RequestState:
    """A request inside one replica.

    Token accounting follows vLLM: a sequence holds `num_tokens` tokens (prompt plus sampled output);
    `num_computed_tokens` of them have KV in the cache. The last sampled token gets its KV in the next
    decode step, so a finished request has computed prompt + output − 1 tokens.
    """

    request: Request
    seq: Sequence
    done: simpy.Event
    replica_id: int = -1
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    """Output tokens sampled so far."""
    cached_tokens_first: int = -1
    """Prefix-cache hit at the first admission; -1 before it."""
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float = 0.0
    """When the latest output token was sampled, for inter-token latency."""
    finish_s: float | None = None
    num_preemptions: int = 0
    admit_order: int = 0
    swapped_tokens: int = 0
    num_prompt_tokens: int = field(init=False)
    output_tokens: int = field(init=False)
    """Output tokens the request will generate (its reply length)."""

    def __post_init__(self) -> None:
        # Cached as plain ints: the scheduler reads them for every running request at every step.
        self.num_prompt_tokens = self.request.prompt_tokens
        self.output_tokens = self.request.output_tokens

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        """Prompt plus sampled output tokens."""
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def pending_tokens(self) -> int:
        """Tokens without KV yet: the prompt (or, after a recompute preemption, prompt and output) or the
        last sampled token. A sequence samples its next token in the step that brings this to 0."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def remaining_output_tokens(self) -> int:
        return self.output_tokens - self.num_output_tokens
