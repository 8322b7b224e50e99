"""Summaries of trial returns, the terminal table and ``report.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from icrl_lightning.episodes import write_json_atomic


def summarize(returns: np.ndarray, schedule: list[float], last_k: int = 10) -> dict:
    """Per-episode-index mean with a 95 % interval over maps, the headline numbers, and the
    exploration / exploitation split: the share of maps whose goal was reached before the fully
    greedy phase, and the greedy-phase return on those maps against the rest."""
    n_maps, n_eps = returns.shape
    mean = returns.mean(axis=0)
    half = 1.96 * returns.std(axis=0, ddof=1) / np.sqrt(n_maps) if n_maps > 1 else np.zeros(n_eps)
    greedy = np.array([p >= 1.0 for p in schedule[:n_eps]] + [False] * (n_eps - len(schedule)))
    explore = ~greedy
    # With no exploring episode (e.g. all greedy) "found before the greedy phase" means "never".
    found = returns[:, explore].max(axis=1) > 0 if explore.any() else np.zeros(n_maps, dtype=bool)
    greedy_ret = returns[:, greedy].mean(axis=1) if greedy.any() else np.full(n_maps, np.nan)
    first = [int(np.flatnonzero(r > 0)[0]) if (r > 0).any() else None for r in returns]

    def _m(x):
        return float(np.mean(x)) if len(x) else None

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
        "per_map": returns.round(4).tolist(),
    }


def print_table(report: dict, console: Console | None = None) -> None:
    k = report["last_k"]
    table = Table(title=f"In-context evaluation: {report['n_maps']} maps x {report['n_episodes']} episodes")
    columns = ("agent", "first eps", f"last {k}", "overall", "goal found pre-greedy", "greedy | found",
               "greedy | not found")
    for col in columns:
        table.add_column(col, justify="right" if col != "agent" else "left")

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    for name, s in report["agents"].items():
        table.add_row(name, fmt(s["first_episodes"]), fmt(s[f"last{k}"]), fmt(s["overall"]),
                      fmt(s["goal_found_before_greedy"]), fmt(s["greedy_return_if_found"]),
                      fmt(s["greedy_return_if_not_found"]))
    (console or Console()).print(table)


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, path)
