"""PNG figures of a report: the return curves (paper Figs. 3, 4, 6, 7: mean return per episode
index, the 95 % interval as a band, baselines as lines) with the episodes-to-first-success
distribution, and a trajectory drawing of one map early vs late (Fig. 1).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot's
global state, so they render headless and leave a user's backend alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

STYLE = {  # agent -> (label, colour, line style)
    "icrl": ("in-context agent", "tab:blue", "-"),
    "no_context": ("same model, no context", "tab:orange", "-"),
    "random": ("uniform random", "0.45", "--"),
    "q_learning": ("tabular Q-learning", "tab:green", "-."),
    "q_optimistic": ("tabular Q-learning, optimistic start", "tab:olive", "-."),
    "oracle": ("oracle", "black", ":"),
    "ucb1": ("UCB1", "tab:purple", "--"),
    "thompson": ("Thompson sampling", "tab:brown", "--"),
    "greedy": ("greedy (empirical mean)", "tab:pink", "-."),
}
TILE_COLOURS = {"S": "#9ecae1", "F": "#f7fbff", "H": "#252525", "G": "#74c476"}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _shade_greedy(ax, schedule: list[float]) -> None:
    """Grey background behind fully greedy episodes."""
    for e, p in enumerate(schedule):
        if p >= 1.0:
            ax.axvspan(e - 0.5, e + 0.5, color="0.93", lw=0, zorder=0)


def _curve(ax, x, summary: dict, label: str, colour: str, style: str, band: bool) -> None:
    mean = np.asarray(summary["mean_return"])
    ax.plot(x, mean, style, color=colour, label=label, lw=1.8 if band else 1.3)
    if band:
        half = np.asarray(summary["ci95"])
        ax.fill_between(x, np.clip(mean - half, 0, None), mean + half, color=colour, alpha=0.2, lw=0)


def curve_figure(report: dict, title: str | None = None) -> Figure:
    """Left: mean return per episode index (bands: 95 % interval over maps for the model's two
    agents; the baselines as lines). Right: share of maps that have reached the goal at least
    once by each episode (the episodes-to-first-success distribution, cumulative), or, when the
    report has regret (bandits), each agent's cumulative regret per pull."""
    fig = new_figure(11.5, 4.2)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    n = report["n_episodes"]
    x = np.arange(n)
    regret = all("cumulative_regret" in s for s in report["agents"].values())
    _shade_greedy(ax, report["schedule"])
    for name, s in report["agents"].items():
        label, colour, style = STYLE.get(name, (name, None, "-"))
        _curve(ax, x, s, label, colour, style, band=name in ("icrl", "no_context"))
        if regret:
            ax2.plot(x, s["cumulative_regret"], color=colour, ls=style, label=label)
            continue
        hist = np.asarray(s["first_success_histogram"], dtype=float)
        ax2.step(x, np.cumsum(hist) / max(report["n_maps"], 1), where="post", color=colour, ls=style, label=label)
    if report.get("phases", 1) > 1:
        for p in range(1, report["phases"]):
            for a in (ax, ax2):
                a.axvline(p * report["phase_length"] - 0.5, color="tab:red", lw=1.2, ls="--")
        ax.text(report["phase_length"] - 0.3, 1.02, "map switch", color="tab:red", fontsize=8, va="bottom")
    unit = "trials" if report.get("scenario") == "stitching" else "maps"
    top = max([1.0] + [max(s["mean_return"], default=0.0) for s in report["agents"].values()])
    ax.set(xlabel="episode", ylabel=f"mean return over {report['n_maps']} {unit}", ylim=(-0.02 * top, 1.08 * top),
           xlim=(-0.5, n - 0.5))
    ax.set_title(title or f"{report.get('scenario', 'standard')} (greedy episodes shaded)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    if regret:
        ax2.set(xlabel="pull (episode)", ylabel="cumulative regret (best mean - reward)", xlim=(-0.5, n - 0.5))
        ax2.set_title("cumulative regret, mean over tasks", fontsize=10)
    else:
        ax2.set(xlabel="episode", ylabel=f"share of {unit} with a success so far", ylim=(-0.02, 1.05),
                xlim=(-0.5, n - 0.5))
        ax2.set_title("episodes to first success (cumulative)", fontsize=10)
    fig.tight_layout()
    return fig


def _draw_map(ax, rows: list[str]) -> None:
    nrow, ncol = len(rows), len(rows[0])
    for r in range(nrow):
        for c in range(ncol):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=TILE_COLOURS.get(rows[r][c], "white"),
                                   edgecolor="0.6", lw=0.8))
            ax.text(c - 0.42, r - 0.42, rows[r][c], fontsize=7, va="top", ha="left",
                    color="white" if rows[r][c] == "H" else "0.35")
    ax.set_xlim(-0.5, ncol - 0.5)
    ax.set_ylim(nrow - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_path(ax, tiles: list[int], ncol: int, colour: str, label: str | None = None) -> None:
    """A tile path through tile centres; revisits are offset (within the tile) so loops stay visible."""
    pts = np.array([[t % ncol, t // ncol] for t in tiles], dtype=float)
    seen: dict[int, int] = {}
    for j, t in enumerate(tiles):
        k = seen.get(t, 0)
        seen[t] = k + 1
        pts[j] += 0.32 * (1 - 0.85**k) * np.array([np.cos(k * 2.4), np.sin(k * 2.4)])
    ax.plot(pts[:, 0], pts[:, 1], "-", color=colour, lw=1.6, alpha=0.85, label=label)
    ax.plot(*pts[0], "o", color=colour, ms=7)
    ax.plot(*pts[-1], "X", color=colour, ms=8)


def pick_map(report: dict) -> int:
    """The map where the in-context agent improved most (last episodes vs first), ties to the first;
    for a stitching report, the first trial it failed (else the first)."""
    per_map = np.asarray(report["agents"]["icrl"]["per_map"])
    if report.get("scenario") == "stitching":
        failed = np.flatnonzero(per_map.max(axis=1) <= 0)
        return int(failed[0]) if failed.size else 0
    k = min(report["last_k"], per_map.shape[1])
    gain = per_map[:, -k:].mean(axis=1) - per_map[:, :k].mean(axis=1)
    return int(np.argmax(gain))


def trajectory_figure(report: dict, map_index: int | None = None) -> Figure:
    """One map, the in-context agent's first episode vs its last (for a stitching report: the
    context episodes and each trial's path)."""
    i = pick_map(report) if map_index is None else map_index
    trajs = report["trajectories"][i]
    returns = report["agents"]["icrl"]["per_map"][i]
    if report.get("scenario") == "stitching":
        rows = report["maps"][i]
        fig = new_figure(7.5, 4.2)
        a1, a2 = fig.subplots(1, 2)
        ncol = len(rows[0])
        for a in (a1, a2):
            _draw_map(a, rows)
        for j, e in enumerate(report["context"][i] if report["context"] else []):
            _draw_path(a1, e["observations"], ncol, ("tab:green", "tab:red", "tab:purple")[j % 3],
                       f"context {j + 1}: return {sum(e['rewards']):g}")
        a1.set_title("context episodes", fontsize=10)
        a1.legend(fontsize=7, loc="lower right")
        _draw_path(a2, trajs[-1], ncol, "tab:blue", f"trial 1: return {returns[-1]:g}")
        a2.set_title(f"agent (greedy): {' -> '.join(map(str, trajs[-1][:12]))}", fontsize=9)
        a2.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        return fig
    n = len(trajs)
    phase_len = report.get("phase_length", n)
    picks = [(0, "first episode"), (phase_len - 1, "last episode")]
    if report.get("phases", 1) > 1:
        picks = [(0, "map A, first"), (phase_len - 1, "map A, last"), (phase_len, "map B, first"),
                 (n - 1, "map B, last")]
    fig = new_figure(3.6 * len(picks), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(picks)))
    for ax, (e, what) in zip(axes, picks, strict=True):
        rows = report["maps"][i] if e < phase_len or not report.get("switch_to") else report["switch_to"][i]
        _draw_map(ax, rows)
        _draw_path(ax, trajs[e], len(rows[0]), "tab:blue")
        ax.set_title(f"{what} (ep {e}, p={report['schedule'][e]:g})\nreturn {returns[e]:g}, "
                     f"{len(trajs[e]) - 1} steps", fontsize=9)
    fig.suptitle(f"map {i}: in-context agent early vs late (o start, x end)", fontsize=10)
    fig.tight_layout()
    return fig


def comparison_figure(reports: dict[str, dict], title: str = "in-context agent by run") -> Figure:
    """Several runs' in-context curves (bands: 95 % intervals) on the same maps, with the
    baselines of the first run as lines (paper Fig. 6)."""
    fig = new_figure(8.0, 4.4)
    ax = fig.subplots()
    first = next(iter(reports.values()))
    x = np.arange(first["n_episodes"])
    _shade_greedy(ax, first["schedule"])
    colours = ["tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive"]
    for j, (label, rep) in enumerate(reports.items()):
        _curve(ax, x, rep["agents"]["icrl"], label, colours[j % len(colours)], "-", band=True)
    for name in ("no_context", "random", "q_learning", "q_optimistic", "oracle"):
        if name in first["agents"]:
            label, colour, style = STYLE[name]
            if name == "no_context":
                label = f"{label} ({next(iter(reports))})"
            _curve(ax, x, first["agents"][name], label, colour, style, band=False)
    ax.set(xlabel="episode", ylabel=f"mean return over {first['n_maps']} maps", ylim=(-0.02, 1.08),
           xlim=(-0.5, len(x) - 0.5))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_figures(report: dict, directory: Path, prefix: str = "") -> list[Path]:
    """``curves.png`` and ``trajectories.png`` (with an optional file-name prefix) in ``directory``."""
    directory = Path(directory)
    out = [save(curve_figure(report), directory / f"{prefix}curves.png")]
    if all(set("".join(m)) <= set(TILE_COLOURS) for m in report["maps"]):  # grid tasks only (not bandits)
        out.append(save(trajectory_figure(report), directory / f"{prefix}trajectories.png"))
    return out
