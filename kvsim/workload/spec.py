"""The `workload:` section of a scenario YAML.

Three kinds, selected by `kind`:

- `closed_loop`: N users, each sending a request, waiting for the reply, thinking, and sending the
  next. Load follows the server's speed, as with a chat product's users.
- `open_loop`: requests arrive on a Poisson or gamma process whatever the server does, as in
  `vllm bench serve --request-rate`. Optional multi-turn sessions, or lengths taken from a trace.
- `trace`: arrivals and lengths replayed from a request trace (Mooncake, Azure, BurstGPT, generic).

A prompt is a list of segments. A shared segment has the same content in every request, so prefix
caching can reuse it. A unique segment has new content in every request. Two segments with the same
name and variant have the same content, also across request classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from kvsim.errors import UserError
from kvsim.workload.distributions import DISTRIBUTION_NAMES, Distribution

TRACE_FORMATS = ("mooncake", "azure", "burstgpt", "generic")

TraceFormat = Literal["auto", "mooncake", "azure", "burstgpt", "generic"]

# Request ids of a conversation are `conversation index * MAX_TURNS_PER_CONVERSATION + turn`, so
# the user (or session) and the turn can be read from the id.
MAX_TURNS_PER_CONVERSATION = 1_000_000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------
# Prompts and request classes
# ---------------------------------------------------------------------------------------------------


class PromptSegment(_Spec):
    """One part of a prompt: a system prompt, few-shot examples, a document, the user's message."""

    name: str = Field(min_length=1, description="Segment name. Shared segments with equal names have equal content.")
    tokens: Distribution = Field(description="Length of the segment in tokens: a number or a distribution.")
    shared: bool = Field(
        False,
        description=(
            "True: every request gets the same content (a system prompt, a template), so its KV blocks "
            "can be reused. False: new content for every request (the user's message)."
        ),
    )
    variants: int = Field(
        1,
        ge=1,
        description=(
            "Number of distinct contents of a shared segment (for example K few-shot templates); each "
            "request picks one uniformly at random. Needs shared: true."
        ),
    )

    @model_validator(mode="after")
    def _check_variants(self) -> PromptSegment:
        if self.variants > 1 and not self.shared:
            raise ValueError(
                f"variants is {self.variants} but shared is false; variants only apply to shared segments, "
                "so set shared: true or remove variants"
            )
        return self


def _check_segment_names(prompt: list[PromptSegment] | None, field: str) -> None:
    if prompt is None:
        return
    if not prompt:
        raise ValueError(f"{field} is empty; list at least one segment")
    names = [segment.name for segment in prompt]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{field} has duplicate segment names {duplicates}; give each segment its own name")


class RequestClass(_Spec):
    """One kind of request in a mix, for example chat and summarization, with its own lengths."""

    name: str = Field(min_length=1, description="Class name, reported per request.")
    weight: float = Field(1.0, gt=0, description="Relative share of requests (or conversations) of this class.")
    prompt: list[PromptSegment] | None = Field(
        None, description="Prompt segments of this class; the workload's `prompt` when not set."
    )
    output_tokens: Distribution | None = Field(
        None, description="Reply length in tokens; the workload's `output_tokens` when not set."
    )
    priority: int = Field(0, description="Scheduling priority; lower values are served first, as in vLLM.")
    n: int = Field(1, ge=1, description="Sampling fan-out: sequences generated per prompt.")
    cache_salt: str | None = Field(
        None, description="Prefix-cache namespace; only requests with equal salts share cached blocks."
    )

    @model_validator(mode="after")
    def _check_prompt(self) -> RequestClass:
        _check_segment_names(self.prompt, "prompt")
        return self


