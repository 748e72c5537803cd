"""The `workload:` schema: defaults, and error messages that name the field, the value and the fix."""

import pytest

from kvsim.errors import UserError
from kvsim.workload.distributions import FixedDistribution
from kvsim.workload.spec import ClosedLoopWorkload, GammaArrival, OpenLoopWorkload, TraceWorkload, parse_workload

PROMPT = [{"name": "system", "tokens": 100, "shared": True}, {"name": "user", "tokens": 50}]


def closed_loop(**fields):
    return {"kind": "closed_loop", "users": 2, "turns_per_user": 3, "prompt": PROMPT, "output_tokens": 20, **fields}


def open_loop(**fields):
    return {
        "kind": "open_loop",
        "arrival": {"process": "poisson", "rate_per_s": 2},
        "num_requests": 10,
        "prompt": PROMPT,
        "output_tokens": 20,
        **fields,
    }


def test_closed_loop_defaults():
    spec = parse_workload(closed_loop())
    assert isinstance(spec, ClosedLoopWorkload)
    assert spec.think_time_s == FixedDistribution(value=0)
    assert spec.ramp_up_s == 0
    assert spec.multi_turn is False
    assert spec.prompt[0].shared and not spec.prompt[1].shared
    assert spec.prompt[1].variants == 1


def test_open_loop_gamma_arrival():
    spec = parse_workload(open_loop(arrival={"process": "gamma", "rate_per_s": 4, "cv": 2.5}))
    assert isinstance(spec, OpenLoopWorkload)
    assert spec.arrival == GammaArrival(process="gamma", rate_per_s=4, cv=2.5)


def test_trace_defaults():
    spec = parse_workload({"kind": "trace", "path": "traces/x.jsonl"})
    assert isinstance(spec, TraceWorkload)
    assert spec.format == "auto"
    assert spec.rate_scale == 1.0
    assert spec.start_s == 0.0
    assert spec.duration_s is None
    assert spec.max_requests is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (closed_loop(userz=3), r"workload\.userz: unknown field"),
        (
            closed_loop(prompt=[{"name": "system", "tokens": 10, "shraed": True}]),
            r"workload\.prompt\[0\]\.shraed: unknown field",
        ),
        (closed_loop(users=0), r"workload\.users: Input should be greater than or equal to 1 \(got 0\)"),
        (
            closed_loop(prompt=[{"name": "a", "tokens": {"dist": "normal", "mean": 5, "std": -1}}]),
            r"workload\.prompt\[0\]\.tokens\.std: Input should be greater than 0 \(got -1\)",
        ),
        (
            closed_loop(prompt=[{"name": "examples", "tokens": 500, "variants": 5}]),
            r"workload\.prompt\[0\]: variants is 5 but shared is false",
        ),
        (closed_loop(prompt=[]), r"prompt is empty"),
        (closed_loop(prompt=[{"name": "a", "tokens": 1}, {"name": "a", "tokens": 2}]), r"duplicate segment names \['a'\]"),
        (closed_loop(output_tokens=None), r"missing output_tokens"),
        (closed_loop(max_context_tokens=1000), r"max_context_tokens needs multi_turn: true"),
        (
            closed_loop(prompt=None, classes=[{"name": "chat", "output_tokens": 5}]),
            r"classes\[0\] \('chat'\) has no prompt",
        ),
        (
            closed_loop(classes=[{"name": "chat"}, {"name": "chat"}]),
            r"classes has duplicate names \['chat'\]",
        ),
        (closed_loop(classes=[{"name": "chat", "weight": 0}]), r"classes\[0\]\.weight: Input should be greater than 0"),
        (open_loop(num_requests=None), r"missing num_requests or duration_s"),
        (open_loop(arrival={"process": "gamma", "rate_per_s": 4}), r"workload\.arrival\.cv: missing field"),
        (open_loop(arrival={"process": "poisson", "rate_per_s": 0}), r"workload\.arrival\.rate_per_s"),
        (
            open_loop(lengths_from_trace={"path": "t.csv"}),
            r"lengths_from_trace replaces prompt, output_tokens; remove them",
        ),
        (open_loop(sessions={"think_time_s": 3}), r"workload\.sessions\.turns: missing field"),
        ({"kind": "trace", "path": "t.csv", "format": "parquet"}, r"workload\.format"),
        ({"kind": "trace", "path": "t.csv", "rate_scale": 0}, r"workload\.rate_scale"),
        ({"kind": "batch"}, r"does not match any of the expected tags"),
    ],
)
def test_invalid_workloads_name_the_field(data, message):
    with pytest.raises(UserError, match=message):
        parse_workload(data)


def test_classes_inherit_workload_lengths():
    spec = parse_workload(
        closed_loop(classes=[{"name": "chat", "weight": 3}, {"name": "summary", "prompt": [{"name": "doc", "tokens": 4000}]}])
    )
    assert spec.classes[0].prompt is None
    assert spec.classes[1].prompt[0].name == "doc"


def test_lengths_from_trace_needs_no_count():
    spec = parse_workload(
        {
            "kind": "open_loop",
            "arrival": {"process": "poisson", "rate_per_s": 2},
            "lengths_from_trace": {"path": "traces/azure.csv"},
        }
    )
    assert spec.lengths_from_trace.format == "auto"


def test_dump_and_parse_round_trip():
    spec = parse_workload(
        open_loop(
            arrival={"process": "gamma", "rate_per_s": 2, "cv": 2},
            prompt=[{"name": "message", "tokens": {"dist": "normal", "mean": 50, "std": 10}}],
            output_tokens={"dist": "lognormal", "mu": 3, "sigma": 1},
            sessions={"turns": 3},
        )
    )
    dumped = spec.model_dump(by_alias=True, mode="json")
    assert dumped["prompt"][0]["tokens"]["mean"] == 50
    assert parse_workload(dumped) == spec
