"""Argument checks that run when a class is built, so a bad value fails before any work starts,
with a message naming the key and the allowed range."""

from __future__ import annotations

import math


def check_range(key: str, value, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` lies in the interval (bounds optional;
    ``*_open`` excludes that bound)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "-inf" if lo is None else f"{lo}"
        right = "inf" if hi is None else f"{hi}"
        interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{key}={value!r} is out of range: allowed {interval}")


def check_module_args(lr: float, weight_decay: float, warmup_steps: int, alpha: float, gamma: float,
                      reward_scale: float, loss: str, seq_len: int) -> None:
    """The ``model.*`` hyper-parameters of ``ICRLModule``."""
    check_range("model.lr", lr, 0, None, lo_open=True)
    check_range("model.weight_decay", weight_decay, 0, None)
    check_range("model.warmup_steps", warmup_steps, 0, None)
    check_range("model.alpha", alpha, 0, 1, lo_open=True)
    check_range("model.gamma", gamma, 0, 1, hi_open=True)
    check_range("model.reward_scale", reward_scale, 0, None, lo_open=True)
    check_range("model.seq_len", seq_len, 1, None)
    if loss not in ("mse", "normalized"):
        raise ValueError(f"model.loss={loss!r}: choose 'mse' or 'normalized'")
