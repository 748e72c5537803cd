"""Synthetic workloads: closed-loop users and open-loop arrivals.

Randomness comes from `RandomStreams`, one stream per purpose: `arrivals`, `turns`, and per class
and segment `class`, `prompt/...`, `variant/...`, `output/...`, `think`. Closed-loop users each have
their own streams, so user 3's requests do not depend on how many users there are. The same seed
always gives the same requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from kvsim.errors import UserError
from kvsim.workload.conversation import (
    Conversation,
    SubmitFn,
    TurnPlan,
    TurnSampler,
    iter_conversations_instantly,
    make_request,
    mean_over_classes,
    resolve_classes,
    run_conversation,
)
from kvsim.workload.distributions import fixed
from kvsim.workload.request import Request
from kvsim.workload.spec import (
    MAX_TURNS_PER_CONVERSATION,
    ClosedLoopWorkload,
    GammaArrival,
    OpenLoopWorkload,
    PoissonArrival,
)
from kvsim.workload.streams import RandomStreams
from kvsim.workload.traces import (
    TracePromptBuilder,
    TraceReadStats,
    detect_trace_format,
    read_trace_records,
    resolve_trace_path,
)

# Gaps between arrivals are drawn this many at a time. Only speed depends on it, not the values.
_ARRIVAL_CHUNK = 1024


def _describe_classes(classes: list) -> list[dict[str, Any]]:
    total_weight = sum(request_class.weight for request_class in classes)
    return [
        {
            "name": request_class.name,
            "share": request_class.weight / total_weight,
            "mean_prompt_tokens": request_class.mean_prompt_tokens(),
            "mean_output_tokens": request_class.mean_output_tokens(),
        }
        for request_class in classes
    ]


# ---------------------------------------------------------------------------------------------------
# Closed loop
# ---------------------------------------------------------------------------------------------------


class ClosedLoopSource:
    """N users, each sending a request, waiting for the reply, thinking, and sending the next.

    User i starts at i * ramp_up_s / users. Request ids are user * 1,000,000 + turn. Without
    multi_turn, each request draws its own class; with it, each user keeps one class throughout.
    """

    kind = "closed_loop"

    def __init__(self, spec: ClosedLoopWorkload, streams: RandomStreams) -> None:
        self.spec = spec
        self._streams = streams
        self._classes = resolve_classes(spec.prompt, spec.output_tokens, spec.classes)

    def conversation(self, user: int, time_origin_s: float = 0.0) -> Conversation:
        """Return user `user`'s conversation, starting at its ramp-up offset after `time_origin_s`."""
        spec = self.spec
        sampler = TurnSampler(self._streams, self._classes, spec.think_time_s, indices=(user,))
        conversation_class = sampler.draw_class() if spec.multi_turn else None

        def plan_for_turn(turn: int) -> TurnPlan:
            request_class = conversation_class if conversation_class is not None else sampler.draw_class()
            return sampler.draw_turn(request_class)

        return Conversation(
            index=user,
            name=f"user-{user}",
            start_time_s=time_origin_s + spec.ramp_up_s * user / spec.users,
            num_turns=spec.turns_per_user,
            plan_for_turn=plan_for_turn,
            multi_turn=spec.multi_turn,
            max_context_tokens=spec.max_context_tokens,
        )

    def start(self, env: simpy.Environment, submit: SubmitFn) -> None:
        """Register one SimPy process per user."""
        for user in range(self.spec.users):
            env.process(run_conversation(env, submit, self.conversation(user, env.now)))

    def iter_requests(self) -> Iterator[Request]:
        """Yield every user's requests as if replies were instant (see `iter_conversations_instantly`)."""
        return iter_conversations_instantly(self.conversation(user) for user in range(self.spec.users))

    def _mean_prompt_tokens(self) -> float:
        if self.spec.multi_turn:
            turns = float(self.spec.turns_per_user)
            return mean_over_classes(self._classes, lambda c: c.mean_conversation_prompt_tokens(turns))
        return mean_over_classes(self._classes, lambda c: c.mean_prompt_tokens())

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "kind": self.kind,
            "num_requests": spec.users * spec.turns_per_user,
            "users": spec.users,
            "turns_per_user": spec.turns_per_user,
            "multi_turn": spec.multi_turn,
            "ramp_up_s": spec.ramp_up_s,
            "mean_think_time_s": spec.think_time_s.mean(),
            "mean_prompt_tokens": self._mean_prompt_tokens(),
            "mean_output_tokens": mean_over_classes(self._classes, lambda c: c.mean_output_tokens()),
            "classes": _describe_classes(self._classes),
        }

    def expected_mean_request_tokens(self) -> float:
        """Mean prompt plus reply length per request, from the distributions' means."""
        return self._mean_prompt_tokens() + mean_over_classes(self._classes, lambda c: c.mean_output_tokens())


