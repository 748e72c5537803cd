"""Synthetic requests: request classes, per-turn draws, prompt token ids and multi-turn conversations.

A conversation is one closed-loop user or one open-loop session. Its requests are built one turn at
a time, because a multi-turn prompt contains the previous reply, which exists only once the engine
has finished the previous request.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import simpy

from kvsim.workload.distributions import AnyDistribution
from kvsim.workload.request import Request
from kvsim.workload.spec import MAX_TURNS_PER_CONVERSATION, PromptSegment, RequestClass
from kvsim.workload.streams import RandomStreams
from kvsim.workload.tokens import content_token_ids, output_token_ids

SubmitFn = Callable[[Request], simpy.Event]
"""The engine's entry point: accepts a request, returns an event that succeeds with the finished request."""


@dataclass(frozen=True, kw_only=True)
class ResolvedClass:
    """A request class with the workload's defaults filled in."""

    index: int
    name: str
    weight: float
    prompt: tuple[PromptSegment, ...]
    output_tokens: AnyDistribution
    priority: int = 0
    n: int = 1
    cache_salt: str | None = None

    def mean_prompt_tokens(self, *, unique_only: bool = False) -> float:
        """Mean prompt length of a first turn, or of the unique segments only (a follow-up message)."""
        return sum(
            segment.tokens.mean_tokens(min_tokens=0)
            for segment in self.prompt
            if not (unique_only and segment.shared)
        )

    def mean_output_tokens(self) -> float:
        return self.output_tokens.mean_tokens(min_tokens=1)

    def mean_conversation_prompt_tokens(self, mean_turns: float) -> float:
        """Mean prompt length over the turns of a multi-turn conversation.

        Turn k's prompt is the first prompt plus k-1 replies and follow-up messages, so the mean over
        T turns is first + (T - 1) / 2 * (reply + message).

        NOTE: exact for a fixed number of turns. With random turns it uses E[T] in place of
        E[T(T-1)] / E[T], and it ignores restarts at max_context_tokens.
        """
        growth_per_turn = self.mean_output_tokens() + self.mean_prompt_tokens(unique_only=True)
        return self.mean_prompt_tokens() + 0.5 * max(mean_turns - 1.0, 0.0) * growth_per_turn


def resolve_classes(
    prompt: list[PromptSegment] | None,
    output_tokens: AnyDistribution | None,
    classes: list[RequestClass] | None,
) -> list[ResolvedClass]:
    """Return the workload's request classes, or a single class named `default` when it lists none."""
    if not classes:
        assert prompt is not None and output_tokens is not None, "the spec validator requires both"
        return [ResolvedClass(index=0, name="default", weight=1.0, prompt=tuple(prompt), output_tokens=output_tokens)]
    resolved = []
    for index, request_class in enumerate(classes):
        class_prompt = request_class.prompt if request_class.prompt is not None else prompt
        class_output = request_class.output_tokens if request_class.output_tokens is not None else output_tokens
        assert class_prompt is not None and class_output is not None, "the spec validator requires both"
        resolved.append(
            ResolvedClass(
                index=index,
                name=request_class.name,
                weight=request_class.weight,
                prompt=tuple(class_prompt),
                output_tokens=class_output,
                priority=request_class.priority,
                n=request_class.n,
                cache_salt=request_class.cache_salt,
            )
        )
    return resolved


def mean_over_classes(classes: list[ResolvedClass], value: Callable[[ResolvedClass], float]) -> float:
    """Weight-averaged `value` over the class mix."""
    total_weight = sum(request_class.weight for request_class in classes)
    return sum(request_class.weight * value(request_class) for request_class in classes) / total_weight


# ---------------------------------------------------------------------------------------------------
# Per-turn random draws
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """Everything random about one request, drawn before its token ids are built."""

    request_class: ResolvedClass
    segment_tokens: tuple[int, ...]
    """Length of each segment of the class's prompt, in prompt order."""
    segment_variants: tuple[int, ...]
    """Index of the content each shared segment uses (0 for segments with one variant)."""
    output_tokens: int
    think_time_s: float
    """Pause after this turn's reply before the conversation's next request."""


