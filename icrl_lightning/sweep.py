"""Multi-seed results in one command: settings x seeds, each a real ``fit``, each checkpoint
evaluated on the chosen scenarios, then one table and one figure with the mean and a 95 %
interval over seeds for every report metric.

    python -m icrl_lightning.sweep conf/sweep/quickstart_seeds.yaml            # run, then summarise
    python -m icrl_lightning.sweep conf/sweep/quickstart_seeds.yaml --dry-run  # the commands only
    python -m icrl_lightning.sweep conf/sweep/quickstart_seeds.yaml --summary  # summarise what exists

A sweep file (YAML) names the training configs, the seeds, the settings (each a set of
``--key value`` overrides), the optimizer steps whose checkpoints are evaluated and the
evaluation scenarios (``conf/experiment/eval_<name>.yaml``); see ``Sweep``. Every run lives in
``<out_dir>/<name>/<setting>/seed<S>/``: ``fit/version_0/`` (checkpoints ``step=N.ckpt``, TensorBoard)
and ``eval/<scenario>-step<N>/version_0/report.json``. It is resumable: a finished evaluation is
skipped, a finished ``fit`` is not run again, and a killed one continues from its ``last.ckpt``.

Runs go out through submitit: ``launcher.cluster: local`` runs them as processes on this machine,
``launcher.jobs`` at a time; ``slurm`` submits them as SLURM jobs (``launcher.slurm``: the
executor's parameters, e.g. ``slurm_partition``, ``gpus_per_node``), at most ``launcher.jobs``
running at once; ``inline`` runs them one after the other in this process (no submitit).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from icrl_lightning.checks import InputError

SEED_KEYS = ("seed_everything", "data.seed")
DEFAULT_CLI = "icrl_lightning.cli"  # the module whose main(args) runs a fit or validate
CLUSTERS = ("local", "slurm", "inline")
# Student's t quantile (0.975) by degrees of freedom: the 95 % interval of a mean over few seeds.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class Launcher:
    """Where the runs go.

    Args:
        cluster: ``local`` (processes on this machine, through submitit), ``slurm`` (SLURM jobs,
            through submitit) or ``inline`` (in this process, one after the other).
        jobs: runs at the same time (local processes, or the SLURM array's parallelism).
        threads: torch threads per run (CPU runs; 1 keeps parallel runs from competing).
        timeout_min: wall-time limit of one run (fit and its evaluations).
        slurm: extra submitit parameters for SLURM (``slurm_partition``, ``gpus_per_node``, ...).
    """

    cluster: str = "local"
    jobs: int = 1
    threads: int = 1
    timeout_min: int = 24 * 60
    slurm: dict = field(default_factory=dict)


@dataclass
class Sweep:
    """A sweep file.

    Args:
        name: the sweep's folder under ``out_dir``.
        configs: the ``-c`` configs of every ``fit`` and ``validate``, in order.
        seeds: each run is repeated at these seeds (``seed_everything`` and ``data.seed``; the
            evaluation maps stay the same: ``data.split_seed``).
        settings: setting name -> overrides (``{"data.num_train_maps": 2500}``), applied after the
            configs; ``{}`` is the configs alone. A setting's ``steps`` key (a list) replaces the
            sweep's ``steps`` for that setting; its ``cli`` key names the module whose ``main``
            runs its ``fit`` and ``validate`` (default ``icrl_lightning.cli``; e.g. an
            ``icrl_lightning.experimental`` module under study). Runs go out in this order
            (settings, then seeds).
        steps: optimizer steps whose checkpoints are evaluated; ``fit`` runs to the largest (the
            learning rate is constant after warm-up, so step ``N`` of a longer run is the ``N``-step
            run). Empty: the configs' ``trainer.max_steps`` (per setting).
        scenarios: evaluation overlays, ``conf/experiment/eval_<name>.yaml`` or a YAML path.
        eval_overrides: overrides for ``validate`` only (e.g. ``{"data.eval_maps": 20}``).
        out_dir: where sweeps are written.
        launcher: see ``Launcher``.
    """

    name: str
    configs: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    settings: dict[str, dict] = field(default_factory=lambda: {"base": {}})
    steps: list[int] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=lambda: ["heldout"])
    eval_overrides: dict = field(default_factory=dict)
    out_dir: str = "runs/sweeps"
    launcher: Launcher = field(default_factory=Launcher)

    @property
    def root(self) -> Path:
        return Path(self.out_dir) / self.name


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; every problem is one ``InputError`` line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sweep file {path} does not exist" if not path.exists() else f"sweep file {path} is a folder")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"sweep file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"sweep file {path}: expected a mapping with name, configs, seeds, settings, ...")
    known = set(Sweep.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"sweep file {path}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    launcher = raw.pop("launcher", None) or {}
    if not isinstance(launcher, dict) or set(launcher) - set(Launcher.__dataclass_fields__):
        raise InputError(f"sweep file {path}: launcher takes {sorted(Launcher.__dataclass_fields__)}, got {launcher!r}")
    for key in ("name", "configs"):
        if key not in raw:
            raise InputError(f"sweep file {path}: '{key}' is required")
    sweep = Sweep(**raw, launcher=Launcher(**launcher))
    _check(sweep, path)
    return sweep


def _check(s: Sweep, path: Path) -> None:
    where = f"sweep file {path}"
    if not isinstance(s.name, str) or not s.name or "/" in s.name:
        raise InputError(f"{where}: name={s.name!r} must be a folder name")
    if not isinstance(s.configs, list) or not s.configs:
        raise InputError(f"{where}: configs must be a non-empty list of config files")
    for c in s.configs:
        if not Path(c).is_file():
            raise InputError(f"{where}: config {c} does not exist")
    if not s.seeds or not all(isinstance(x, int) and x >= 0 for x in s.seeds) or len(set(s.seeds)) != len(s.seeds):
        raise InputError(f"{where}: seeds={s.seeds!r} must be distinct non-negative integers")
    if not isinstance(s.settings, dict) or not s.settings:
        raise InputError(f"{where}: settings must map a name to its overrides, e.g. {{base: {{}}}}")
    for name, over in s.settings.items():
        if not isinstance(over, dict) and over is not None:
            raise InputError(f"{where}: settings.{name} must be a mapping of overrides, got {over!r}")
        if "/" in str(name):
            raise InputError(f"{where}: setting name {name!r} must be a folder name")
        cli = (over or {}).get("cli")
        if cli is not None and not _has_main(cli):
            raise InputError(f"{where}: settings.{name}.cli={cli!r} must name a module with a main(args), "
                             f"e.g. {DEFAULT_CLI}")
        own = (over or {}).get("steps")
        if own is not None and (not isinstance(own, list) or not own
                                or not all(isinstance(x, int) and x >= 1 for x in own)):
            raise InputError(f"{where}: settings.{name}.steps={own!r} must be a list of positive integers")
    if not all(isinstance(x, int) and x >= 1 for x in s.steps):
        raise InputError(f"{where}: steps={s.steps!r} must be positive integers")
    for sc in s.scenarios:
        if not Path(scenario_config(sc)).is_file():
            raise InputError(f"{where}: scenario {sc!r}: {scenario_config(sc)} does not exist")
    lc = s.launcher
    if lc.cluster not in CLUSTERS:
        raise InputError(f"{where}: launcher.cluster={lc.cluster!r}: choose one of {list(CLUSTERS)}")
    if lc.jobs < 1 or lc.threads < 1 or lc.timeout_min < 1:
        raise InputError(f"{where}: launcher.jobs, threads and timeout_min must be >= 1")


def _has_main(module) -> bool:
    """Whether ``module`` names an importable module with a ``main``."""
    try:
        return isinstance(module, str) and hasattr(importlib.import_module(module), "main")
    except ImportError:
        return False


def scenario_config(name: str) -> str:
    return name if name.endswith((".yaml", ".yml")) else f"conf/experiment/eval_{name}.yaml"


def _overrides(over: dict) -> list[str]:
    """``{"a.b": v}`` -> ``["--a.b=v"]`` (values as YAML scalars / flow lists, as the CLI parses them)."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in (over or {}).items()]


def _configured_max_steps(configs: list[str], over: dict) -> int:
    if "trainer.max_steps" in (over or {}):
        return int(over["trainer.max_steps"])
    steps = None
    for c in configs:  # later configs override earlier ones, as with repeated -c
        doc = yaml.safe_load(Path(c).read_text()) or {}
        steps = (doc.get("trainer") or {}).get("max_steps", steps)
    if not steps:
        raise InputError(f"configs {configs} set no trainer.max_steps: give the sweep's steps")
    return int(steps)


@dataclass
class Job:
    """One setting at one seed: a fit and its evaluations."""

    setting: str
    seed: int
    run_dir: str
    configs: list[str]
    overrides: dict
    steps: list[int]
    scenarios: list[str]
    eval_overrides: dict
    threads: int
    cli: str = DEFAULT_CLI

    @property
    def command(self) -> str:
        """The shell command that runs this job's ``cli``."""
        return "python -m " + ("icrl_lightning" if self.cli == DEFAULT_CLI else self.cli)

    def fit_args(self) -> list[str]:
        every = math.gcd(*self.steps)
        args = ["fit", *[a for c in self.configs for a in ("-c", c)], *_overrides(self.overrides),
                *_overrides({k: self.seed for k in SEED_KEYS}),
                f"--trainer.max_steps={max(self.steps)}",
                f"--trainer.logger.init_args.save_dir={self.run_dir}", "--trainer.logger.init_args.name=fit",
                "--trainer.logger.init_args.version=0",
                # The evaluations run as validate afterwards, one per checkpoint and scenario.
                "--trainer.limit_val_batches=0",
                "--trainer.callbacks+=icrl_lightning.callbacks.StepCheckpoints",
                f"--trainer.callbacks.every_n_train_steps={every}"]
        resume = self.resume_from()
        if resume is not None:
            args.append(f"--ckpt_path={resume}")
        return args

    def resume_from(self) -> Path | None:
        """``last.ckpt`` of an interrupted fit, else its newest ``step=N.ckpt``, else None."""
        if (self.checkpoints / "last.ckpt").is_file():
            return self.checkpoints / "last.ckpt"
        steps = sorted(self.checkpoints.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        return steps[-1] if steps else None

    @property
    def checkpoints(self) -> Path:
        return Path(self.run_dir) / "fit" / "version_0" / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step={step}.ckpt"

    def report(self, scenario: str, step: int) -> Path:
        return Path(self.run_dir) / "eval" / f"{Path(scenario).stem}-step{step}" / "version_0" / "report.json"

    def validate_args(self, scenario: str, step: int) -> list[str]:
        # The scenario overlay comes right after the configs, so that a setting's own overrides win.
        return ["validate", *[a for c in self.configs for a in ("-c", c)], "-c", scenario_config(scenario),
                *_overrides(self.overrides), *_overrides({k: self.seed for k in SEED_KEYS}),
                *_overrides(self.eval_overrides),
                f"--trainer.logger.init_args.save_dir={Path(self.run_dir) / 'eval'}",
                f"--trainer.logger.init_args.name={Path(scenario).stem}-step{step}",
                "--trainer.logger.init_args.version=0", f"--ckpt_path={self.checkpoint(step)}"]

    def finished(self) -> bool:
        return all(self.report(sc, st).is_file() for sc in self.scenarios for st in self.steps)


def plan(sweep: Sweep) -> list[Job]:
    jobs = []
    for setting, over in sweep.settings.items():
        over = dict(over or {})
        own = over.pop("steps", None)
        cli = over.pop("cli", None) or DEFAULT_CLI
        steps = sorted(set(own or sweep.steps)) or [_configured_max_steps(sweep.configs, over)]
        for seed in sweep.seeds:
            jobs.append(Job(setting, seed, str(sweep.root / setting / f"seed{seed}"), list(sweep.configs), over,
                            steps, list(sweep.scenarios), dict(sweep.eval_overrides), sweep.launcher.threads, cli))
    return jobs


def run_job(job: Job) -> str:
    """Fit (unless every needed checkpoint exists), then every missing evaluation. Runs in the
    launcher's process; a failure is written to ``run_dir/error.txt`` and raised."""
    import torch

    main = importlib.import_module(job.cli).main
    torch.set_num_threads(job.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").unlink(missing_ok=True)
    started = time.time()
    try:
        if not all(job.checkpoint(s).is_file() for s in job.steps):
            main(job.fit_args())
            missing = [s for s in job.steps if not job.checkpoint(s).is_file()]
            if missing:
                raise RuntimeError(f"fit ended without the checkpoints of steps {missing} in {job.checkpoints}")
            for ckpt in job.checkpoints.glob("step=*.ckpt"):  # keep only what is evaluated (and last.ckpt)
                if int(ckpt.stem.split("=")[1]) not in job.steps:
                    ckpt.unlink()
        fit_s = time.time() - started
        for step in job.steps:
            for scenario in job.scenarios:
                if not job.report(scenario, step).is_file():
                    main(job.validate_args(scenario, step))
        (run_dir / "timing.json").write_text(json.dumps({"fit_and_eval_s": time.time() - started, "fit_s": fit_s}))
    except BaseException as err:  # SystemExit from a CLI error too: keep the reason beside the run
        text = "".join(traceback.format_exception(err))
        cause = err.__context__ if isinstance(err, SystemExit) and err.__context__ is not None else None
        if cause is not None:  # the CLI's one-line error, raised as SystemExit(2) from it
            text += f"{type(cause).__name__}: {cause}\n"
        (run_dir / "error.txt").write_text(text)
        if isinstance(err, SystemExit):  # a failed run, not a request to stop the launcher
            raise RuntimeError(f"{type(cause).__name__}: {cause}" if cause else f"exit status {err.code}") from err
        raise
    return job.run_dir


def launch(sweep: Sweep, jobs: list[Job], poll_s: float = 5.0) -> list[tuple[Job, str | None]]:
    """Run ``jobs`` through submitit (or, ``inline``, here); (job, error or None) for each."""
    lc = sweep.launcher
    if lc.cluster == "inline":
        return [(j, _inline(j)) for j in jobs]
    import submitit

    executor = submitit.AutoExecutor(folder=str(sweep.root / "submitit" / "%j"), cluster=lc.cluster)
    params = {"timeout_min": lc.timeout_min, "name": f"icrl-{sweep.name}"}
    if lc.cluster == "slurm":
        params |= {"slurm_array_parallelism": lc.jobs, "cpus_per_task": lc.threads, **lc.slurm}
    executor.update_parameters(**params)
    results: list[tuple[Job, str | None]] = []

    def collect(job: Job, handle) -> None:
        try:
            handle.result()
            results.append((job, None))
        except Exception as err:  # noqa: BLE001 - a failed run is reported, the others go on
            saved = Path(job.run_dir) / "error.txt"  # the run's own traceback, not the launcher's
            lines = (saved.read_text() if saved.is_file() else str(err)).strip().splitlines()
            results.append((job, lines[-1] if lines else type(err).__name__))

    if lc.cluster == "slurm":  # the array's parallelism keeps `jobs` running
        with executor.batch():
            handles = [executor.submit(run_job, j) for j in jobs]
        for j, h in zip(jobs, handles, strict=True):
            collect(j, h)
        return results
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < lc.jobs:
            j = pending.pop(0)
            print(f"start  {j.setting} seed {j.seed}  ({j.run_dir})", flush=True)
            running.append((j, executor.submit(run_job, j)))
        done = [(j, h) for j, h in running if h.done()]
        for j, h in done:
            running.remove((j, h))
            collect(j, h)
            error = results[-1][1]
            print(f"{'FAILED' if error else 'done  '} {j.setting} seed {j.seed}" + (f": {error}" if error else ""),
                  flush=True)
        if not done:
            time.sleep(poll_s)
    return results


def _inline(job: Job) -> str | None:
    print(f"start  {job.setting} seed {job.seed}  ({job.run_dir})", flush=True)
    try:
        run_job(job)
    except Exception as err:  # noqa: BLE001 - a failed run is reported, the others go on
        print(f"FAILED {job.setting} seed {job.seed}: {err}", flush=True)
        return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    print(f"done   {job.setting} seed {job.seed}", flush=True)
    return None


# --- the summary ------------------------------------------------------------------------------------
def report_metrics(report: dict) -> dict[str, float]:
    """The numbers a sweep compares, from one ``report.json``."""
    k = report["last_k"]
    agents = report["agents"]
    out: dict[str, float] = {}
    for agent, s in agents.items():
        out[f"{agent}/last{k}"] = s[f"last{k}"]
        if s.get("regret") is not None:  # bandits: cumulative regret over the trial
            out[f"{agent}/regret"] = s["regret"]
        if agent in ("icrl", "no_context") and s.get("per_map"):
            # Issue 19's measure: the mean return of a trial's last quarter of episodes.
            per_map = np.asarray(s["per_map"], dtype=float)
            out[f"{agent}/last_quarter"] = float(per_map[:, -max(1, per_map.shape[1] // 4):].mean())
    icrl = agents["icrl"]
    for key in ("first_episodes", "goal_found_before_greedy", "greedy_return_if_found", "greedy_after_failure",
                "greedy_after_success", "greedy_repeats_failure", "never_succeeded"):
        if icrl.get(key) is not None:
            out[f"icrl/{key}"] = icrl[key]
    if report.get("scenario") == "stitching":
        for key, value in (icrl.get("stitching") or {}).items():
            if value is not None:
                out[f"icrl/{key}"] = value
        for agent in ("icrl", "no_context"):
            if agents.get(agent, {}).get("per_map"):
                out[f"{agent}/successes"] = float(sum(max(r) > 0 for r in agents[agent]["per_map"]))
        out["icrl/trials"] = float(len(icrl["per_map"]))
    for agent, s in agents.items():
        for p, phase in enumerate(s.get("phases") or []):
            out[f"{agent}/map_{'AB'[p]}_last{k}"] = phase[f"last{k}"]
    if "no_context" in agents and agents["no_context"][f"last{k}"] > 0:  # undefined when it never scores
        out["icrl/context_ratio"] = icrl[f"last{k}"] / agents["no_context"][f"last{k}"]
    return out


def interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % interval of the mean, Student's t; None for one value: one
    seed has no interval)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), None
    t = _T975[len(x) - 2] if len(x) - 1 <= len(_T975) else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(sweep: Sweep) -> dict:
    """Every report of the sweep, grouped by (setting, step, scenario), with mean and interval over seeds."""
    rows = []
    for job_group in _by_setting(plan(sweep)).values():
        first = job_group[0]
        for step in first.steps:
            for scenario in first.scenarios:
                per_seed: dict[int, dict] = {}
                for job in job_group:
                    path = job.report(scenario, step)
                    if path.is_file():
                        per_seed[job.seed] = report_metrics(json.loads(path.read_text()))
                if not per_seed:
                    continue
                keys = sorted(set.intersection(*(set(m) for m in per_seed.values())))
                stats = {key: dict(zip(("mean", "ci95"), interval([m[key] for m in per_seed.values()]), strict=True))
                         for key in keys}
                rows.append({"setting": first.setting, "step": step, "scenario": Path(scenario).stem,
                             "seeds": sorted(per_seed), "metrics": stats,
                             "per_seed": {str(s): m for s, m in sorted(per_seed.items())}})
    return {"sweep": asdict(sweep), "rows": rows}


def _by_setting(jobs: list[Job]) -> dict[str, list[Job]]:
    out: dict[str, list[Job]] = {}
    for j in jobs:
        out.setdefault(j.setting, []).append(j)
    return out


TABLE_METRICS = ("icrl/last10", "no_context/last10", "icrl/context_ratio", "icrl/greedy_return_if_found",
                 "icrl/greedy_after_failure", "icrl/successes", "no_context/successes", "icrl/map_B_last10",
                 "q_learning/last10", "icrl/regret", "no_context/regret", "greedy/regret", "ucb1/regret",
                 "thompson/regret")


def markdown_table(summary: dict) -> str:
    rows = summary["rows"]
    present = [m for m in TABLE_METRICS if any(m in r["metrics"] for r in rows)]
    head = ["setting", "step", "scenario", "seeds", *present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], str(r["step"]), r["scenario"], str(len(r["seeds"]))]
        for m in present:
            s = r["metrics"].get(m)
            if s is None:
                cells.append("-")
            else:  # one seed: the mean alone
                cells.append(f"{s['mean']:.3f}" + ("" if s["ci95"] is None else f" ± {s['ci95']:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_figure(summary: dict, metrics: list[str] | None = None):
    """One panel per scenario: in-context last-10 (solid) and no-context (dashed) by training step,
    a line per setting, error bars = 95 % intervals over seeds; tabular baselines as grey lines.
    When every row is at one step, the settings are the x axis instead (a point each: in context,
    and no context beside it). ``metrics``: one row of panels per report metric instead (e.g.
    ``icrl/goal_found_before_greedy``); ``icrl/last10`` keeps its no-context line and baselines."""
    from icrl_lightning.evaluation.figures import new_figure

    rows = summary["rows"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    one_step = len({r["step"] for r in rows}) == 1
    grid = metrics or [None]
    fig = new_figure(5.2 * max(1, len(scenarios)), 4.0 * len(grid))
    for m, wanted in enumerate(grid):
        for n, scenario in enumerate(scenarios):
            ax = fig.add_subplot(len(grid), len(scenarios), m * len(scenarios) + n + 1)
            _summary_panel(ax, [r for r in rows if r["scenario"] == scenario], scenario, one_step, wanted)
    fig.suptitle(f"sweep {summary['sweep']['name']}: mean and 95 % interval over seeds")
    fig.tight_layout()
    return fig


def _summary_panel(ax, sub: list[dict], scenario: str, one_step: bool, wanted: str | None) -> None:
    stitching = any("icrl/successes" in r["metrics"] for r in sub)
    metric = wanted or ("icrl/successes" if stitching else "icrl/last10")
    no_context = {"icrl/successes": "no_context/successes", "icrl/last10": "no_context/last10"}.get(metric)
    settings = list(dict.fromkeys(r["setting"] for r in sub))
    for c, setting in enumerate(settings):
        pts = sorted((r["step"], r) for r in sub if r["setting"] == setting)
        colour = f"C{c % 10}"
        for key, style in ((metric, "-o"), (no_context, "--")):
            if key is None:
                continue
            if one_step:
                style = "o" if key == metric else "x"
            xs = [(c + (0.15 if key != metric else 0.0)) if one_step else s for s, r in pts if key in r["metrics"]]
            if not xs:
                continue
            ys = [r["metrics"][key]["mean"] for _, r in pts if key in r["metrics"]]
            es = [r["metrics"][key]["ci95"] or 0.0 for _, r in pts if key in r["metrics"]]  # one seed: no bar
            label = setting if key == metric else None
            ax.errorbar(xs, ys, yerr=es, fmt=style, color=colour, capsize=3, label=label, ms=4)
    if metric == "icrl/last10":
        for base, colour in (("q_learning/last10", "0.35"), ("q_optimistic/last10", "0.7")):
            vals = [r["metrics"][base]["mean"] for r in sub if base in r["metrics"]]
            if vals:
                ax.axhline(float(np.mean(vals)), color=colour, lw=1, ls=":", label=base.split("/")[0])
    if one_step:
        ax.set_xticks(range(len(settings)), settings, rotation=20, fontsize=8)
        ax.set_xlabel(f"setting, step {sub[0]['step']}")
    else:
        if len({r["step"] for r in sub}) > 1:
            ax.set_xscale("log")
        ax.set_xlabel("optimizer step")
    if no_context is None:
        ax.set_ylabel(metric)
    else:
        no_ctx = "x: no context" if one_step else "dashed: no context"
        ax.set_ylabel(f"successes ({no_ctx})" if metric == "icrl/successes" else f"last-10 return ({no_ctx})")
    ax.set_title(scenario)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def write_summary(sweep: Sweep) -> dict:
    from rich.console import Console
    from rich.markdown import Markdown

    from icrl_lightning.episodes import write_json_atomic
    from icrl_lightning.evaluation.figures import save

    summary = summarize(sweep)
    root = sweep.root
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(summary, root / "summary.json")
    table = markdown_table(summary)
    (root / "summary.md").write_text(table)
    if summary["rows"]:
        save(summary_figure(summary), root / "summary.png")
    Console(width=200).print(Markdown(table))
    print(f"summary: {root / 'summary.json'}, {root / 'summary.md'}, {root / 'summary.png'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m icrl_lightning.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="the sweep file (YAML; see icrl_lightning.sweep.Sweep)")
    ap.add_argument("--dry-run", action="store_true", help="print each run's commands and what is done, run nothing")
    ap.add_argument("--summary", action="store_true", help="only summarise the reports that exist")
    ap.add_argument("--jobs", type=int, help="override launcher.jobs")
    ap.add_argument("--cluster", choices=CLUSTERS, help="override launcher.cluster")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        if args.jobs is not None:
            sweep.launcher.jobs = args.jobs
        if args.cluster:
            sweep.launcher.cluster = args.cluster
        _check(sweep, Path(args.sweep))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = plan(sweep)
    todo = [j for j in jobs if not j.finished()]
    if args.dry_run:
        for j in jobs:
            state = "done" if j.finished() else "todo"
            print(f"[{state}] {j.setting} seed {j.seed}: {j.command} {' '.join(j.fit_args())}")
            for st in j.steps:
                for sc in j.scenarios:
                    print(f"        {j.command} {' '.join(j.validate_args(sc, st))}")
        return 0
    failed = []
    if todo and not args.summary:
        print(f"sweep {sweep.name}: {len(todo)} of {len(jobs)} runs to do, {sweep.launcher.jobs} at a time "
              f"({sweep.launcher.cluster})", flush=True)
        failed = [(j, e) for j, e in launch(sweep, todo) if e]
    write_summary(sweep)
    for j, e in failed:
        print(f"failed: {j.setting} seed {j.seed}: {e} (see {j.run_dir}/error.txt)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
