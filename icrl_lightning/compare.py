"""Evaluate several checkpoints on the same maps and protocol into one figure and one JSON
(the data-quality experiment, paper Fig. 6, or any other comparison of runs).

    python -m icrl_lightning.compare -c conf/experiment/quickstart.yaml \\
        --ckpt runs/quality_high/version_0/checkpoints/last.ckpt \\
               runs/quality_medium/version_0/checkpoints/last.ckpt \\
               runs/quality_low/version_0/checkpoints/last.ckpt \\
        --labels high medium low --out runs/quality_compare [-- --data.eval_maps 20 ...]

Each checkpoint is evaluated with ``python -m icrl_lightning validate`` (the ``-c`` configs, then the
arguments after ``--``), its report written under ``OUT/<label>/``. ``--reports`` instead combines
``report.json`` files that exist already. Writes ``OUT/compare.json`` and ``OUT/compare.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from icrl_lightning.checks import InputError, read_json_file
from icrl_lightning.cli import main as cli_main
from icrl_lightning.episodes import write_json_atomic
from icrl_lightning.evaluation.figures import comparison_figure, save

HEADLINE = ("first_episodes", "overall", "goal_found_before_greedy", "greedy_return_if_found",
            "greedy_return_if_not_found", "first_success_median", "never_succeeded")


def evaluate_checkpoint(ckpt: str, label: str, configs: list[str], out: Path, extra: list[str]) -> dict:
    """Run ``validate`` on ``ckpt``; its report (also written to ``out/label/version_N/``)."""
    args = ["validate"]
    for c in configs:
        args += ["-c", c]
    args += ["--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", label,
             *extra, "--ckpt_path", ckpt]
    cli = cli_main(args)
    report = getattr(cli.model, "eval_report", None)
    if report is None:
        raise RuntimeError(f"validate on {ckpt} produced no evaluation report")
    log_dir = Path(cli.trainer.log_dir or out / label)
    return {**report, "checkpoint": ckpt, "_report_path": str(log_dir / "report.json")}


def combine(reports: dict[str, dict]) -> dict:
    """The comparison record; refuses reports of different maps, schedules or scenarios."""
    labels = list(reports)
    first = reports[labels[0]]
    for label in labels[1:]:
        r = reports[label]
        for key in ("scenario", "maps", "schedule", "switch_to"):
            if r.get(key) != first.get(key):
                raise InputError(f"runs {labels[0]!r} and {label!r} were evaluated with different {key}: "
                                 "compare needs the same evaluation settings (data.eval_*, model.evaluation.*)")
    k = first["last_k"]
    return {
        "labels": labels,
        "scenario": first.get("scenario", "standard"),
        "n_maps": first["n_maps"], "n_episodes": first["n_episodes"], "last_k": k, "schedule": first["schedule"],
        "maps": first["maps"],
        "runs": {label: {"checkpoint": r.get("checkpoint"), "report": r.get("_report_path"),
                         "global_step": r.get("global_step"),
                         "agents": {a: {key: s[key] for key in ("mean_return", "ci95", f"last{k}", *HEADLINE)}
                                    for a, s in r["agents"].items() if a in ("icrl", "no_context")}}
                 for label, r in reports.items()},
        "baselines": {a: {key: s[key] for key in ("mean_return", "ci95", f"last{k}", *HEADLINE)}
                      for a, s in first["agents"].items() if a not in ("icrl", "no_context")},
    }


def print_comparison(record: dict, console: Console | None = None) -> None:
    k = record["last_k"]
    table = Table(title=f"Comparison: {record['n_maps']} maps x {record['n_episodes']} episodes")
    table.add_column("run", no_wrap=True)
    for col in (f"first {k}", f"last {k}", "all", "found", "g|found", "g|not"):
        table.add_column(col, justify="right", no_wrap=True)

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    def row(name, s):
        table.add_row(name, fmt(s["first_episodes"]), fmt(s[f"last{k}"]), fmt(s["overall"]),
                      fmt(s["goal_found_before_greedy"]), fmt(s["greedy_return_if_found"]),
                      fmt(s["greedy_return_if_not_found"]))

    for label, run in record["runs"].items():
        for agent, s in run["agents"].items():
            row(label if agent == "icrl" else f"{label} (no context)", s)
    for name, s in record["baselines"].items():
        row(name, s)
    (console or Console(width=110)).print(table)


def _default_label(path: str, is_ckpt: bool) -> str:
    """``<name>-version_N`` from ``<name>/version_N/checkpoints/x.ckpt`` or ``<name>/version_N/report.json``."""
    version = Path(path).resolve().parents[1 if is_ckpt else 0]
    return f"{version.parent.name}-{version.name}"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m icrl_lightning.compare",
                                 description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", nargs="+", help="checkpoints to evaluate (each with `validate`)")
    src.add_argument("--reports", nargs="+", help="existing report.json files to combine instead")
    ap.add_argument("--labels", nargs="+", help="one name per checkpoint/report (default: run directory names)")
    ap.add_argument("-c", "--config", action="append", default=[],
                    help="config(s) for validate, e.g. the training config then an eval_* overlay")
    ap.add_argument("--out", default="runs/compare", help="output folder (compare.json, compare.png, per-run logs)")
    ap.add_argument("--title", default=None, help="figure title")
    args = ap.parse_args(argv)
    sources = args.ckpt or args.reports
    labels = args.labels or [_default_label(s, bool(args.ckpt)) for s in sources]
    if len(labels) != len(sources) or len(set(labels)) != len(labels):
        raise SystemExit(f"--labels: need {len(sources)} distinct names, got {labels}")
    if args.ckpt and not args.config:
        raise SystemExit("--ckpt needs at least one -c config (the training config, e.g. "
                         "conf/experiment/quickstart.yaml)")
    out = Path(args.out)
    reports: dict[str, dict] = {}
    for label, source in zip(labels, sources, strict=True):
        if args.ckpt:
            reports[label] = evaluate_checkpoint(source, label, args.config, out, extra)
        else:
            report = read_json_file(source, "--reports")
            if not isinstance(report, dict) or "agents" not in report:
                raise InputError(f"--reports: {source} is not a report.json of icrl_lightning (no 'agents')")
            reports[label] = report | {"_report_path": source}
    record = combine(reports)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, out / "compare.json")
    title = args.title or f"in-context agent by run ({record['scenario']}, {record['n_maps']} maps)"
    save(comparison_figure(reports, title), out / "compare.png")
    print_comparison(record)
    print(f"comparison: {out / 'compare.json'}, {out / 'compare.png'}")
    return record


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
