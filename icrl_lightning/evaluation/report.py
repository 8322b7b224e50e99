"""Summaries of trial returns, the terminal table and ``report.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from icrl_lightning.episodes import write_json_atomic

# Headline numbers repeated per phase of a non-stationary trial (the per-episode lists are not).
PHASE_KEYS = ("first_episodes", "overall", "goal_found_before_greedy", "greedy_return_if_found",
              "greedy_return_if_not_found", "first_success_median", "never_succeeded")


def summarize(returns: np.ndarray, schedule: list[float], last_k: int = 10) -> dict:
    """Per-episode-index mean with a 95 % interval over maps, the headline numbers, and the
    exploration / exploitation split: the share of maps whose goal was reached before the fully
    greedy phase, the greedy-phase return on those maps against the rest, and the distribution of
    the episode index of each map's first success (``first_success_histogram[k]`` maps first
    succeeded in episode ``k``; ``never_succeeded`` is the share that never did), and the mean
    return of greedy-phase episodes that follow a failed / a successful episode
    (``greedy_after_failure`` / ``greedy_after_success``)."""
    n_maps, n_eps = returns.shape
    mean = returns.mean(axis=0)
    half = 1.96 * returns.std(axis=0, ddof=1) / np.sqrt(n_maps) if n_maps > 1 else np.zeros(n_eps)
    greedy = np.array([p >= 1.0 for p in schedule[:n_eps]] + [False] * (n_eps - len(schedule)))
    explore = ~greedy
    # With no exploring episode (e.g. all greedy) "found before the greedy phase" means "never".
    found = returns[:, explore].max(axis=1) > 0 if explore.any() else np.zeros(n_maps, dtype=bool)
    greedy_ret = returns[:, greedy].mean(axis=1) if greedy.any() else np.full(n_maps, np.nan)
    first = [int(np.flatnonzero(r > 0)[0]) if (r > 0).any() else None for r in returns]
    reached = [f for f in first if f is not None]

    def _m(x):
        return float(np.mean(x)) if len(x) else None

    # Greedy-phase episodes by how the episode before ended: an agent that learns from its context
    # recovers after a failure; a deterministic policy that ignores it fails again.
    ks = np.flatnonzero(greedy)
    ks = ks[ks > 0]
    prev_ok, after = returns[:, ks - 1] > 0, returns[:, ks]

    return {
        "mean_return": mean.round(4).tolist(),
        "ci95": half.round(4).tolist(),
        f"last{last_k}": float(returns[:, -last_k:].mean()),
        "first_episodes": float(returns[:, : min(last_k, n_eps)].mean()),
        "overall": float(returns.mean()),
        "goal_found_before_greedy": float(found.mean()),
        "greedy_return_if_found": _m(greedy_ret[found]),
        "greedy_return_if_not_found": _m(greedy_ret[~found]),
        "episodes_to_first_success": first,
        "first_success_histogram": np.bincount(reached, minlength=n_eps).tolist() if reached else [0] * n_eps,
        "first_success_median": float(np.median(reached)) if reached else None,
        "never_succeeded": float(np.mean([f is None for f in first])),
        "greedy_after_failure": _m(after[~prev_ok]),
        "greedy_after_success": _m(after[prev_ok]),
        "per_map": returns.round(4).tolist(),
    }


def repeated_failures(returns: np.ndarray, trajectories: list[list[list[int]]], schedule: list[float]) -> float | None:
    """Share of the greedy-phase episodes that fail by replaying the previous episode's failed
    path tile for tile: an agent that learns from its context should not do that (the
    environment is deterministic, so a repeated path fails again). ``None`` without a greedy
    failure."""
    repeats = fails = 0
    for r, paths in zip(returns, trajectories, strict=True):
        for k in range(1, len(paths)):
            if schedule[k % len(schedule)] >= 1.0 and r[k] == 0:
                fails += 1
                repeats += int(r[k - 1] == 0 and paths[k] == paths[k - 1])
    return repeats / fails if fails else None


def stitching_paths(returns: np.ndarray, trajectories: list[list[list[int]]],
                    contexts: list[list[dict]]) -> dict:
    """Where a stitching trial's episodes go, against each trial's context episodes (``steps()``
    dicts): ``reached_success_path``, the share of episodes that step on a tile of a successful
    context episode (its goal excluded); ``success_if_reached``, the share of those that reach a
    goal (``None`` when none reached the path); ``known_hole``, the share that end in a hole a
    context episode ended in. A model that joins paths but cannot find its way to the successful
    one shows a high ``success_if_reached`` and a low ``reached_success_path``."""
    reached = solved = holes = n = 0
    for r, paths, context in zip(returns, trajectories, contexts, strict=True):
        path_tiles = {t for e in context if sum(e["rewards"]) > 0 for t in e["observations"][:-1]}
        known = {e["observations"][-1] for e in context if e["terminated"] and sum(e["rewards"]) <= 0}
        for k, tiles in enumerate(paths):
            n += 1
            on_path = bool(path_tiles.intersection(tiles))
            reached += on_path
            solved += on_path and r[k] > 0
            holes += r[k] <= 0 and tiles[-1] in known
    return {"reached_success_path": reached / n if n else None,
            "success_if_reached": solved / reached if reached else None,
            "known_hole": holes / n if n else None}


def summarize_phases(returns: np.ndarray, schedule: list[float], phases: int, last_k: int) -> list[dict]:
    """Headline numbers of each phase (episodes ``p * len(schedule) ...``) of a non-stationary trial."""
    n = len(schedule)
    out = []
    for p in range(phases):
        s = summarize(returns[:, p * n:(p + 1) * n], schedule, last_k)
        out.append({f"last{last_k}": s[f"last{last_k}"], **{k: s[k] for k in PHASE_KEYS}})
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(report: dict, console: Console | None = None) -> None:
    """The rich summary table: one row per agent (per phase for a non-stationary trial). The
    exploration split (found, g|found, g|not) is left out when the schedule has no exploring
    episode (bandits: every pull is the agent's own), where it would always read 0 and "-"; a
    regret column is added when the report has regret."""
    k = report["last_k"]
    scenario = report.get("scenario", "standard")
    schedule = report.get("schedule")
    split = schedule is None or any(p < 1.0 for p in schedule)
    regret = all("regret" in s for s in report["agents"].values())
    title = (f"In-context evaluation ({scenario}): {report['n_maps']} "
             f"{'trials' if scenario == 'stitching' else 'maps'} x {report['n_episodes']} episodes")
    caption = f"first/last {k}: mean return of a trial's first/last {k} episodes; "
    if split:
        caption += ("found: share of trials that reached the goal before the greedy phase; g|found, g|not: "
                    "greedy-phase return on those / the rest; ")
    if regret:
        caption += "regret: cumulative regret over the trial, mean over tasks; "
    caption += "1st win: median episode of the first success; never: share with no success"
    if report.get("untrained"):
        title = f"UNTRAINED MODEL (validate without --ckpt_path: random weights). {title}"
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("agent", no_wrap=True, min_width=10)
    columns = [f"first {k}", f"last {k}", "all", *(("found", "g|found", "g|not") if split else ()),
               *(("regret",) if regret else ()), "1st win", "never"]
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)

    def row(name: str, s: dict, total: dict) -> None:
        med = s["first_success_median"]
        cells = [_fmt(s["first_episodes"]), _fmt(s[f"last{k}"]), _fmt(s["overall"])]
        if split:
            cells += [_fmt(s["goal_found_before_greedy"]), _fmt(s["greedy_return_if_found"]),
                      _fmt(s["greedy_return_if_not_found"])]
        if regret:  # of the whole trial (the agent's row, not the phase's)
            cells.append(f"{total['regret']:.2f}")
        cells += ["-" if med is None else f"{med:g}", _fmt(s["never_succeeded"])]
        table.add_row(name, *cells)

    for name, s in report["agents"].items():
        phases = s.get("phases")
        if phases:
            for p, ps in enumerate(phases):
                row(f"{name} (map {'AB'[p] if p < 2 else p + 1})", ps, s)
        else:
            row(name, s, s)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough for the whole table
            console = Console(width=max(console.width, 110))
    console.print(table)


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, path)
