"""Profile JSON: round trip, and UserErrors that name the file and the invalid field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from profile_factory import make_profile

from kvsim.engine.calibrated import CalibratedLatencyModel
from kvsim.engine.latency import BatchShape
from kvsim.errors import UserError
from kvsim.models import load_preset
from kvsim.profile import OpCoefficients, Point, load_profile, write_profile


def test_round_trip(tmp_path):
    profile = make_profile().model_copy(update={"points": [
        Point(op="gemm:qkv", path="gemm_linear", params={"tokens": 4, "name": "qkv"}, num_seqs=0,
              bytes_moved=1e6, flops=2e6, time_s=1e-4, iqr_s=1e-6, num_reps=5, bandwidth_fraction=0.1,
              flops_fraction=0.02, fitted_time_s=1.1e-4, held_out=True),
    ]})
    path = write_profile(profile, tmp_path / "profile.json")
    assert load_profile(path) == profile


def test_write_leaves_no_temporary_file(tmp_path):
    write_profile(make_profile(), tmp_path / "profile.json")
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def test_coefficient_time_formula():
    fit = OpCoefficients(fixed_s=1.0, per_seq_s=2.0, per_byte_s=3.0, per_flop_s=4.0)
    assert fit.time_s(num_seqs=10, bytes_moved=100, flops=1000) == 1 + 20 + 300 + 4000


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="profile not found; create one with `kvsim calibrate"):
        load_profile(tmp_path / "absent.json")


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"device": ')
    with pytest.raises(UserError, match=r"broken.json: invalid JSON at line 1"):
        load_profile(path)


def test_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="must be a JSON object, got list"):
        load_profile(path)


def _written(tmp_path, edit):
    data = json.loads(make_profile().model_dump_json())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_field_is_named(tmp_path):
    path = _written(tmp_path, lambda data: data.pop("device_limits"))
    with pytest.raises(UserError, match=r"edited.json: invalid profile: field 'device_limits': Field required"):
        load_profile(path)


def test_negative_coefficient_is_named(tmp_path):
    def edit(data):
        data["coefficients"]["gemm"]["per_byte_s"] = -1.0

    with pytest.raises(UserError, match=r"field 'coefficients.gemm.per_byte_s'.*greater than or equal to 0.*got -1.0"):
        load_profile(_written(tmp_path, edit))


def test_nested_fit_field_is_named(tmp_path):
    def edit(data):
        data["fit"]["median_abs_pct_error"] = "small"

    with pytest.raises(UserError, match=r"field 'fit.median_abs_pct_error'"):
        load_profile(_written(tmp_path, edit))


def test_unknown_field_is_rejected(tmp_path):
    def edit(data):
        data["devcie"] = "typo"

    with pytest.raises(UserError, match=r"field 'devcie': Extra inputs are not permitted"):
        load_profile(_written(tmp_path, edit))


def test_other_schema_version(tmp_path):
    def edit(data):
        data["schema_version"] = 99

    with pytest.raises(UserError, match=r"field 'schema_version' is 99.*run `kvsim calibrate` again"):
        load_profile(_written(tmp_path, edit))


SHIPPED = sorted((Path(__file__).parents[2] / "calibrate" / "profiles").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_shipped_profile_serves_its_model(path):
    profile = load_profile(path)
    model = CalibratedLatencyModel(profile, load_preset(profile.model.name))
    step = model.step_time_s(BatchShape(num_new_tokens=np.array([1, 1]), context_tokens=np.array([100, 200])))
    assert step > 0
    assert profile.fit.num_held_out > 0
    assert all(check.passed for check in profile.reference_checks)
