"""Request traces: readers for Mooncake, Azure LLM, BurstGPT and generic files, and trace replay.

Every reader streams its file: rows are parsed one at a time, and a request's token ids are built
only when the request is taken from the iterator. A trace of any length replays in memory bounded by
the requests in flight, plus a few numbers per multi-turn session.

Formats (arrival times are measured from the first request in the file):

- `mooncake` (JSONL): `timestamp` (ms), `input_length`, `output_length`, `hash_ids`. Each hash id
  names the content of one 512-token block of the prompt; equal ids mean equal content.
  Source: kvcache-ai/Mooncake, FAST'25 traces.
- `azure` (CSV): `TIMESTAMP` (date and time), `ContextTokens`, `GeneratedTokens`. Prompts share
  nothing. Source: Azure/AzurePublicDataset, AzureLLMInferenceTrace 2023.
- `burstgpt` (CSV): `Timestamp` (s), `Model`, `Request tokens`, `Response tokens`, `Total tokens`,
  `Log Type`, optional `Session ID`. Rows with 0 response tokens are failed requests. Source:
  HPMLL/BurstGPT.
- `generic` (CSV or JSONL): `arrival_s`, `prompt_tokens`, `output_tokens`, optional `session_id`.

Rows with 0 output tokens (failed requests) or 0 prompt tokens are skipped and counted, in every
format. Any other malformed row raises UserError naming the file, line, field and value.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import simpy
from pydantic import ValidationError

from kvsim.errors import UserError
from kvsim.workload.request import Request
from kvsim.workload.spec import TRACE_FORMATS, TraceWorkload, format_validation_error
from kvsim.workload.tokens import block_content_token_ids, content_token_ids

logger = logging.getLogger(__name__)

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per hash id in the Mooncake traces."""

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_CSV_SUFFIXES = (".csv",)
_BURSTGPT_SESSION_COLUMNS = ("Session ID", "SessionID")


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One request as a trace file gives it, before token ids are built."""

    row_index: int
    """0-based position among the file's data rows (skipped rows included), used as the request id."""
    line_number: int
    timestamp_s: float
    """Arrival in the file's own clock, in seconds."""
    prompt_tokens: int
    output_tokens: int
    session_id: str | None = None
    hash_ids: tuple[int, ...] | None = None
    """Mooncake block hash ids, one per 512 prompt tokens."""


@dataclass
class TraceReadStats:
    """Row counts that a reader fills in as it goes, complete once its iterator is exhausted."""

    rows: int = 0
    skipped_rows: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped_rows[reason] = self.skipped_rows.get(reason, 0) + 1


# ---------------------------------------------------------------------------------------------------
# Field parsing
# ---------------------------------------------------------------------------------------------------


