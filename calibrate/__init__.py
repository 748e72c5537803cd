"""The calibration pass: time real attention and GEMM kernels with torch, fit step-time terms, write a profile.

This package needs torch (the `kvsim[calibrate]` extra); kvsim itself only reads the profile it
writes. `run_calibration` and `main` are imported on first use, so `calibrate.fit` works without torch.
"""

from __future__ import annotations

__all__ = ["main", "run_calibration"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'calibrate' has no attribute {name!r}")
    try:
        from calibrate import run
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        from kvsim.errors import UserError

        raise UserError("calibration needs torch, which is not installed; install the extra with "
                        "`pip install 'kvsim[calibrate]'`") from None
    return getattr(run, name)
