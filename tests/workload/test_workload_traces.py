"""Trace readers and replay: Mooncake expansion, Azure and BurstGPT parsing, malformed rows, streaming."""

import csv
import gzip
import itertools
import json
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import simpy

from kvsim.errors import UserError
from kvsim.workload import build_workload, open_trace, parse_workload, read_trace_records
from kvsim.workload.tokens import content_token_ids, output_token_ids
from kvsim.workload.traces import TraceReadStats, detect_trace_format

TRACES = Path(__file__).resolve().parents[2] / "scenarios" / "traces"
MOONCAKE = TRACES / "mooncake_synthetic_trace.jsonl"
AZURE = TRACES / "azure_llm_2023_code.csv"


def mooncake_rows(count):
    with open(MOONCAKE) as file:
        return [json.loads(line) for line in itertools.islice(file, count)]


# ---------------------------------------------------------------------------------------------------
# Mooncake
# ---------------------------------------------------------------------------------------------------


def test_mooncake_expands_hash_ids_to_blocks():
    rows = mooncake_rows(5)
    requests = list(itertools.islice(open_trace(MOONCAKE).iter_requests(), 5))
    for row, request in zip(rows, requests):
        assert request.prompt_tokens == row["input_length"]
        assert request.output_tokens == row["output_length"]
        assert request.arrival_time_s == pytest.approx(row["timestamp"] / 1000)
        for block, hash_id in enumerate(row["hash_ids"]):
            expected = content_token_ids(("mooncake", hash_id), 512)
            start = block * 512
            end = min(start + 512, row["input_length"])
            assert np.array_equal(request.prompt_token_ids[start:end], expected[: end - start])


def test_mooncake_first_rows_by_hand():
    requests = list(itertools.islice(open_trace(MOONCAKE).iter_requests(), 4))
    # The first four rows of the file: 40160 tokens at 0 ms, 36640 at 0 ms, 23769 at 40 ms, 32140 at 277 ms.
    assert [r.prompt_tokens for r in requests] == [40160, 36640, 23769, 32140]
    assert [r.arrival_time_s for r in requests] == pytest.approx([0.0, 0.0, 0.040, 0.277])
    assert [r.request_id for r in requests] == [0, 1, 2, 3]


def test_mooncake_shared_hash_ids_share_prefix():
    rows = mooncake_rows(4000)
    pairs = []
    for i, row in enumerate(rows):
        for j in range(i + 1, min(i + 200, len(rows))):
            other = rows[j]["hash_ids"]
            common = 0
            while common < min(len(row["hash_ids"]), len(other)) and row["hash_ids"][common] == other[common]:
                common += 1
            if 0 < common < min(len(row["hash_ids"]), len(other)):
                pairs.append((i, j, common))
        if len(pairs) >= 3:
            break
    assert pairs, "the trace should contain requests with a common prefix"
    needed_ids = {index for i, j, _ in pairs for index in (i, j)}
    requests = {r.request_id: r for r in itertools.islice(open_trace(MOONCAKE).iter_requests(), max(needed_ids) + 1)}
    for i, j, common in pairs:
        first, second = requests[i].prompt_token_ids, requests[j].prompt_token_ids
        assert np.array_equal(first[: common * 512], second[: common * 512])
        assert not np.array_equal(first[common * 512 : (common + 1) * 512], second[common * 512 : (common + 1) * 512])


# ---------------------------------------------------------------------------------------------------
# Azure
# ---------------------------------------------------------------------------------------------------


def test_azure_parse():
    requests = list(itertools.islice(open_trace(AZURE).iter_requests(), 3))
    # 2023-11-16 18:17:03.97996, 18:17:04.03196 and 18:17:04.078149.
    assert [r.arrival_time_s for r in requests] == pytest.approx([0.0, 0.052, 0.098189], abs=1e-6)
    assert [(r.prompt_tokens, r.output_tokens) for r in requests] == [(4808, 10), (3180, 8), (110, 27)]
    shared = set(requests[0].prompt_token_ids.tolist()) & set(requests[1].prompt_token_ids.tolist())
    # Distinct contents: an id may repeat only by chance in a range of 2^31.
    assert len(shared) < 5