class _RowError:
    """Builds UserErrors that name the file, line, field and value."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, line_number: int, message: str) -> UserError:
        return UserError(f"{self.path}, line {line_number}: {message}. Fix or delete the row.")

    def missing(self, line_number: int, name: str) -> UserError:
        return self(line_number, f"missing field {name!r}")

    def invalid(self, line_number: int, name: str, value: Any, expected: str) -> UserError:
        return self(line_number, f"invalid {name!r} value {value!r}: expected {expected}")


def _field(row: Mapping[str, Any], name: str, line_number: int, errors: _RowError) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise errors.missing(line_number, name)
    return value


def _non_negative_int(row: Mapping[str, Any], name: str, line_number: int, errors: _RowError) -> int:
    value = _field(row, name, line_number, errors)
    if isinstance(value, bool):
        raise errors.invalid(line_number, name, value, "a non-negative integer")
    if isinstance(value, int):
        number: float = value
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise errors.invalid(line_number, name, value, "a non-negative integer") from None
    # Some exporters write counts as floats ("12.0"). Accept those, but reject fractions.
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise errors.invalid(line_number, name, value, "a non-negative integer")
    return int(number)


def _non_negative_float(row: Mapping[str, Any], name: str, line_number: int, errors: _RowError) -> float:
    value = _field(row, name, line_number, errors)
    if isinstance(value, bool):
        raise errors.invalid(line_number, name, value, "a non-negative number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise errors.invalid(line_number, name, value, "a non-negative number") from None
    if not math.isfinite(number) or number < 0:
        raise errors.invalid(line_number, name, value, "a non-negative number")
    return number


def _datetime_s(row: Mapping[str, Any], name: str, line_number: int, errors: _RowError) -> float:
    """Parse an ISO date and time into seconds since the Unix epoch, taking times without a zone as UTC."""
    value = _field(row, name, line_number, errors)
    try:
        # Python 3.11 reads fractions of any length, keeping microseconds (the Azure trace has 7 digits).
        moment = datetime.fromisoformat(str(value).strip())
    except ValueError:
        raise errors.invalid(line_number, name, value, "a date and time like 2023-11-16 18:17:03.98") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _optional_text(row: Mapping[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# ---------------------------------------------------------------------------------------------------
# Row parsers, one per format: (row mapping, row index, line number) -> record
# ---------------------------------------------------------------------------------------------------

_RowParser = Callable[[Mapping[str, Any], int, int], TraceRecord]


def _mooncake_parser(errors: _RowError) -> _RowParser:
    def parse(row: Mapping[str, Any], row_index: int, line_number: int) -> TraceRecord:
        timestamp_ms = _non_negative_float(row, "timestamp", line_number, errors)
        prompt_tokens = _non_negative_int(row, "input_length", line_number, errors)
        output_tokens = _non_negative_int(row, "output_length", line_number, errors)
        hash_ids = _field(row, "hash_ids", line_number, errors)
        if not isinstance(hash_ids, list) or not all(
            isinstance(hash_id, int) and not isinstance(hash_id, bool) for hash_id in hash_ids
        ):
            raise errors.invalid(line_number, "hash_ids", hash_ids, "a list of integers")
        expected_blocks = -(-prompt_tokens // MOONCAKE_BLOCK_TOKENS)
        if len(hash_ids) != expected_blocks:
            raise errors(
                line_number,
                f"'hash_ids' has {len(hash_ids)} entries but input_length {prompt_tokens} needs "
                f"{expected_blocks} (one per {MOONCAKE_BLOCK_TOKENS}-token block)",
            )
        return TraceRecord(
            row_index=row_index,
            line_number=line_number,
            timestamp_s=timestamp_ms / 1000.0,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            hash_ids=tuple(hash_ids),
        )

    return parse


def _azure_parser(errors: _RowError) -> _RowParser:
    def parse(row: Mapping[str, Any], row_index: int, line_number: int) -> TraceRecord:
        return TraceRecord(
            row_index=row_index,
            line_number=line_number,
            timestamp_s=_datetime_s(row, "TIMESTAMP", line_number, errors),
            prompt_tokens=_non_negative_int(row, "ContextTokens", line_number, errors),
            output_tokens=_non_negative_int(row, "GeneratedTokens", line_number, errors),
        )

    return parse


def _burstgpt_parser(errors: _RowError) -> _RowParser:
    def parse(row: Mapping[str, Any], row_index: int, line_number: int) -> TraceRecord:
        session_id = None
        for column in _BURSTGPT_SESSION_COLUMNS:
            session_id = session_id or _optional_text(row, column)
        return TraceRecord(
            row_index=row_index,
            line_number=line_number,
            timestamp_s=_non_negative_float(row, "Timestamp", line_number, errors),
            prompt_tokens=_non_negative_int(row, "Request tokens", line_number, errors),
            output_tokens=_non_negative_int(row, "Response tokens", line_number, errors),
            session_id=session_id,
        )

    return parse


def _generic_parser(errors: _RowError) -> _RowParser:
    def parse(row: Mapping[str, Any], row_index: int, line_number: int) -> TraceRecord:
        return TraceRecord(
            row_index=row_index,
            line_number=line_number,
            timestamp_s=_non_negative_float(row, "arrival_s", line_number, errors),
            prompt_tokens=_non_negative_int(row, "prompt_tokens", line_number, errors),
            output_tokens=_non_negative_int(row, "output_tokens", line_number, errors),
            session_id=_optional_text(row, "session_id"),
        )

    return parse


_PARSERS: dict[str, Callable[[_RowError], _RowParser]] = {
    "mooncake": _mooncake_parser,
    "azure": _azure_parser,
    "burstgpt": _burstgpt_parser,
    "generic": _generic_parser,
}

_REQUIRED_CSV_COLUMNS = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
    "generic": ("arrival_s", "prompt_tokens", "output_tokens"),
}


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _plain_suffix(path: Path) -> str:
    """Return the file's extension in lower case, ignoring a trailing `.gz`."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _iter_jsonl_rows(path: Path, errors: _RowError) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise errors(line_number, f"invalid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise errors(line_number, f"expected a JSON object, got {type(row).__name__}")
            yield line_number, row