class TurnSampler:
    """Draws turn plans, each random quantity from its own stream.

    Streams are named by purpose, class and segment (`prompt/<class>/<segment>`, `output/<class>`,
    `think`, `class`, ...), and `indices` give a conversation its own set of streams.
    """

    def __init__(
        self,
        streams: RandomStreams,
        classes: list[ResolvedClass],
        think_time_s: AnyDistribution,
        indices: tuple[int, ...] = (),
    ) -> None:
        self._streams = streams
        self._classes = classes
        self._think_time_s = think_time_s
        self._indices = indices
        self._generators: dict[str, np.random.Generator] = {}
        weights = np.array([request_class.weight for request_class in classes], dtype=np.float64)
        self._cumulative_weights = np.cumsum(weights / weights.sum())

    def generator(self, purpose: str) -> np.random.Generator:
        rng = self._generators.get(purpose)
        if rng is None:
            rng = self._streams.generator(purpose, *self._indices)
            self._generators[purpose] = rng
        return rng

    def draw_class(self) -> ResolvedClass:
        # A single class draws nothing, so adding classes later is the only change that shifts this stream.
        if len(self._classes) == 1:
            return self._classes[0]
        position = int(np.searchsorted(self._cumulative_weights, self.generator("class").random(), side="right"))
        return self._classes[min(position, len(self._classes) - 1)]

    def draw_turn(self, request_class: ResolvedClass) -> TurnPlan:
        segment_tokens = []
        segment_variants = []
        for segment in request_class.prompt:
            stream = f"prompt/{request_class.name}/{segment.name}"
            segment_tokens.append(segment.tokens.sample_one_token_count(self.generator(stream), min_tokens=0))
            if segment.variants > 1:
                variant_stream = f"variant/{request_class.name}/{segment.name}"
                segment_variants.append(int(self.generator(variant_stream).integers(segment.variants)))
            else:
                segment_variants.append(0)

        # An engine rejects an empty prompt, so a turn whose segments all drew 0 tokens gets one token.
        if sum(segment_tokens) == 0:
            segment_tokens[0] = 1

        output_tokens = request_class.output_tokens.sample_one_token_count(
            self.generator(f"output/{request_class.name}"), min_tokens=1
        )
        think_time_s = self._think_time_s.sample_one(self.generator("think"))
        return TurnPlan(
            request_class=request_class,
            segment_tokens=tuple(segment_tokens),
            segment_variants=tuple(segment_variants),
            output_tokens=output_tokens,
            think_time_s=think_time_s,
        )


# ---------------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------------


def segment_token_ids(segment: PromptSegment, num_tokens: int, variant: int, request_id: int) -> np.ndarray:
    """Token ids of one segment: keyed by (name, variant) when shared, by the request id otherwise."""
    if segment.shared:
        key: tuple = ("segment", segment.name, variant)
    else:
        key = ("segment", segment.name, "request", request_id)
    return content_token_ids(key, num_tokens)


def build_prompt(plan: TurnPlan, request_id: int, *, unique_only: bool = False) -> np.ndarray:
    """Concatenate the token ids of the plan's segments, or of its unique segments only (a follow-up message)."""
    pieces = [
        segment_token_ids(segment, num_tokens, variant, request_id)
        for segment, num_tokens, variant in zip(plan.request_class.prompt, plan.segment_tokens, plan.segment_variants)
        if not (unique_only and segment.shared)
    ]
    if not pieces:
        return np.empty(0, dtype=np.int64)
    return np.concatenate(pieces)


def make_request(
    plan: TurnPlan,
    *,
    request_id: int,
    arrival_time_s: float,
    prompt_token_ids: np.ndarray | None = None,
    session_id: str | None = None,
    parent_request_id: int | None = None,
) -> Request:
    """Build the request of a plan, with the plan's segments as prompt unless `prompt_token_ids` is given."""
    if prompt_token_ids is None:
        prompt_token_ids = build_prompt(plan, request_id)
    request_class = plan.request_class
    return Request(
        request_id=request_id,
        arrival_time_s=arrival_time_s,
        prompt_token_ids=prompt_token_ids,
        output_tokens=plan.output_tokens,
        session_id=session_id,
        parent_request_id=parent_request_id,
        n=request_class.n,
        cache_salt=request_class.cache_salt,
        priority=request_class.priority,
        request_class=request_class.name,
    )


def reply_token_ids(finished: Request) -> np.ndarray:
    """Token ids of a finished request's reply, as the engine generated them."""
    if finished.output_token_ids is not None:
        return finished.output_token_ids[: finished.output_tokens]
    return output_token_ids(finished.request_id, finished.output_tokens)


# ---------------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------------