# ---------------------------------------------------------------------------------------------------
# Open loop
# ---------------------------------------------------------------------------------------------------


class OpenLoopSource:
    """Requests (or session starts) arriving on a Poisson or gamma process.

    Arrival k is at the sum of the first k gaps, so the first request arrives one gap after the
    start. Request ids are the arrival index, or session * 1,000,000 + turn with sessions. With
    sessions, `num_requests` counts turns: the last session is cut short to make the total exact.
    Arrivals stop at `duration_s`, but sessions already started run to their end.
    """

    kind = "open_loop"

    def __init__(self, spec: OpenLoopWorkload, streams: RandomStreams, *, base_dir: Path) -> None:
        self.spec = spec
        self._streams = streams
        self._trace_path: Path | None = None
        self._trace_format = "auto"
        self._trace_summary: dict[str, Any] | None = None
        if spec.lengths_from_trace is not None:
            self._trace_path = resolve_trace_path(spec.lengths_from_trace.path, base_dir)
            self._trace_format = spec.lengths_from_trace.format
            if self._trace_format == "auto":
                self._trace_format = detect_trace_format(self._trace_path)
            self._classes = []
        else:
            self._classes = resolve_classes(spec.prompt, spec.output_tokens, spec.classes)

    # -- arrivals --------------------------------------------------------------------------------

    def _draw_gaps_s(self, rng: np.random.Generator) -> np.ndarray:
        arrival = self.spec.arrival
        if isinstance(arrival, PoissonArrival):
            return rng.exponential(1.0 / arrival.rate_per_s, _ARRIVAL_CHUNK)
        assert isinstance(arrival, GammaArrival)
        # Shape k = 1 / cv^2 and scale = 1 / (rate * k) give mean 1 / rate and coefficient of variation cv.
        shape = 1.0 / arrival.cv**2
        return rng.gamma(shape, 1.0 / (arrival.rate_per_s * shape), _ARRIVAL_CHUNK)

    def _arrival_offsets_s(self) -> Iterator[float]:
        """Arrival times after the start, without end, stopping only at `duration_s`."""
        rng = self._streams.generator("arrivals")
        end_s = self.spec.duration_s if self.spec.duration_s is not None else math.inf
        time_s = 0.0
        while True:
            for gap_s in self._draw_gaps_s(rng):
                time_s += float(gap_s)
                if time_s >= end_s:
                    return
                yield time_s

    # -- single requests -------------------------------------------------------------------------

    def _iter_single_requests(self, time_origin_s: float) -> Iterator[Request]:
        if self._trace_path is not None:
            yield from self._iter_trace_length_requests(time_origin_s)
            return
        sampler = TurnSampler(self._streams, self._classes, fixed(0.0))
        num_requests = self.spec.num_requests
        for request_id, offset_s in enumerate(self._arrival_offsets_s()):
            if num_requests is not None and request_id >= num_requests:
                return
            plan = sampler.draw_turn(sampler.draw_class())
            yield make_request(plan, request_id=request_id, arrival_time_s=time_origin_s + offset_s)

    def _iter_trace_length_requests(self, time_origin_s: float) -> Iterator[Request]:
        """Requests with the trace's lengths (and contents) in row order, on synthetic arrivals.

        Without num_requests and duration_s every row is used once; otherwise the trace starts
        over from its first row as often as needed.
        """
        assert self._trace_path is not None
        num_requests = self.spec.num_requests
        single_pass = num_requests is None and self.spec.duration_s is None
        arrivals = self._arrival_offsets_s()
        request_id = 0
        while True:
            # A fresh builder per pass: a session replayed again starts from its first turn.
            builder = TracePromptBuilder()
            rows_in_pass = 0
            for record in read_trace_records(self._trace_path, self._trace_format):
                offset_s = next(arrivals, None)
                if offset_s is None or (num_requests is not None and request_id >= num_requests):
                    return
                yield builder.build(record, request_id=request_id, arrival_time_s=time_origin_s + offset_s)
                request_id += 1
                rows_in_pass += 1
            if rows_in_pass == 0:
                raise UserError(f"{self._trace_path}: lengths_from_trace found no usable rows")
            if single_pass:
                return

    # -- sessions --------------------------------------------------------------------------------

    def _iter_sessions(self, time_origin_s: float) -> Iterator[Conversation]:
        sessions = self.spec.sessions
        assert sessions is not None
        sampler = TurnSampler(self._streams, self._classes, sessions.think_time_s)
        turns_rng = self._streams.generator("turns")
        remaining = self.spec.num_requests if self.spec.num_requests is not None else math.inf
        for index, offset_s in enumerate(self._arrival_offsets_s()):
            if remaining <= 0:
                return
            num_turns = sessions.turns.sample_one_token_count(turns_rng, min_tokens=1)
            num_turns = int(min(num_turns, remaining, MAX_TURNS_PER_CONVERSATION - 1))
            remaining -= num_turns

            # Draw every turn now, in arrival order, so that a session's contents do not depend on
            # when the engine finishes its earlier turns.
            request_class = sampler.draw_class()
            plans = [sampler.draw_turn(request_class) for _ in range(num_turns)]
            yield Conversation(
                index=index,
                name=f"session-{index}",
                start_time_s=time_origin_s + offset_s,
                num_turns=num_turns,
                plan_for_turn=plans.__getitem__,
                multi_turn=True,
                max_context_tokens=sessions.max_context_tokens,
            )

    # -- the source protocol -----------------------------------------------------------------------

    def start(self, env: simpy.Environment, submit: SubmitFn) -> None:
        """Register the arrival process (which starts one process per session, with sessions)."""
        if self.spec.sessions is not None:
            env.process(self._start_sessions(env, submit))
        else:
            env.process(self._submit_requests(env, submit))

    def _submit_requests(self, env: simpy.Environment, submit: SubmitFn):
        for request in self._iter_single_requests(env.now):
            if request.arrival_time_s > env.now:
                yield env.timeout(request.arrival_time_s - env.now)
            submit(request)

    def _start_sessions(self, env: simpy.Environment, submit: SubmitFn):
        for conversation in self._iter_sessions(env.now):
            if conversation.start_time_s > env.now:
                yield env.timeout(conversation.start_time_s - env.now)
            env.process(run_conversation(env, submit, conversation))

    def iter_requests(self) -> Iterator[Request]:
        """Yield the requests in arrival order, timing session turns as if replies were instant."""
        if self.spec.sessions is not None:
            return iter_conversations_instantly(self._iter_sessions(0.0))
        return self._iter_single_requests(0.0)

    def _summarize_trace(self) -> dict[str, Any]:
        if self._trace_summary is None:
            assert self._trace_path is not None
            stats = TraceReadStats()
            num_rows = prompt_tokens = output_tokens = 0
            for record in read_trace_records(self._trace_path, self._trace_format, stats):
                num_rows += 1
                prompt_tokens += record.prompt_tokens
                output_tokens += record.output_tokens
            if num_rows == 0:
                raise UserError(f"{self._trace_path}: lengths_from_trace found no usable rows")
            self._trace_summary = {
                "path": str(self._trace_path),
                "format": self._trace_format,
                "rows": num_rows,
                "skipped_rows": dict(stats.skipped_rows),
                "mean_prompt_tokens": prompt_tokens / num_rows,
                "mean_output_tokens": output_tokens / num_rows,
            }
        return self._trace_summary

    def _mean_lengths(self) -> tuple[float, float]:
        """Mean prompt and reply tokens per request."""
        if self._trace_path is not None:
            # NOTE: exact for whole passes over the trace. A partial last pass weighs its rows differently.
            summary = self._summarize_trace()
            return summary["mean_prompt_tokens"], summary["mean_output_tokens"]
        mean_output = mean_over_classes(self._classes, lambda c: c.mean_output_tokens())
        if self.spec.sessions is not None:
            mean_turns = self.spec.sessions.turns.mean_tokens(min_tokens=1)
            mean_prompt = mean_over_classes(self._classes, lambda c: c.mean_conversation_prompt_tokens(mean_turns))
            return mean_prompt, mean_output
        return mean_over_classes(self._classes, lambda c: c.mean_prompt_tokens()), mean_output

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        arrival = spec.arrival
        mean_prompt, mean_output = self._mean_lengths()
        num_requests: int | None = spec.num_requests
        if num_requests is None and spec.duration_s is None and self._trace_path is not None:
            num_requests = self._summarize_trace()["rows"]
        description: dict[str, Any] = {
            "kind": self.kind,
            "num_requests": num_requests,
            "duration_s": spec.duration_s,
            "arrival_process": arrival.process,
            "rate_per_s": arrival.rate_per_s,
            "arrival_cv": arrival.cv if isinstance(arrival, GammaArrival) else 1.0,
            "mean_prompt_tokens": mean_prompt,
            "mean_output_tokens": mean_output,
        }
        if spec.sessions is not None:
            description["mean_turns_per_session"] = spec.sessions.turns.mean_tokens(min_tokens=1)
            description["mean_think_time_s"] = spec.sessions.think_time_s.mean()
        if self._trace_path is not None:
            description["lengths_from_trace"] = dict(self._summarize_trace())
        else:
            description["classes"] = _describe_classes(self._classes)
        return description

    def expected_mean_request_tokens(self) -> float:
        """Mean prompt plus reply length per request, from the distributions' means or the trace."""
        mean_prompt, mean_output = self._mean_lengths()
        return mean_prompt + mean_output
