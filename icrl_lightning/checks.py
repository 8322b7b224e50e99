"""Argument checks that run when a class is built, so a bad value fails before any work starts,
with a message naming the key and the allowed range; and ``InputError``, the error for a bad
configuration value or input file, which ``python -m icrl_lightning`` prints without a traceback."""

from __future__ import annotations

import math
from collections.abc import Iterable

SET_ORDERS = ("random", "learning", "trial")  # data.set_order


class InputError(ValueError):
    """A bad configuration value or input file. The message says what is wrong (the key, file, map
    or row) and what is allowed; the command line prints it as ``error: ...`` and exits with 2."""


class MissingInputFile(InputError, FileNotFoundError):
    """An input file that does not exist."""


def check_range(key: str, value, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, why: str = "") -> None:
    """Raise ``InputError`` naming ``key`` unless ``value`` lies in the interval (bounds optional;
    ``*_open`` excludes that bound). ``why`` is appended to the message (e.g. where a bound comes from)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "-inf" if lo is None else f"{lo}"
        right = "inf" if hi is None else f"{hi}"
        interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise InputError(f"{key}={value!r} is out of range: allowed {interval}" + (f" ({why})" if why else ""))


def check_choice(key: str, value, choices: Iterable) -> None:
    """Raise ``InputError`` naming ``key`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise InputError(f"{key}={value!r}: choose one of {', '.join(repr(c) for c in choices)}")


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
    check_choice("model.loss", loss, ("mse", "normalized"))


def check_data_args(h, reserved_eval_maps: int, trial_length: int) -> None:
    """The ``data.*`` arguments of ``ReplayDataModule`` (``h``: its hyper-parameters, by attribute;
    ``reserved_eval_maps``: maps per evaluation split; ``trial_length``: episodes in one trial of
    the evaluation schedule).
    Only what can be checked without the model; ``seq_len`` against the longest episode is checked
    once the serializer is known (``ReplayDataModule.prepare_data``)."""
    check_range("data.seed", h.seed, 0, None, why="numpy seeds are non-negative")
    check_range("data.split_seed", h.split_seed, 0, None, why="numpy seeds are non-negative")
    check_range("data.num_train_maps", h.num_train_maps, 1, None)
    check_range("data.episodes_per_map", h.episodes_per_map, 1, None)
    check_range("data.behaviour_epsilon", h.behaviour_epsilon, 0, 1)
    check_range("data.behaviour_lr", h.behaviour_lr, 0, 1, lo_open=True)
    check_range("data.behaviour_gamma", h.behaviour_gamma, 0, 1)
    check_range("data.behaviour_q_init", h.behaviour_q_init, 0, None,
                why="0 = untried moves look like holes, 1 = optimistic (rewards are 0 or 1)")
    check_choice("data.behaviour_schedule", h.behaviour_schedule, ("constant", "protocol", "mixed"))
    if h.behaviour_schedule == "protocol" and h.episodes_per_map % trial_length:
        raise InputError(f"data.episodes_per_map={h.episodes_per_map} with data.behaviour_schedule=protocol: "
                         f"use a multiple of {trial_length} (whole trials of the evaluation schedule)")
    check_range("data.max_episode_steps", h.max_episode_steps, 1, None)
    check_range("data.min_size", h.min_size, 2, None, why="a map is at least 2 x 2 tiles")
    check_range("data.max_size", h.max_size, h.min_size, None, why="at least data.min_size")
    check_range("data.p_hole", h.p_hole, 0, 1, hi_open=True)
    far = 2 * (h.max_size - 1)
    check_range("data.min_hops", h.min_hops, 0, far,
                why=f"the farthest tiles of a {h.max_size} x {h.max_size} map are {far} moves apart")
    check_range("data.set_size_min", h.set_size_min, 1, None)
    check_range("data.set_size_max", h.set_size_max, h.set_size_min, None, why="at least data.set_size_min")
    check_choice("data.quality", h.quality, ("high", "medium", "low"))
    check_choice("data.set_order", h.set_order, SET_ORDERS)
    if h.set_order == "trial" and h.behaviour_schedule != "protocol":
        raise InputError("data.set_order=trial plays whole trials: it needs data.behaviour_schedule=protocol")
    check_range("data.seq_len", h.seq_len, 1, None)
    check_range("data.batch_size", h.batch_size, 1, None)
    check_range("data.num_workers", h.num_workers, 0, None)
    check_choice("data.eval_split", h.eval_split, ("heldout", "ood"))
    check_range("data.eval_maps", h.eval_maps, 1, reserved_eval_maps,
                why=f"{reserved_eval_maps} maps of each split are reserved for evaluation")