class _SyntheticRequests(_Spec):
    """Fields shared by the synthetic kinds: what each request looks like."""

    prompt: list[PromptSegment] | None = Field(
        None, description="Prompt segments, in order. Needed unless every class sets its own."
    )
    output_tokens: Distribution | None = Field(
        None, description="Reply length in tokens. Needed unless every class sets its own."
    )
    classes: list[RequestClass] | None = Field(
        None, description="A mix of request classes, picked by weight; one class when not set."
    )

    def _check_requests(self) -> None:
        _check_segment_names(self.prompt, "prompt")
        if self.classes is not None:
            if not self.classes:
                raise ValueError("classes is empty; list at least one class or remove the field")
            names = [request_class.name for request_class in self.classes]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"classes has duplicate names {duplicates}; give each class its own name")
            for index, request_class in enumerate(self.classes):
                if request_class.prompt is None and self.prompt is None:
                    raise ValueError(
                        f"classes[{index}] ({request_class.name!r}) has no prompt and the workload has none; "
                        "set prompt on the class or on the workload"
                    )
                if request_class.output_tokens is None and self.output_tokens is None:
                    raise ValueError(
                        f"classes[{index}] ({request_class.name!r}) has no output_tokens and the workload has "
                        "none; set output_tokens on the class or on the workload"
                    )
            return
        if self.prompt is None:
            raise ValueError("missing prompt: list the prompt segments, for example [{name: user, tokens: 500}]")
        if self.output_tokens is None:
            raise ValueError("missing output_tokens: give the reply length in tokens (a number or a distribution)")


# ---------------------------------------------------------------------------------------------------
# Closed loop
# ---------------------------------------------------------------------------------------------------


class ClosedLoopWorkload(_SyntheticRequests):
    """N users, each sending its next request only after the previous reply and a think time."""

    kind: Literal["closed_loop"]
    users: int = Field(ge=1, description="Number of concurrent users.")
    turns_per_user: int = Field(
        ge=1, lt=MAX_TURNS_PER_CONVERSATION, description="Requests each user sends before leaving."
    )
    think_time_s: Distribution = Field(0, validate_default=True, description="Seconds between a reply and the same user's next request.")
    ramp_up_s: float = Field(
        0.0, ge=0, description="Users start evenly spread over this many seconds; user i starts at i * ramp_up_s / users."
    )
    multi_turn: bool = Field(
        False,
        description=(
            "True: each user holds a conversation, and the next prompt is the previous prompt, the reply and "
            "a new message (the prompt's unique segments drawn again). Prefix hits then come from real reuse."
        ),
    )
    max_context_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "With multi_turn: when the next prompt would exceed this many tokens, the user starts a new "
            "conversation with a fresh first prompt, as chat front ends do when the context window is full."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> ClosedLoopWorkload:
        self._check_requests()
        if self.max_context_tokens is not None and not self.multi_turn:
            raise ValueError("max_context_tokens needs multi_turn: true; set it or remove max_context_tokens")
        return self


# ---------------------------------------------------------------------------------------------------
# Open loop
# ---------------------------------------------------------------------------------------------------


class PoissonArrival(_Spec):
    """Poisson arrivals: exponential gaps with mean 1 / rate_per_s."""

    process: Literal["poisson"]
    rate_per_s: float = Field(gt=0, description="Mean arrival rate in requests per second.")


class GammaArrival(_Spec):
    """Gamma-distributed gaps: the rate of a Poisson process with tunable burstiness.

    The gaps have mean 1 / rate_per_s and coefficient of variation `cv` (shape 1 / cv^2). cv = 1 is
    Poisson, cv > 1 is burstier, cv < 1 more regular. The `--burstiness` of `vllm bench serve` is
    this shape, so burstiness b corresponds to cv = 1 / sqrt(b).
    """

    process: Literal["gamma"]
    rate_per_s: float = Field(gt=0, description="Mean arrival rate in requests per second.")
    cv: float = Field(gt=0, description="Coefficient of variation of the gaps between arrivals.")


Arrival = Annotated[Union[PoissonArrival, GammaArrival], Field(discriminator="process")]


class SessionSpec(_Spec):
    """Multi-turn sessions in an open loop: arrivals start sessions, and turns follow replies."""

    turns: Distribution = Field(description="Requests per session (at least 1).")
    think_time_s: Distribution = Field(0, validate_default=True, description="Seconds between a reply and the session's next request.")
    max_context_tokens: int | None = Field(
        None,
        ge=1,
        description="When the next prompt would exceed this many tokens, the session starts a new conversation.",
    )


class TraceLengths(_Spec):
    """A trace whose prompt and reply lengths (and contents, where the trace has them) are used in order."""

    path: Path = Field(description="Trace file, relative to the scenario file's folder.")
    format: TraceFormat = Field("auto", description="Trace format; `auto` detects it from the file.")


