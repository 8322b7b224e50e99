"""The multi-seed runner: sweep files checked with one-line errors, the plan, a tiny sweep run in
this process (``launcher.cluster: inline``) that is resumable and reports a failed run, and the
summary's mean and 95 % interval over seeds against hand computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from icrl_lightning.checks import InputError
from icrl_lightning.sweep import interval, load_sweep, main, markdown_table, plan, report_metrics, summarize

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "conf/experiment/quickstart.yaml")
TINY = {"data.num_train_maps": 4, "data.episodes_per_map": 10, "data.seq_len": 256, "data.batch_size": 2,
        "data.eval_maps": 2, "model.backbone.hidden_size": 32, "model.backbone.num_layers": 1,
        "model.backbone.num_heads": 2, "model.backbone.intermediate_size": 64,
        "model.backbone.max_position_embeddings": 512, "model.evaluation.max_episode_steps": 30,
        "model.evaluation.schedule": [0.0, 1.0]}

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


def _write(tmp: Path, doc) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


BAD = [
    ("name: x\n", "'configs' is required"),
    ({"name": "x", "configs": [QUICKSTART], "seedz": [0]}, "unknown key(s) ['seedz']"),
    ({"name": "x", "configs": ["nope.yaml"]}, "config nope.yaml does not exist"),
    ({"name": "x", "configs": [QUICKSTART], "seeds": [0, 0]}, "seeds=[0, 0] must be distinct non-negative integers"),
    ({"name": "x", "configs": [QUICKSTART], "steps": [0]}, "steps=[0] must be positive integers"),
    ({"name": "x", "configs": [QUICKSTART], "scenarios": ["moon"]}, "scenario 'moon'"),
    ({"name": "x", "configs": [QUICKSTART], "settings": {"a": 3}}, "settings.a must be a mapping of overrides"),
    ({"name": "x", "configs": [QUICKSTART], "launcher": {"cluster": "cloud"}},
     "launcher.cluster='cloud': choose one of ['local', 'slurm', 'inline']"),
    ({"name": "x", "configs": [QUICKSTART], "launcher": {"gpus": 1}}, "launcher takes"),
    ("name: [x\n", "is not valid YAML"),
    ("- 1\n", "expected a mapping"),
]


@pytest.mark.parametrize(("doc", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_sweep_file_is_one_line(tmp_path, doc, message, capsys):
    path = _write(tmp_path, doc)
    with pytest.raises(InputError, match=None) as err:
        load_sweep(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert main([str(path)]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("error: sweep file") and len(out.splitlines()) == 1


def test_missing_sweep_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="is a folder"):
        load_sweep(tmp_path)


def test_plan_and_commands(tmp_path):
    doc = {"name": "p", "configs": [QUICKSTART], "seeds": [3, 4], "steps": [200, 600],
           "settings": {"base": {}, "maps": {"data.num_train_maps": 2500}}, "scenarios": ["heldout", "ood"],
           "out_dir": str(tmp_path)}
    jobs = plan(load_sweep(_write(tmp_path, doc)))
    assert [(j.setting, j.seed) for j in jobs] == [("base", 3), ("base", 4), ("maps", 3), ("maps", 4)]
    fit = jobs[2].fit_args()
    assert fit[:3] == ["fit", "-c", QUICKSTART]
    for arg in ("--data.num_train_maps=2500", "--seed_everything=3", "--data.seed=3", "--trainer.max_steps=600",
                "--trainer.limit_val_batches=0", "--trainer.callbacks.every_n_train_steps=200"):
        assert arg in fit, arg
    val = jobs[2].validate_args("ood", 200)
    assert val[val.index("-c", 2) + 1] == "conf/experiment/eval_ood.yaml"  # right after the configs
    assert val[-1] == f"--ckpt_path={jobs[2].checkpoint(200)}"
    # Without steps, each setting's own max_steps (the quickstart's, or its override).
    doc["settings"]["short"] = {"steps": [100, 50]}  # a setting's own steps
    assert {j.setting: j.steps for j in plan(load_sweep(_write(tmp_path, doc)))}["short"] == [50, 100]
    doc["settings"]["short"] = {"steps": 7}
    with pytest.raises(InputError, match=r"settings.short.steps=7 must be a list of positive integers"):
        load_sweep(_write(tmp_path, doc))
    doc["settings"].pop("short")
    doc.pop("steps")
    doc["settings"]["long"] = {"trainer.max_steps": 900}
    own = yaml.safe_load(Path(QUICKSTART).read_text())["trainer"]["max_steps"]
    assert {j.setting: j.steps for j in plan(load_sweep(_write(tmp_path, doc)))} == {
        "base": [own], "maps": [own], "long": [900]}


def test_interval_is_students_t():
    mean, half = interval([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert interval([0.7]) == (0.7, None)  # one seed has no interval
    one = {"rows": [{"setting": "a", "step": 1, "scenario": "heldout", "seeds": [0],
                     "metrics": {"icrl/last10": {"mean": 0.5, "ci95": None}}}]}
    assert "| a | 1 | heldout | 1 | 0.500 |" in markdown_table(one)


def _report(last10: float, no_ctx: float, scenario: str = "standard") -> dict:
    agents = {"icrl": {"last10": last10, "first_episodes": 0.1, "goal_found_before_greedy": 0.8,
                       "greedy_return_if_found": last10, "greedy_after_failure": None,
                       "per_map": [[0.0, 1.0], [0.0, 0.0]]},
              "no_context": {"last10": no_ctx, "per_map": [[0.0, 0.0], [0.0, 0.0]]}, "q_learning": {"last10": 0.486}}
    return {"last_k": 10, "scenario": scenario, "agents": agents}


def test_report_metrics_and_summary(tmp_path):
    doc = {"name": "s", "configs": [QUICKSTART], "seeds": [0, 1, 2], "steps": [600],
           "scenarios": ["heldout", "stitching"], "out_dir": str(tmp_path)}
    sweep = load_sweep(_write(tmp_path, doc))
    jobs = plan(sweep)
    for job, (a, b) in zip(jobs, [(0.4, 0.1), (0.5, 0.2), (0.6, 0.3)], strict=True):
        for scenario in ("heldout", "stitching"):
            path = job.report(scenario, 600)
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(_report(a, b, "stitching" if scenario == "stitching" else "standard")))
    m = report_metrics(_report(0.4, 0.1, "stitching"))
    assert m["icrl/successes"] == 1.0 and m["icrl/trials"] == 2.0 and m["icrl/context_ratio"] == pytest.approx(4.0)
    assert m["no_context/successes"] == 0.0
    with_paths = _report(0.4, 0.1, "stitching")
    with_paths["agents"]["icrl"]["stitching"] = {"reached_success_path": 0.5, "success_if_reached": None,
                                                 "known_hole": 0.25}
    m = report_metrics(with_paths)
    assert m["icrl/reached_success_path"] == 0.5 and m["icrl/known_hole"] == 0.25
    assert "icrl/success_if_reached" not in m
    assert "icrl/greedy_after_failure" not in m  # None values are left out
    rows = summarize(sweep)["rows"]
    assert [(r["scenario"], r["seeds"]) for r in rows] == [("heldout", [0, 1, 2]), ("stitching", [0, 1, 2])]
    s = rows[0]["metrics"]["icrl/last10"]
    assert s["mean"] == pytest.approx(0.5) and s["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert rows[0]["per_seed"]["2"]["no_context/last10"] == 0.3


def test_tiny_sweep_runs_resumes_and_reports_failures(tmp_path, capsys):
    data = str(tmp_path / "data")
    doc = {"name": "t", "configs": [QUICKSTART], "seeds": [0, 1], "steps": [2],
           "settings": {"ok": {**TINY, "data.data_dir": data},
                        "broken": {**TINY, "data.data_dir": data, "model.td.gamma": 2.0}},
           "out_dir": str(tmp_path / "sweeps"), "launcher": {"cluster": "inline"}}
    path = _write(tmp_path, doc)
    assert main([str(path)]) == 1  # the broken setting failed; the others ran
    err = capsys.readouterr().err
    assert "failed: broken seed 0: " in err and "model.td.gamma=2.0 is out of range" in err
    root = tmp_path / "sweeps" / "t"
    assert "model.td.gamma=2.0" in (root / "broken" / "seed0" / "error.txt").read_text()
    summary = json.loads((root / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["setting"] == "ok" and row["seeds"] == [0, 1] and "icrl/last10" in row["metrics"]
    assert (root / "summary.png").stat().st_size > 0
    assert "| ok | 2 | heldout | 2 |" in (root / "summary.md").read_text()
    # Resumable: finished runs are skipped; a longer schedule continues the same fit from its checkpoint.
    done = next(j for j in plan(load_sweep(path)) if j.setting == "ok")
    mtime = done.report("heldout", 2).stat().st_mtime_ns
    doc["steps"] = [2, 3]
    doc["settings"].pop("broken")
    path = _write(tmp_path, doc)
    assert main([str(path)]) == 0
    assert done.report("heldout", 2).stat().st_mtime_ns == mtime  # not evaluated again
    for job in plan(load_sweep(path)):
        assert job.finished() and job.checkpoint(3).is_file() and job.checkpoint(2).is_file()
    assert main([str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("[done]") == 2
    # tools/sweep_figure.py draws some settings of the summary.
    out = subprocess.run([sys.executable, str(REPO / "tools/sweep_figure.py"), str(root / "summary.json"), "--settings",
                          "ok", "--out", str(tmp_path / "fig.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "fig.png").stat().st_size > 0 and "| ok | 3 | heldout | 2 |" in out.stdout


def test_summary_figure_puts_settings_on_the_x_axis_when_all_rows_share_one_step():
    from icrl_lightning.sweep import summary_figure

    def row(setting, step, mean):
        return {"setting": setting, "step": step, "scenario": "heldout", "seeds": [0, 1],
                "metrics": {"icrl/last10": {"mean": mean, "ci95": 0.1},
                            "no_context/last10": {"mean": 0.1, "ci95": None}}}

    one = summary_figure({"sweep": {"name": "s"}, "rows": [row("a", 100, 0.5), row("b", 100, 0.6)]})
    ax = one.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"] and ax.get_xlabel() == "setting, step 100"
    many = summary_figure({"sweep": {"name": "s"}, "rows": [row("a", 100, 0.5), row("a", 400, 0.6)]})
    assert many.axes[0].get_xlabel() == "optimizer step" and many.axes[0].get_xscale() == "log"


def test_summary_figure_draws_one_row_of_panels_per_metric(tmp_path):
    from icrl_lightning.sweep import summary_figure

    def row(scenario, step, found):
        return {"setting": "a", "step": step, "scenario": scenario, "seeds": [0, 1],
                "metrics": {"icrl/last10": {"mean": 0.5, "ci95": 0.1}, "no_context/last10": {"mean": 0.1, "ci95": 0.0},
                            "icrl/goal_found_before_greedy": {"mean": found, "ci95": 0.05}}}

    rows = [row(sc, st, f) for sc in ("heldout", "ood") for st, f in ((100, 0.7), (400, 0.8))]
    fig = summary_figure({"sweep": {"name": "s"}, "rows": rows}, ["icrl/last10", "icrl/goal_found_before_greedy"])
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == ["heldout", "ood", "heldout", "ood"]
    # last-10 keeps its no-context line (two lines); the other metric is drawn alone, by step.
    assert len(fig.axes[0].lines) > len(fig.axes[2].lines)
    assert fig.axes[2].get_ylabel() == "icrl/goal_found_before_greedy"
    (line,) = [ln for ln in fig.axes[2].lines if ln.get_linestyle() == "-"]
    assert list(line.get_ydata()) == [0.7, 0.8] and list(line.get_xdata()) == [100, 400]
    # tools/sweep_figure.py: --metrics draws them, and names an unknown one.
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"sweep": {"name": "s"}, "rows": rows}))
    tool = [sys.executable, str(REPO / "tools/sweep_figure.py"), str(path), "--out", str(tmp_path / "f.png")]
    ok = subprocess.run([*tool, "--metrics", "icrl/goal_found_before_greedy"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*tool, "--metrics", "icrl/nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--metrics icrl/nope: not in the summary's rows" in bad.stderr
