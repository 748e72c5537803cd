"""The calibrate package without torch: a UserError with the install command."""

from __future__ import annotations

import sys

import pytest

import calibrate
from kvsim.errors import UserError


def test_missing_torch_is_user_error(monkeypatch):
    for name in list(sys.modules):
        if name.startswith("calibrate.") and name != "calibrate.fit":
            monkeypatch.delitem(sys.modules, name)
    for attribute in ("run", "attention", "paths", "sweeps", "measure", "triton_paged", "kv_bytes", "plan"):
        monkeypatch.delattr(calibrate, attribute, raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match=r"calibration needs torch.*pip install 'kvsim\[calibrate\]'"):
        calibrate.main


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        calibrate.nothing