def _iter_csv_rows(path: Path, errors: _RowError, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    with _open_text(path) as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None:
            return
        header = [column.strip() for column in header]
        missing = [column for column in required if column not in header]
        if missing:
            raise UserError(
                f"{path}, line 1: missing column(s) {missing} in the header {header}; "
                "check the format setting or the file"
            )
        for values in reader:
            if not values or all(not value.strip() for value in values):
                continue
            # Short rows leave the last fields missing, which _field reports by name.
            yield reader.line_num, dict(zip(header, values))


def detect_trace_format(path: Path) -> str:
    """Return the format of a trace file from its extension and first row, or raise UserError."""
    suffix = _plain_suffix(path)
    if suffix in _JSONL_SUFFIXES:
        errors = _RowError(path)
        for _, row in _iter_jsonl_rows(path, errors):
            if "hash_ids" in row or "input_length" in row:
                return "mooncake"
            if "arrival_s" in row:
                return "generic"
            raise UserError(
                f"{path}: cannot tell the trace format from the keys {sorted(row)}; expected Mooncake keys "
                "(timestamp, input_length, output_length, hash_ids) or generic keys (arrival_s, prompt_tokens, "
                "output_tokens). Set format explicitly if the file is one of these."
            )
        raise UserError(f"{path}: the trace is empty")
    if suffix in _CSV_SUFFIXES:
        with _open_text(path) as file:
            header = next(csv.reader(file), None)
        if header is None:
            raise UserError(f"{path}: the trace is empty")
        columns = {column.strip() for column in header}
        for trace_format in ("azure", "burstgpt", "generic"):
            if set(_REQUIRED_CSV_COLUMNS[trace_format]) <= columns:
                return trace_format
        raise UserError(
            f"{path}: cannot tell the trace format from the header {header}; expected Azure columns "
            "(TIMESTAMP, ContextTokens, GeneratedTokens), BurstGPT columns (Timestamp, Request tokens, "
            "Response tokens) or generic columns (arrival_s, prompt_tokens, output_tokens)"
        )
    raise UserError(
        f"{path}: cannot tell the trace format from the extension {suffix!r}; use .jsonl or .csv "
        f"(optionally .gz), or set format to one of {', '.join(TRACE_FORMATS)}"
    )


def read_trace_records(
    path: Path, trace_format: str = "auto", stats: TraceReadStats | None = None
) -> Iterator[TraceRecord]:
    """Yield the usable rows of a trace file lazily, in file order.

    Rows with 0 output tokens (failed requests) or 0 prompt tokens are skipped and counted in `stats`.
    Raises UserError for a missing file, an unknown format or a malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trace file not found: {path}")
    if trace_format == "auto":
        trace_format = detect_trace_format(path)
    if trace_format not in _PARSERS:
        raise UserError(f"unknown trace format {trace_format!r}; use auto or one of {', '.join(TRACE_FORMATS)}")
    stats = stats if stats is not None else TraceReadStats()
    errors = _RowError(path)
    parse = _PARSERS[trace_format](errors)

    # Mooncake files are JSONL, Azure and BurstGPT files are CSV, and generic files may be either.
    if trace_format == "mooncake" or (trace_format == "generic" and _plain_suffix(path) in _JSONL_SUFFIXES):
        rows: Iterator[tuple[int, Mapping[str, Any]]] = _iter_jsonl_rows(path, errors)
    else:
        rows = _iter_csv_rows(path, errors, _REQUIRED_CSV_COLUMNS[trace_format])

    for row_index, (line_number, row) in enumerate(rows):
        record = parse(row, row_index, line_number)
        stats.rows += 1
        if record.output_tokens == 0:
            stats.skip("zero_output_tokens")
            continue
        if record.prompt_tokens == 0:
            stats.skip("zero_prompt_tokens")
            continue
        yield record


def resolve_trace_path(path: Path, base_dir: Path) -> Path:
    """Resolve a trace path relative to the scenario file's folder, or raise UserError if it is missing."""
    resolved = path if path.is_absolute() else base_dir / path
    if not resolved.is_file():
        raise UserError(
            f"trace file not found: {resolved} (from path {str(path)!r}, relative to the scenario file's "
            f"folder {base_dir})"
        )
    return resolved


# ---------------------------------------------------------------------------------------------------
# Records to requests
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SessionContext:
    """The last prompt of a trace session and its reply, which the session's next turn may extend."""

    pieces: tuple[tuple[tuple, int], ...]
    """The last prompt as (content key, number of tokens) pieces, so no token array is kept."""
    prompt_tokens: int
    request_id: int
    output_tokens: int


class TracePromptBuilder:
    """Turns trace records into requests with deterministic token ids.

    - Mooncake rows: each hash id expands to the 512 token ids of content ("mooncake", hash id), and
      the last block is cut so the prompt has exactly `input_length` tokens.
    - Rows with a session id: a turn whose prompt is at least as long as the session's previous
      prompt plus its reply is built as that prompt, that reply and a new message. The previous
      turn is then an exact prefix. A shorter turn, or a row without a session, gets unique content.

    NOTE: Azure and BurstGPT record only lengths, so whether a later turn really contains the
    earlier ones is inferred from the lengths alone.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, _SessionContext] = {}

    def build(self, record: TraceRecord, *, request_id: int, arrival_time_s: float) -> Request:
        """Build the request of one record. Call in trace order, because sessions carry state."""
        parent_request_id = None
        if record.hash_ids is not None:
            keys = [("mooncake", hash_id) for hash_id in record.hash_ids]
            prompt_ids = block_content_token_ids(keys, MOONCAKE_BLOCK_TOKENS, record.prompt_tokens)
        elif record.session_id is not None:
            prompt_ids, parent_request_id = self._build_session_turn(record, request_id)
        else:
            prompt_ids = content_token_ids(("trace-prompt", request_id), record.prompt_tokens)
        return Request(
            request_id=request_id,
            arrival_time_s=arrival_time_s,
            prompt_token_ids=prompt_ids,
            output_tokens=record.output_tokens,
            session_id=record.session_id,
            parent_request_id=parent_request_id,
        )

    def _build_session_turn(self, record: TraceRecord, request_id: int) -> tuple[np.ndarray, int | None]:
        assert record.session_id is not None
        previous = self._sessions.get(record.session_id)
        new_message = (("trace-prompt", request_id), record.prompt_tokens)
        if previous is None:
            pieces: tuple[tuple[tuple, int], ...] = (new_message,)
            parent_request_id = None
        else:
            parent_request_id = previous.request_id
            num_new_tokens = record.prompt_tokens - previous.prompt_tokens - previous.output_tokens
            if num_new_tokens >= 0:
                # The reply's key matches `output_token_ids(request_id, n)`, which the engine generates.
                reply = (("output", previous.request_id), previous.output_tokens)
                message = (("trace-prompt", request_id), num_new_tokens)
                pieces = previous.pieces + (reply, message)
            else:
                pieces = (new_message,)
        self._sessions[record.session_id] = _SessionContext(
            pieces=pieces,
            prompt_tokens=record.prompt_tokens,
            request_id=request_id,
            output_tokens=record.output_tokens,
        )
        prompt_ids = np.concatenate([content_token_ids(key, length) for key, length in pieces if length > 0])
        return prompt_ids, parent_request_id


# ---------------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------------


class TraceSource:
    """A trace replay: arrivals and lengths from the file, rescaled and windowed by the spec."""

    kind = "trace"

    def __init__(self, spec: TraceWorkload, *, base_dir: Path) -> None:
        self.spec = spec
        self.path = resolve_trace_path(spec.path, base_dir)
        self.format = detect_trace_format(self.path) if spec.format == "auto" else spec.format
        self._summary: dict[str, Any] | None = None

    def iter_records(self, stats: TraceReadStats | None = None) -> Iterator[tuple[TraceRecord, float]]:
        """Yield (record, arrival offset in s) for the records inside the window, lazily."""
        spec = self.spec
        end_s = spec.start_s + spec.duration_s if spec.duration_s is not None else math.inf
        first_timestamp_s: float | None = None
        previous: TraceRecord | None = None
        count = 0
        for record in read_trace_records(self.path, self.format, stats):
            if first_timestamp_s is None:
                first_timestamp_s = record.timestamp_s
            if previous is not None and record.timestamp_s < previous.timestamp_s:
                raise UserError(
                    f"{self.path}, line {record.line_number}: timestamp {record.timestamp_s:g} s is earlier than "
                    f"{previous.timestamp_s:g} s on line {previous.line_number}; sort the trace by arrival time"
                )
            previous = record
            trace_time_s = record.timestamp_s - first_timestamp_s
            if trace_time_s < spec.start_s:
                continue
            if trace_time_s >= end_s:
                break
            yield record, (trace_time_s - spec.start_s) / spec.rate_scale
            count += 1
            if spec.max_requests is not None and count >= spec.max_requests:
                break

    def iter_requests(self, time_origin_s: float = 0.0) -> Iterator[Request]:
        """Yield the replayed requests in arrival order, building each one's token ids on demand."""
        builder = TracePromptBuilder()
        for record, offset_s in self.iter_records():
            yield builder.build(record, request_id=record.row_index, arrival_time_s=time_origin_s + offset_s)

    def start(self, env: simpy.Environment, submit: Callable[[Request], simpy.Event]) -> None:
        env.process(self._replay(env, submit))

    def _replay(self, env: simpy.Environment, submit: Callable[[Request], simpy.Event]):
        num_submitted = 0
        for request in self.iter_requests(time_origin_s=env.now):
            if request.arrival_time_s > env.now:
                yield env.timeout(request.arrival_time_s - env.now)
            submit(request)
            num_submitted += 1
        logger.debug("trace replay of %s finished after %d requests", self.path, num_submitted)

    def describe(self) -> dict[str, Any]:
        """Counts and mean lengths of the replayed requests, from one pass over the file (cached)."""
        if self._summary is None:
            self._summary = self._summarize()
        return dict(self._summary)

    def _summarize(self) -> dict[str, Any]:
        stats = TraceReadStats()
        num_requests = 0
        prompt_tokens = 0
        output_tokens = 0
        last_offset_s = 0.0
        sessions: set[str] = set()
        for record, offset_s in self.iter_records(stats):
            num_requests += 1
            prompt_tokens += record.prompt_tokens
            output_tokens += record.output_tokens
            last_offset_s = offset_s
            if record.session_id is not None:
                sessions.add(record.session_id)
        if num_requests == 0:
            raise UserError(
                f"{self.path}: no requests to replay (rows read: {stats.rows}, skipped: {stats.skipped_rows}); "
                "check start_s and duration_s"
            )
        if stats.skipped_rows:
            logger.info("trace %s: skipped rows %s", self.path, stats.skipped_rows)
        return {
            "kind": self.kind,
            "path": str(self.path),
            "format": self.format,
            "num_requests": num_requests,
            "skipped_rows": dict(stats.skipped_rows),
            "duration_s": last_offset_s,
            "rate_scale": self.spec.rate_scale,
            "num_sessions": len(sessions),
            "mean_prompt_tokens": prompt_tokens / num_requests,
            "mean_output_tokens": output_tokens / num_requests,
        }

    def expected_mean_request_tokens(self) -> float:
        """Mean prompt plus reply length of the replayed requests."""
        summary = self.describe()
        return summary["mean_prompt_tokens"] + summary["mean_output_tokens"]


def open_trace(path: Path | str, trace_format: str = "auto", *, base_dir: Path | None = None, **window: Any) -> TraceSource:
    """Return a TraceSource for a file, with optional `rate_scale`, `max_requests`, `start_s`, `duration_s`."""
    try:
        spec = TraceWorkload(kind="trace", path=Path(path), format=trace_format, **window)
    except ValidationError as error:
        raise UserError(format_validation_error(error, "trace")) from None
    return TraceSource(spec, base_dir=base_dir if base_dir is not None else Path.cwd())