class OpenLoopWorkload(_SyntheticRequests):
    """Requests arriving on a random process, independently of how fast the server replies."""

    kind: Literal["open_loop"]
    arrival: Arrival = Field(description="Arrival process: {process: poisson, rate_per_s} or {process: gamma, rate_per_s, cv}.")
    num_requests: int | None = Field(None, ge=1, description="Stop after this many requests (turns, with sessions).")
    duration_s: float | None = Field(None, gt=0, description="Stop arrivals after this many seconds.")
    sessions: SessionSpec | None = Field(
        None, description="Multi-turn sessions: each arrival starts a session instead of sending one request."
    )
    lengths_from_trace: TraceLengths | None = Field(
        None,
        description=(
            "Take prompt and reply lengths from a trace, row by row, with synthetic arrivals. Replaces prompt, "
            "output_tokens and classes. Without num_requests and duration_s, every row is used once."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> OpenLoopWorkload:
        if self.lengths_from_trace is not None:
            conflicting = [
                name for name in ("prompt", "output_tokens", "classes", "sessions") if getattr(self, name) is not None
            ]
            if conflicting:
                raise ValueError(
                    f"lengths_from_trace replaces {', '.join(conflicting)}; remove "
                    f"{'it' if len(conflicting) == 1 else 'them'} or remove lengths_from_trace"
                )
            return self
        self._check_requests()
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("missing num_requests or duration_s: an open loop needs at least one of them to end")
        return self


# ---------------------------------------------------------------------------------------------------
# Trace replay
# ---------------------------------------------------------------------------------------------------


class TraceWorkload(_Spec):
    """Arrivals and lengths replayed from a trace file."""

    kind: Literal["trace"]
    path: Path = Field(description="Trace file, relative to the scenario file's folder.")
    format: TraceFormat = Field(
        "auto", description="mooncake | azure | burstgpt | generic; `auto` detects it from the extension and header."
    )
    rate_scale: float = Field(
        1.0, gt=0, description="Multiplies the arrival rate: arrival times are divided by it (2 = twice the load)."
    )
    max_requests: int | None = Field(None, ge=1, description="Replay at most this many requests.")
    start_s: float = Field(
        0.0, ge=0, description="Skip requests that arrive earlier than this, in seconds after the first row (trace time)."
    )
    duration_s: float | None = Field(
        None, gt=0, description="Replay only requests arriving within this many seconds after start_s (trace time)."
    )


WorkloadSpec = Annotated[Union[ClosedLoopWorkload, OpenLoopWorkload, TraceWorkload], Field(discriminator="kind")]
"""The `workload:` section: a closed loop, an open loop or a trace replay, selected by `kind`."""

_WORKLOAD_ADAPTER: TypeAdapter[Any] = TypeAdapter(WorkloadSpec)

# Discriminator values that pydantic inserts into error locations. They are not YAML keys, so messages omit them.
UNION_TAGS = frozenset(DISTRIBUTION_NAMES) | {"closed_loop", "open_loop", "trace", "poisson", "gamma"}


def format_validation_error(error: ValidationError, prefix: str) -> str:
    """Render a pydantic error as lines of `field.path: message (got value)`, the path in YAML terms."""
    lines = []
    for item in error.errors():
        parts: list[str] = [prefix] if prefix else []
        for loc in item["loc"]:
            if isinstance(loc, int):
                parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
            elif loc in UNION_TAGS or "[" in str(loc):
                continue
            else:
                parts.append(str(loc))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "missing field"
        elif item["type"] == "extra_forbidden":
            message = "unknown field; check its spelling against the scenario reference"
        where = ".".join(parts) or "workload"
        value = item.get("input")
        got_text = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
        lines.append(f"{where}: {message}{got_text}")
    return "\n".join(lines)


def parse_workload(data: Any, *, prefix: str = "workload") -> ClosedLoopWorkload | OpenLoopWorkload | TraceWorkload:
    """Validate a `workload:` mapping, raising UserError with one line per invalid field."""
    try:
        return _WORKLOAD_ADAPTER.validate_python(data)
    except ValidationError as error:
        raise UserError(format_validation_error(error, prefix)) from None
