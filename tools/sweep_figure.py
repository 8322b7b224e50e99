"""A figure of some settings and scenarios of a sweep's summary (the figures of docs/results.md).

    python tools/sweep_figure.py runs/sweeps/scaling/summary.json --settings maps250,maps2500 \\
        --scenarios heldout,ood --title "task diversity x compute" --out docs/figures/scaling_maps.png

One panel per scenario: the in-context last-10 return (solid, or stitching successes) and the
same model without context (dashed) by training step, one line per setting, error bars = 95 %
intervals over seeds; the tabular baselines as dotted lines.
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
    picked = {**summary, "rows": rows}
    fig = summary_figure(picked)
    if args.title:
        fig.suptitle(args.title)
    save(fig, Path(args.out))
    print(markdown_table(picked), end="")
    print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
