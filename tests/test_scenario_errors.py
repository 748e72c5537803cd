"""Bad scenario files: one message naming the file, the field and the fix, exit code 2, no traceback."""

import sys
from pathlib import Path

import pytest

from kvsim import cli

VALID = """\
name: tiny
model: Llama-3.1-8B
gpu: H100-SXM
strategies: [paged]
workload:
  kind: closed_loop
  users: 2
  turns_per_user: 1
  prompt: [{name: user, tokens: 32}]
  output_tokens: 8
"""


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["kvsim", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


CASES = [
    # (description, file text or None for a missing file, expected message fragment)
    ("missing file", None, r"scenario\.yaml: scenario file not found; check the path"),
    ("empty file", "", r"scenario\.yaml: the file is empty; a scenario needs at least name, model, gpu and workload"),
    ("not YAML", "name: [unclosed\n", r"scenario\.yaml: not valid YAML at line 2, column 1"),
    ("not a mapping", "- just\n- a list\n", r"scenario\.yaml: a scenario must be a YAML mapping of sections"),
    ("wrong type", VALID.replace("users: 2", "users: many"),
     r"scenario\.yaml: workload\.users: Input should be a valid integer.*\(got 'many'\)"),
    ("unknown key", VALID.replace("name: tiny", "name: tiny\nseeed: 3"),
     r"scenario\.yaml: seeed: unknown key 'seeed'; check its spelling"),
    ("unknown nested key", VALID + "engine:\n  block_sise: 32\n",
     r"scenario\.yaml: engine\.block_sise: unknown key 'block_sise'"),
    ("out of range", VALID + "engine:\n  gpu_memory_utilization: 1.5\n",
     r"scenario\.yaml: engine\.gpu_memory_utilization: Input should be less than or equal to 1 \(got 1\.5\)"),
    ("unknown strategy", VALID.replace("[paged]", "[pagd]"), r"scenario\.yaml: strategies: .*'pagd'"),
    ("model does not fit", VALID.replace("Llama-3.1-8B", "Llama-3.1-405B"),
     r"does not fit H100-SXM at tp=1: .*raise tp"),
    ("missing section", VALID.replace("gpu: H100-SXM\n", ""), r"scenario\.yaml: gpu: required field is missing"),
]


@pytest.mark.parametrize("description, text, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_scenario_message(tmp_path, monkeypatch, capsys, description, text, expected):
    path = tmp_path / "scenario.yaml" if text is None else write(tmp_path, text)
    code, err = run_cli(monkeypatch, capsys, "run", str(path), "--out", str(tmp_path / "out"))
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


def test_yaml_tags_are_not_executed(tmp_path, monkeypatch, capsys):
    text = VALID.replace("name: tiny", "name: !!python/object/apply:os.system ['echo hacked']")
    code, err = run_cli(monkeypatch, capsys, "run", str(write(tmp_path, text)))
    assert code == 2
    assert "not valid YAML" in err


def test_brackets_in_message_survive(tmp_path, monkeypatch, capsys):
    # Error text is printed as plain text, so a value such as H100[bold] is quoted as written.
    code, err = run_cli(monkeypatch, capsys, "run", str(write(tmp_path, VALID.replace("H100-SXM", "H100[bold]"))))
    assert code == 2
    assert "unknown GPU preset 'H100[bold]'" in err
    assert "scenario.yaml: gpu:" in err


def test_out_that_is_a_file(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    code, err = run_cli(monkeypatch, capsys, "run", str(write(tmp_path, VALID)), "--out", str(blocker))
    assert code == 2
    assert "--out:" in err
    assert "exists and is not a folder" in err