class Conversation:
    """One user's or one session's requests, built turn by turn.

    With `multi_turn`, turn k's prompt is turn k-1's prompt, its reply and a new message (the unique
    segments of turn k's draw), so the earlier turns are an exact prefix. Without it, every turn is a
    fresh first prompt.
    """

    def __init__(
        self,
        *,
        index: int,
        name: str,
        start_time_s: float,
        num_turns: int,
        plan_for_turn: Callable[[int], TurnPlan],
        multi_turn: bool,
        max_context_tokens: int | None = None,
    ) -> None:
        assert num_turns < MAX_TURNS_PER_CONVERSATION, f"{num_turns} turns overflow the request id scheme"
        self.index = index
        self.name = name
        self.start_time_s = start_time_s
        self.num_turns = num_turns
        self._plan_for_turn = plan_for_turn
        self._multi_turn = multi_turn
        self._max_context_tokens = max_context_tokens
        self._plan: TurnPlan | None = None
        self._context_ids: np.ndarray | None = None
        self._parent_request_id: int | None = None
        self._restarts = 0

    def request_id(self, turn: int) -> int:
        return self.index * MAX_TURNS_PER_CONVERSATION + turn

    def build_request(self, turn: int, arrival_time_s: float) -> Request:
        """Draw turn `turn` and build its request. Call once per turn, in order."""
        plan = self._plan_for_turn(turn)
        self._plan = plan
        request_id = self.request_id(turn)
        parent_request_id = None

        if self._multi_turn and self._context_ids is not None:
            message_ids = build_prompt(plan, request_id, unique_only=True)
            num_tokens = self._context_ids.shape[0] + message_ids.shape[0]
            if self._max_context_tokens is None or num_tokens <= self._max_context_tokens:
                prompt_ids = np.concatenate([self._context_ids, message_ids])
                parent_request_id = self._parent_request_id
            else:
                # The context window is full: start over with a fresh first prompt, as chat front ends do.
                self._restarts += 1
                prompt_ids = build_prompt(plan, request_id)
        else:
            prompt_ids = build_prompt(plan, request_id)

        session_id = None
        if self._multi_turn:
            session_id = self.name if self._restarts == 0 else f"{self.name}/{self._restarts}"
        return make_request(
            plan,
            request_id=request_id,
            arrival_time_s=arrival_time_s,
            prompt_token_ids=prompt_ids,
            session_id=session_id,
            parent_request_id=parent_request_id,
        )

    def record_reply(self, finished: Request) -> None:
        """Keep the finished request's prompt and reply as the context of the next turn."""
        if self._multi_turn:
            self._context_ids = np.concatenate([finished.prompt_token_ids, reply_token_ids(finished)])
            self._parent_request_id = finished.request_id

    def think_time_s(self) -> float:
        """Think time drawn with the latest turn."""
        assert self._plan is not None, "think_time_s() before the first build_request()"
        return self._plan.think_time_s


def run_conversation(env: simpy.Environment, submit: SubmitFn, conversation: Conversation):
    """SimPy process of one conversation: send a turn, wait for its reply, think, repeat."""
    if conversation.start_time_s > env.now:
        yield env.timeout(conversation.start_time_s - env.now)
    for turn in range(conversation.num_turns):
        request = conversation.build_request(turn, env.now)
        finished = yield submit(request)
        # An engine that succeeds the event without a value still finished this request.
        conversation.record_reply(finished if isinstance(finished, Request) else request)
        if turn + 1 < conversation.num_turns:
            think_time_s = conversation.think_time_s()
            if think_time_s > 0:
                yield env.timeout(think_time_s)


def iter_conversations_instantly(conversations: Iterator[Conversation]) -> Iterator[Request]:
    """Yield the requests of all conversations in arrival order, as if every reply were instant.

    The next turn of a conversation arrives one think time after the previous turn. `conversations`
    must come in order of start time. Only the conversations in progress are held in memory.

    NOTE: with a real engine, later turns arrive later by the time each reply took. Contents and
    lengths match a simulation with the same seed, but arrival times and the order of requests can
    differ.
    """
    heap: list[tuple[float, int, int, Conversation]] = []
    order = itertools.count()
    upcoming = next(conversations, None)
    while heap or upcoming is not None:
        if upcoming is not None and (not heap or upcoming.start_time_s <= heap[0][0]):
            heapq.heappush(heap, (upcoming.start_time_s, next(order), 0, upcoming))
            upcoming = next(conversations, None)
            continue
        arrival_time_s, _, turn, conversation = heapq.heappop(heap)
        request = conversation.build_request(turn, arrival_time_s)
        yield request
        conversation.record_reply(request)
        if turn + 1 < conversation.num_turns:
            next_arrival_s = arrival_time_s + conversation.think_time_s()
            heapq.heappush(heap, (next_arrival_s, next(order), turn + 1, conversation))