def test_azure_full_file():
    with open(AZURE, newline="") as file:
        rows = list(csv.DictReader(file))
    source = open_trace(AZURE)
    summary = source.describe()
    assert summary["format"] == "azure"
    assert summary["num_requests"] == len(rows) == 8819
    assert summary["mean_prompt_tokens"] == pytest.approx(np.mean([int(row["ContextTokens"]) for row in rows]))
    # From 18:17:03.97996 to 19:14:19.928016.
    assert summary["duration_s"] == pytest.approx(3435.948056, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# BurstGPT and generic
# ---------------------------------------------------------------------------------------------------

BURSTGPT_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def test_burstgpt_skips_failed_rows(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text(
        BURSTGPT_HEADER
        + "5,ChatGPT,472,18,490,Conversation log\n"
        + "20,ChatGPT,300,0,300,Conversation log\n"
        + "45,GPT-4,1087,230,1317,API log\n"
    )
    assert detect_trace_format(path) == "burstgpt"
    stats = TraceReadStats()
    records = list(read_trace_records(path, "auto", stats))
    assert [(r.prompt_tokens, r.output_tokens) for r in records] == [(472, 18), (1087, 230)]
    assert stats.rows == 3
    assert stats.skipped_rows == {"zero_output_tokens": 1}
    requests = list(open_trace(path).iter_requests())
    assert [r.arrival_time_s for r in requests] == [0.0, 40.0]
    assert [r.request_id for r in requests] == [0, 2]
    assert open_trace(path).describe()["skipped_rows"] == {"zero_output_tokens": 1}


def test_burstgpt_session_column(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID\n"
        "1,ChatGPT,10,5,15,Conversation log,a\n"
        "2,ChatGPT,30,5,35,Conversation log,a\n"
    )
    first, second = open_trace(path).iter_requests()
    assert first.session_id == second.session_id == "a"
    assert second.parent_request_id == 0


def test_generic_session_turn_extends_previous(tmp_path):
    path = tmp_path / "sessions.csv"
    path.write_text(
        "arrival_s,prompt_tokens,output_tokens,session_id\n"
        "0.0,10,5,s1\n"
        "0.5,8,2,\n"
        "1.0,20,3,s1\n"
        "2.0,12,4,s1\n"
    )
    first, lone, second, third = open_trace(path).iter_requests()
    assert lone.session_id is None
    assert lone.parent_request_id is None
    # Turn 2 has 20 tokens: turn 1's 10, its 5-token reply, and 5 new tokens.
    head = np.concatenate([first.prompt_token_ids, output_token_ids(first.request_id, 5)])
    assert np.array_equal(second.prompt_token_ids[:15], head)
    assert np.array_equal(second.prompt_token_ids[15:], content_token_ids(("trace-prompt", 2), 5))
    assert second.parent_request_id == 0
    # Turn 3 has 12 tokens, fewer than 20 + 3, so it cannot contain turn 2: unique content.
    assert third.prompt_tokens == 12
    assert np.array_equal(third.prompt_token_ids, content_token_ids(("trace-prompt", 3), 12))
    assert third.parent_request_id == 2


def test_generic_jsonl_and_gzip(tmp_path):
    rows = [{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 2}, {"arrival_s": 1.5, "prompt_tokens": 20, "output_tokens": 4}]
    text = "\n".join(json.dumps(row) for row in rows) + "\n\n"
    plain = tmp_path / "g.jsonl"
    plain.write_text(text)
    packed = tmp_path / "g.jsonl.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for path in (plain, packed):
        assert detect_trace_format(path) == "generic"
        requests = list(open_trace(path).iter_requests())
        assert [r.arrival_time_s for r in requests] == [0.0, 1.0]
        assert [r.prompt_tokens for r in requests] == [10, 20]


def test_unknown_format_is_rejected(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_text("x")
    with pytest.raises(UserError, match=r"cannot tell the trace format from the extension '.parquet'"):
        open_trace(path)
    odd = tmp_path / "t.csv"
    odd.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"cannot tell the trace format from the header"):
        open_trace(odd)


# ---------------------------------------------------------------------------------------------------
# Malformed rows: each error names the file, the line, the field and the value
# ---------------------------------------------------------------------------------------------------

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_ROW = "2023-11-16 18:17:03.9799600,4808,10\n"
GENERIC_HEADER = "arrival_s,prompt_tokens,output_tokens\n"


def mooncake_line(**fields):
    row = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
    row.update(fields)
    return json.dumps({key: value for key, value in row.items() if value is not None}) + "\n"


MALFORMED = [
    # (file name, content, format, message pattern)
    ("m.jsonl", mooncake_line() + mooncake_line(input_length=None), "mooncake", r"line 2: missing field 'input_length'"),
    ("m.jsonl", mooncake_line() + mooncake_line(output_length="many"), "mooncake", r"line 2: invalid 'output_length' value 'many'"),
    ("m.jsonl", mooncake_line(timestamp=-5), "mooncake", r"line 1: invalid 'timestamp' value -5: expected a non-negative number"),
    ("m.jsonl", mooncake_line(hash_ids=[1]), "mooncake", r"line 1: 'hash_ids' has 1 entries but input_length 600 needs 2"),
    ("m.jsonl", mooncake_line() + "{not json\n", "mooncake", r"line 2: invalid JSON"),
    ("a.csv", AZURE_HEADER + AZURE_ROW + "2023-11-16 18:17:04.0,4808\n", "azure", r"line 3: missing field 'GeneratedTokens'"),
    ("a.csv", AZURE_HEADER + "yesterday,4808,10\n", "azure", r"line 2: invalid 'TIMESTAMP' value 'yesterday'"),
    ("a.csv", AZURE_HEADER + AZURE_ROW + "2023-11-16 18:17:05.0,-3,10\n", "azure", r"line 3: invalid 'ContextTokens' value '-3'"),
    ("a.csv", AZURE_HEADER + "2023-11-16 18:17:05.0,12.5,10\n", "azure", r"line 2: invalid 'ContextTokens' value '12.5'"),
    ("b.csv", BURSTGPT_HEADER + "5,ChatGPT,,18,18,API log\n", "burstgpt", r"line 2: missing field 'Request tokens'"),
    ("b.csv", BURSTGPT_HEADER + "soon,ChatGPT,4,18,22,API log\n", "burstgpt", r"line 2: invalid 'Timestamp' value 'soon'"),
    ("b.csv", BURSTGPT_HEADER + "5,ChatGPT,4,-18,22,API log\n", "burstgpt", r"line 2: invalid 'Response tokens' value '-18'"),
    ("g.csv", "arrival_s,prompt_tokens\n1,2\n", "generic", r"line 1: missing column\(s\) \['output_tokens'\]"),
    ("g.csv", GENERIC_HEADER + "1,2,3\n2,x,3\n", "generic", r"line 3: invalid 'prompt_tokens' value 'x'"),
    ("g.csv", GENERIC_HEADER + "-1,2,3\n", "generic", r"line 2: invalid 'arrival_s' value '-1'"),
    ("g.jsonl", '{"arrival_s": 1, "prompt_tokens": 2}\n', "generic", r"line 1: missing field 'output_tokens'"),
    ("g.jsonl", '{"arrival_s": 1, "prompt_tokens": true, "output_tokens": 1}\n', "generic", r"line 1: invalid 'prompt_tokens' value True"),
]


@pytest.mark.parametrize(("name", "content", "trace_format", "message"), MALFORMED)
def test_malformed_row_names_file_line_field_value(tmp_path, name, content, trace_format, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as raised:
        list(read_trace_records(path, trace_format))
    assert str(path) in str(raised.value)


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text(GENERIC_HEADER + "1,2,3\n\n2,2,oops\n")
    with pytest.raises(UserError, match=r"line 4: invalid 'output_tokens' value 'oops'"):
        list(read_trace_records(path))


# ---------------------------------------------------------------------------------------------------
# Windows, scaling and order
# ---------------------------------------------------------------------------------------------------


def write_generic(path: Path, arrivals):
    path.write_text(GENERIC_HEADER + "".join(f"{t},{10 + i},{1 + i}\n" for i, t in enumerate(arrivals)))
    return path


def test_rate_scale_and_window(tmp_path):
    path = write_generic(tmp_path / "g.csv", [10, 11, 12, 14, 18, 30])
    # Trace time is measured from the first row (10 s): 0, 1, 2, 4, 8, 20.
    scaled = open_trace(path, rate_scale=2)
    assert [r.arrival_time_s for r in scaled.iter_requests()] == [0.0, 0.5, 1.0, 2.0, 4.0, 10.0]
    window = open_trace(path, start_s=1, duration_s=7)
    assert [(r.request_id, r.arrival_time_s) for r in window.iter_requests()] == [(1, 0.0), (2, 1.0), (3, 3.0)]
    capped = open_trace(path, start_s=1, max_requests=2, rate_scale=0.5)
    assert [(r.request_id, r.arrival_time_s) for r in capped.iter_requests()] == [(1, 0.0), (2, 2.0)]


def test_unsorted_trace_is_rejected(tmp_path):
    path = write_generic(tmp_path / "g.csv", [0, 5, 3])
    with pytest.raises(UserError, match=r"line 4: timestamp 3 s is earlier than 5 s on line 3; sort the trace"):
        list(open_trace(path).iter_requests())


def test_empty_window_is_reported(tmp_path):
    path = write_generic(tmp_path / "g.csv", [0, 1])
    with pytest.raises(UserError, match=r"no requests to replay"):
        open_trace(path, start_s=100).describe()


def test_trace_path_relative_to_scenario_folder(tmp_path):
    write_generic(tmp_path / "g.csv", [0, 1, 2])
    spec = parse_workload({"kind": "trace", "path": "g.csv"})
    source = build_workload(spec, seed=0, base_dir=tmp_path)
    assert source.describe()["num_requests"] == 3
    with pytest.raises(UserError, match=r"trace file not found: .*missing.csv .*relative to the scenario file's folder"):
        build_workload(parse_workload({"kind": "trace", "path": "missing.csv"}), seed=0, base_dir=tmp_path)


def test_trace_replay_submits_at_arrivals(tmp_path):
    path = write_generic(tmp_path / "g.csv", [0, 0.5, 2, 7])
    env = simpy.Environment()
    submitted = []

    def submit(request):
        submitted.append((env.now, request.request_id, request.arrival_time_s))
        return env.event()

    open_trace(path).start(env, submit)
    env.run()
    assert submitted == [(0, 0, 0.0), (0.5, 1, 0.5), (2, 2, 2.0), (7, 3, 7.0)]


# ---------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------

NUM_ROWS = 100_000
PROMPT_TOKENS = 200


@pytest.fixture(scope="module")
def large_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "large.csv"
    with open(path, "w") as file:
        file.write(GENERIC_HEADER)
        file.writelines(f"{i * 0.01:.2f},{PROMPT_TOKENS},8\n" for i in range(NUM_ROWS))
    return path


def test_reader_is_lazy(tmp_path, large_trace):
    # A malformed last row: a reader that parsed the whole file up front would raise on the first request.
    path = tmp_path / "bad_tail.csv"
    path.write_bytes(large_trace.read_bytes() + b"1000000,1,oops\n")
    first = list(itertools.islice(open_trace(path).iter_requests(), 10))
    assert [r.request_id for r in first] == list(range(10))
    with pytest.raises(UserError, match=rf"line {NUM_ROWS + 2}: invalid 'output_tokens' value 'oops'"):
        for _ in read_trace_records(path):
            pass


def test_large_trace_keeps_no_prompt_arrays(large_trace):
    # The reader and the prompt builder keep no reference to a prompt array, so every array is freed
    # once the consumer drops its request, and memory stays bounded by the requests in flight.
    alive = []
    count = 0
    for request in open_trace(large_trace).iter_requests():
        alive.append(weakref.ref(request.prompt_token_ids))
        count += 1
    del request
    assert count == NUM_ROWS
    assert sum(ref() is not None for ref in alive) == 0


def test_large_trace_summary_bounded_memory(large_trace):
    # A describe() pass reads lengths only. A reader that kept every row would need far more than this.
    tracemalloc.start()
    try:
        summary = open_trace(large_trace).describe()
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["num_requests"] == NUM_ROWS
    assert summary["mean_prompt_tokens"] == PROMPT_TOKENS
    assert peak_bytes < 2_000_000, f"peak {peak_bytes} bytes while streaming"
