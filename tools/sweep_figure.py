"""A figure of some settings and scenarios of a sweep's summary (the figures of docs/results.md).

    python tools/sweep_figure.py runs/sweeps/scaling/summary.json --settings maps250,maps2500 \\
        --scenarios heldout,ood --title "task diversity x compute" --out docs/figures/scaling_maps.png

One panel per scenario: the in-context last-10 return (solid, or stitching successes) and the
same model without context (dashed) by training step, one line per setting, error bars = 95 %
intervals over seeds; the tabular baselines as dotted lines. ``--metrics``: one row of panels per
report metric instead, e.g. where the return comes from (goal found before the greedy phase, and
greedy return where it was):

    python tools/sweep_figure.py runs/sweeps/long/summary.json --scenarios heldout,ood \
        --metrics icrl/last10,icrl/goal_found_before_greedy,icrl/greedy_return_if_found --out fig.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icrl_lightning.checks import InputError, read_json_file
from icrl_lightning.evaluation.figures import save
from icrl_lightning.sweep import markdown_table, summary_figure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summary", help="a sweep's summary.json")
    ap.add_argument("--settings", default="", help="comma-separated settings to draw (default: all)")
    ap.add_argument("--scenarios", default="", help="comma-separated scenarios (default: all)")
    ap.add_argument("--metrics", default="",
                    help="comma-separated report metrics, one row of panels each (default: last-10, or stitching "
                         "successes, with the no-context line); the names are the summary's, e.g. icrl/last10")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    try:
        summary = read_json_file(args.summary, "summary")
        if not isinstance(summary, dict) or "rows" not in summary:
            raise InputError(f"summary: {args.summary} is not a sweep summary.json (no 'rows')")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = [s for s in args.settings.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    rows = [r for r in summary["rows"] if (not settings or r["setting"] in settings)
            and (not scenarios or r["scenario"] in scenarios)]
    if settings:
        rows.sort(key=lambda r: (settings.index(r["setting"]), r["step"]))
    if not rows:
        print("error: no row of the summary matches --settings / --scenarios", file=sys.stderr)
        return 2
    metrics = [m for m in args.metrics.split(",") if m]
    unknown = [m for m in metrics if not any(m in r["metrics"] for r in rows)]
    if unknown:
        known = sorted(rows[0]["metrics"])[:4]
        print(f"error: --metrics {','.join(unknown)}: not in the summary's rows (e.g. {known})", file=sys.stderr)
        return 2
    picked = {**summary, "rows": rows}
    fig = summary_figure(picked, metrics or None)
    if args.title:
        fig.suptitle(args.title)
    save(fig, Path(args.out))
    print(markdown_table(picked), end="")
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
