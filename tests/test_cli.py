"""The real entry point: ``fit`` + ``validate`` smoke run, ``--help``, and every YAML under conf/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from icrl_lightning.checkpoints import load_module
from icrl_lightning.checks import InputError
from icrl_lightning.cli import ICRLCLI, cpu_bf16_unit, main, resolve_cpu_bf16
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.envs.frozen_lake import make_splits
from icrl_lightning.module import ICRLModule
from icrl_lightning.objective import TD

# In-process runs pass args while pytest owns sys.argv; LightningCLI warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "conf").rglob("*.yaml") if p.parent.name != "sweep")
AGENTS = {"icrl", "no_context", "random", "q_learning", "q_optimistic", "oracle"}


def _tiny_args(tmp: Path, overlays: tuple[str, ...] = ()) -> list[str]:
    """The quickstart config, then ``overlays`` (conf/experiment/ file names), then tiny sizes."""
    layered = [a for o in overlays for a in ("-c", str(REPO / "conf/experiment" / o))]
    return ["-c", str(REPO / "conf/experiment/quickstart.yaml"), *layered,
            "--trainer.logger.init_args.save_dir", str(tmp / "logs"), *_tiny_overrides(tmp)]


def _tiny_overrides(tmp: Path, data_dir: Path | None = None) -> list[str]:
    return [
        "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(tmp / "root"),
        "--data.num_train_maps", "4",
        "--data.episodes_per_map", "10",
        "--data.seq_len", "256",
        "--data.batch_size", "2",
        "--data.eval_maps", "3",
        "--data.data_dir", str(data_dir or tmp / "data"),
        "--model.backbone.hidden_size", "32",
        "--model.backbone.num_layers", "1",
        "--model.backbone.num_heads", "2",
        "--model.backbone.intermediate_size", "64",
        # max_context 0 = the trained seq_len (256 tokens): it holds two 30-step compact episodes.
        "--model.evaluation.max_context", "0",
        "--model.evaluation.max_episode_steps", "30",
    ]


def _reports(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"_path": str(p)} for p in sorted((tmp / "logs").rglob("report.json"))]


def _check_report(report: dict) -> None:
    assert set(report["agents"]) == AGENTS
    assert report["n_maps"] == 3 and report["n_episodes"] == 30
    for name, summary in report["agents"].items():
        assert len(summary["mean_return"]) == 30, name
        assert all(0.0 <= r <= 1.0 for r in summary["mean_return"]), name
        assert len(summary["per_map"]) == 3
    # The BFS oracle is greedy for the last ten episodes: it always reaches the goal then.
    assert report["agents"]["oracle"]["mean_return"][-10:] == [1.0] * 10
    assert len(report["trajectories"]) == 3 and all(len(t) == 30 for t in report["trajectories"])
    assert all(len(ep) <= 31 for traj in report["trajectories"] for ep in traj)  # 30-step limit
    for png in ("curves.png", "trajectories.png"):  # the figures lie next to the report
        assert (Path(report["_path"]).parent / png).stat().st_size > 0


def _repo_datasets() -> set[str]:
    d = REPO / "data" / "episodes"
    return {p.name for p in d.iterdir()} if d.exists() else set()


def _our_warnings(caught) -> list[str]:
    """What the quickstart's path warns that a user would see, or that our own code triggers: every
    warning except deprecations raised inside third-party code (Python hides those), LightningCLI's
    note that these in-process runs pass args while pytest owns sys.argv (not from a shell), and
    Lightning's note that 3 training batches are fewer than the logging interval (tiny runs only)."""
    package = str(REPO / "icrl_lightning")
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
            if not (issubclass(w.category, DeprecationWarning) and not w.filename.startswith(package))
            and not str(w.message).startswith(("LightningCLI's args parameter", "The number of training batches"))]


def test_fit_then_validate(tmp_path):
    repo_datasets = _repo_datasets()
    # A clean terminal: every warning shown (not only the first of each), none on the quickstart's path.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = main(["fit", *_tiny_args(tmp_path)])
    assert not _our_warnings(caught), _our_warnings(caught)
    assert fit.trainer.global_step == 3
    reports = _reports(tmp_path)
    assert len(reports) == 1
    fit_report = reports[0]
    _check_report(fit_report)
    assert fit_report["stage"] == "fit" and fit_report["global_step"] == 3
    assert fit.model.hparams.seq_len == 256  # linked from data.seq_len
    ckpts = list((tmp_path / "logs").rglob("last.ckpt"))
    assert len(ckpts) == 1
    # The dataset was built under tmp, not in the repository's data/.
    assert list((tmp_path / "data" / "episodes").glob("*/manifest.json"))
    assert _repo_datasets() == repo_datasets

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        val = main(["validate", *_tiny_args(tmp_path), "--ckpt_path", str(ckpts[0])])
    assert not _our_warnings(caught), _our_warnings(caught)
    reports = [r for r in _reports(tmp_path) if r["stage"] == "validate"]
    assert len(reports) == 1
    val_report = reports[0]
    _check_report(val_report)
    assert val_report["checkpoint"] == str(ckpts[0]) and val_report["checkpoint_step"] == 3
    assert val_report["_path"] != fit_report["_path"]
    # The checkpoint restored the trained weights and the target network exactly ...
    trained, restored = fit.model.state_dict(), val.model.state_dict()
    assert trained.keys() == restored.keys()
    assert any(k.startswith("target_") for k in trained)
    for k in trained:
        assert torch.equal(trained[k], restored[k]), k
    # ... so the evaluation (same seed) plays exactly as at the end of fit.
    for agent in AGENTS:
        assert val_report["agents"][agent]["per_map"] == fit_report["agents"][agent]["per_map"], agent
    # The checkpoint also loads on its own, sizes and all (hyperparameters travel with it).
    loaded = ICRLModule.load_from_checkpoint(str(ckpts[0]))
    assert loaded.backbone_spec.hidden_size == 32 and loaded.hparams.seq_len == 256
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_validate_without_a_checkpoint_says_untrained(tmp_path, capsys):
    main(["validate", *_tiny_args(tmp_path), *SHORT])
    assert "evaluates an UNTRAINED model" in capsys.readouterr().err
    (report,) = _reports(tmp_path)
    assert report["untrained"] is True and report["checkpoint"] is None


def test_help_through_module_entry_point():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "icrl_lightning", "fit", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--model.target.alpha", "--model.td.gamma", "--model.td.loss", "--model.td.conflict_weight",
                 "--model.cql.help", "--data.set_order", "--data.quality", "--data.seq_len", "--model.evaluation",
                 "--data.env", "--data.behaviour", "--cpu_bf16"):
        assert flag in out.stdout, flag
    assert "Polyak" in out.stdout  # argument docstrings become the help text


def test_cpu_bf16_unit_reads_the_bf16_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    assert cpu_bf16_unit(str(info)) is None  # AVX-512 without its BF16 extension does not count
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_bf16_unit(str(info)) == "avx512_bf16"  # e.g. an AMD EPYC of the Zen 4 generation
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_bf16_unit(str(info)) == "amx_bf16"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2\nbugs\t\t: avx512_bf16\n")
    assert cpu_bf16_unit(str(info)) is None  # only the flags line counts
    assert cpu_bf16_unit(str(tmp_path / "absent")) is None


@pytest.mark.parametrize(("unit", "accelerator", "precision", "force", "want"), [
    ("amx_bf16", "cpu", "32-true", False, "bf16-mixed"),
    ("avx512_bf16", "cpu", "32-true", False, "bf16-mixed"),
    ("amx_bf16", "auto", None, False, "bf16-mixed"),
    (None, "cpu", "32-true", False, None),
    (None, "cpu", "32-true", True, "bf16-mixed"),  # true: on any CPU
    ("amx_bf16", "cpu", "64-true", False, None),    # another precision than float32 is the user's choice
    ("amx_bf16", "cpu", "bf16-mixed", True, None),
    ("amx_bf16", "gpu", "32-true", True, None),     # not a CPU run
])
def test_resolve_cpu_bf16(monkeypatch, unit, accelerator, precision, force, want):
    monkeypatch.setattr("icrl_lightning.cli.cpu_bf16_unit", lambda: unit)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_cpu_bf16(accelerator, precision, force=force) == want


@pytest.mark.parametrize("unit", ["amx_bf16", None])
def test_cpu_bf16_auto_trains_and_evaluates_in_the_resolved_precision(tmp_path, monkeypatch, unit):
    """Through the real entry point: the fit's report and its saved config.yaml say what ran; the
    saved config re-runs as it ran (cpu_bf16 false), and validate resolves the same way."""
    monkeypatch.setattr("icrl_lightning.cli.cpu_bf16_unit", lambda: unit)
    main(["fit", *_tiny_args(tmp_path), "--trainer.max_steps", "1", "--cpu_bf16", "auto"])
    (report,) = _reports(tmp_path)
    want = "bf16-mixed" if unit else "32-true"
    assert report["config"]["trainer"]["precision"] == want
    (saved,) = (tmp_path / "logs").rglob("config.yaml")
    config = yaml.safe_load(saved.read_text())
    assert config["cpu_bf16"] is False and config["trainer"]["precision"] == want
    ckpt = str(next((tmp_path / "logs").rglob("last.ckpt")))
    main(["validate", "-c", str(saved), "--trainer.logger.init_args.save_dir", str(tmp_path / "v" / "logs"),
          "--cpu_bf16", "auto", "--ckpt_path", ckpt])
    (report,) = _reports(tmp_path / "v")
    assert report["config"]["trainer"]["precision"] == want


@pytest.mark.parametrize("text", ["cpu_bf16: off", "cpu_bf16: false", "cpu_bf16: auto"])
def test_cpu_bf16_in_a_yaml(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text + "\n")
    cli = ICRLCLI(ICRLModule, ReplayDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                  args=[*_tiny_args(tmp_path), "-c", str(tmp_path / "c.yaml")])
    assert cli.config["cpu_bf16"] is False  # auto was resolved (and the resolution saved)


def test_only_fit_and_validate_are_offered(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "validate" in out
    assert "test" not in out.split("{")[1].split("}")[0] and "predict" not in out
    with pytest.raises(SystemExit) as err:
        main(["test"])
    assert err.value.code == 2


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["fit", "--model.alhpa", "0.1"])
    assert err.value.code != 0


def test_there_are_configs():
    assert REPO / "conf/experiment/quickstart.yaml" in CONFIGS


QUICKSTART = REPO / "conf/experiment/quickstart.yaml"
OVERLAY_PREFIXES = ("eval_", "quality_", "long", "permuted", "q7", "q8")
_QUICKSTART_CFG: dict[str, dict] = {}


def _is_overlay(path: Path) -> bool:
    """Overlays are layered on a full experiment config: conf/experiment/eval_*.yaml, quality_*.yaml,
    long.yaml, permuted.yaml, q7.yaml and q8.yaml (evaluation scenarios, data-quality runs, the long
    recipe, permuted observation tokens, the quickstarts of sessions 30-34 and 35-39) and every YAML
    with CLI sections outside conf/experiment/ (e.g. conf/model/*.yaml). Everything else in
    conf/experiment/ is a full experiment."""
    if path.parent.name == "experiment":
        return path.name.startswith(OVERLAY_PREFIXES)
    return True


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "conf")) for p in CONFIGS])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_every_config_parses(path, subcommand, print_config):
    top = yaml.safe_load(path.read_text()) or {}
    known = {"seed_everything", "cpu_bf16", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"}
    if set(top) <= known:
        base = ["-c", str(QUICKSTART)] if _is_overlay(path) else []
        args = [subcommand, *base, "-c", str(path), "--print_config"]
    else:  # a fragment of one section, e.g. conf/model/*.yaml holding the model's arguments
        section = path.parent.name
        assert section in known, f"{path}: top-level keys {sorted(top)} are neither CLI sections nor a fragment"
        args = [subcommand, "-c", str(QUICKSTART), f"--{section}", str(path), "--print_config"]
    cfg = print_config(args)
    assert {"trainer", "model", "data"} <= set(cfg)
    assert isinstance(cfg["data"]["seq_len"], int)
    if path.name.startswith(OVERLAY_PREFIXES):
        # An overlay changes what it names and keeps the rest of the experiment; its runs get their own
        # logger name (never the training run's folder).
        assert cfg["trainer"]["logger"]["init_args"]["name"] == path.stem
        assert cfg["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")
        if subcommand not in _QUICKSTART_CFG:
            _QUICKSTART_CFG[subcommand] = print_config([subcommand, "-c", str(QUICKSTART), "--print_config"])
        assert cfg["model"]["backbone"] == _QUICKSTART_CFG[subcommand]["model"]["backbone"]
        for section in ("data", "model"):
            for key, value in (top.get(section) or {}).items():
                if key != "evaluation":
                    assert cfg[section][key] == value, (section, key)
        for key, value in ((top.get("model") or {}).get("evaluation") or {}).items():
            assert cfg["model"]["evaluation"][key] == value, key


def test_model_overlay_composes_with_the_quickstart_recipe(print_config):
    """A model overlay sets the model, not the experiment's objective: the quickstart's penalty and
    conflict weight survive it (they did not compose when the overlay set the penalty off)."""
    cfg = print_config(["fit", "-c", str(QUICKSTART), "-c", str(REPO / "conf/model/smollm2_135m_ia3.yaml"),
                        "--print_config"])
    base = print_config(["fit", "-c", str(QUICKSTART), "--print_config"])
    assert cfg["model"]["cql"] == base["model"]["cql"] == {"weight": 10.0, "episodes": "successful"}
    assert cfg["model"]["td"] == base["model"]["td"]
    assert cfg["model"]["teacher"] == base["model"]["teacher"] == {"weight": 3.0, "margin": 0.1}
    assert cfg["model"]["pretrained"]["adapter"] == "ia3"


def test_sweep_files_load():
    from icrl_lightning.sweep import load_sweep, plan

    sweeps = sorted((REPO / "conf/sweep").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        jobs = plan(load_sweep(path))
        assert jobs and all(j.steps for j in jobs), path


# --- evaluation scenarios, periodic evaluation and the comparison command ---------------------------
SHORT = ["--model.evaluation.schedule", "[0.0, 0.5, 1.0]"]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """Two tiny checkpoints trained for 2 steps on high- and low-quality data (the quality overlays),
    sharing one dataset."""
    root = tmp_path_factory.mktemp("quality")
    out = {"data": root / "data", "ckpt": {}}
    for q in ("high", "low"):
        main(["fit", *_tiny_args(root, (f"quality_{q}.yaml",)), "--trainer.max_steps", "2",
              "--data.data_dir", str(out["data"]), *SHORT])
        (ckpt,) = (root / "logs" / f"quality_{q}").rglob("last.ckpt")
        hp = torch.load(ckpt, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
        assert hp["quality"] == q
        out["ckpt"][q] = str(ckpt)
    return out


@pytest.mark.parametrize("overlay", ["eval_heldout", "eval_ood", "eval_nonstationary", "eval_stitching",
                                     "eval_stitching_layouts", "eval_user_maps", "eval_selection", "eval_gym",
                                     "eval_gym_ood"])
def test_scenario_overlay_validates(tiny_checkpoints, overlay, tmp_path):
    ckpt = tiny_checkpoints["ckpt"]["high"]
    extra = ["--data.data_dir", str(tiny_checkpoints["data"]), "--data.eval_maps", "3"]
    stitching = overlay.startswith("eval_stitching")
    if stitching:
        name = "stitching_layouts" if overlay == "eval_stitching_layouts" else "stitching"
        extra += ["--model.evaluation.stitching_file", str(REPO / f"data/{name}.json")]
    else:
        extra += SHORT
    user_maps = [["SFFH", "FHFF", "FFFG"], ["SFF", "FHF", "FFG"]]
    if overlay == "eval_user_maps":
        (tmp_path / "my_maps.json").write_text(json.dumps(user_maps))
        extra += ["--data.eval_map_file", str(tmp_path / "my_maps.json")]
    gym_file = REPO / "data" / ("gym_maps_ood.json" if overlay == "eval_gym_ood" else "gym_maps.json")
    if overlay.startswith("eval_gym"):  # the overlay's own file, from wherever the test runs
        extra += ["--data.eval_map_file", str(gym_file)]
    main(["validate", *_tiny_args(tmp_path, (f"{overlay}.yaml",)), *extra, "--ckpt_path", ckpt])
    (path,) = (tmp_path / "logs" / overlay).rglob("report.json")  # the overlay names the run
    report = json.loads(path.read_text())
    assert report["checkpoint"] == ckpt and report["stage"] == "validate"
    assert (path.parent / "curves.png").stat().st_size > 0 and (path.parent / "trajectories.png").stat().st_size > 0
    assert set(report["agents"]) == AGENTS
    assert report["config"]["model"]["backbone"]["hidden_size"] == 32
    # The quickstart's cpu_bf16: auto, as this machine resolves it.
    assert report["config"]["trainer"]["precision"] == ("bf16-mixed" if cpu_bf16_unit() else "32-true")
    scenario = "stitching" if stitching else {"eval_nonstationary": "nonstationary"}.get(overlay, "standard")
    assert report["scenario"] == scenario == report["protocol"]["scenario"]
    sizes = {(len(m), len(m[0])) for m in report["maps"]}
    if overlay == "eval_ood":
        assert report["config"]["data"]["eval_split"] == "ood"
        assert all(6 <= h <= 7 and 6 <= w <= 7 for h, w in sizes)
    elif overlay == "eval_user_maps":
        assert report["maps"] == user_maps and report["n_maps"] == 2
    elif overlay.startswith("eval_gym"):
        assert report["maps"] == json.loads(gym_file.read_text()) and report["n_maps"] == 50
        assert report["config"]["data"]["eval_map_file"] == str(gym_file)
    elif overlay == "eval_stitching":
        assert report["n_maps"] == 5 and report["n_episodes"] == 1
        assert report["agents"]["oracle"]["per_map"] == [[1.0]] * 5
        assert len(report["context"]) == 5 and all(len(c) == 2 for c in report["context"])
    elif overlay == "eval_stitching_layouts":  # one trial on each layout of the file
        layouts = json.loads((REPO / "data/stitching_layouts.json").read_text())
        assert report["n_maps"] == len(layouts) and report["n_episodes"] == 1
        assert report["maps"] == [x["map"] for x in layouts]
        assert report["agents"]["oracle"]["per_map"] == [[1.0]] * len(layouts)
    else:
        assert all(3 <= h <= 5 and 3 <= w <= 5 for h, w in sizes) and report["n_maps"] == 3
        first = 50 if overlay == "eval_selection" else 0  # the selection maps follow the reported 50
        assert report["maps"] == [list(m) for m in make_splits(0, 0).heldout[first:first + 3]]
    if overlay == "eval_nonstationary":
        assert report["n_episodes"] == 6 and report["switch_to"] == report["maps"][1:] + report["maps"][:1]
        assert report["agents"]["oracle"]["mean_return"][2] == 1.0 == report["agents"]["oracle"]["mean_return"][5]


def test_contradicting_trainer_settings_are_one_line(tmp_path, capsys):
    # Lightning's MisconfigurationException (here: no progress bar, but the quickstart's
    # RichProgressBar callback) is a configuration error: one line, no traceback, status 2.
    with pytest.raises(SystemExit) as exc:
        main(["fit", *_tiny_args(tmp_path), "--trainer.enable_progress_bar", "false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Trainer was configured with `enable_progress_bar=False`")
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.mark.parametrize("cross_gamma", [0.0, 0.5])
def test_validate_a_checkpoint_that_saved_a_removed_option(tiny_checkpoints, tmp_path, capsys, cross_gamma):
    # Checkpoints of older versions save model.td.cross_gamma (removed, docs/results.md); off, they
    # evaluate as they are; on, the command says so in one line.
    ckpt = torch.load(tiny_checkpoints["ckpt"]["high"], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["td"] = {"gamma": 0.9, "reward_scale": 30.0, "loss": "mse", "conflict_weight": 1.0,
                                      "cross_gamma": cross_gamma}
    torch.save(ckpt, tmp_path / "old.ckpt")
    args = ["validate", *_tiny_args(tmp_path), "--data.data_dir", str(tiny_checkpoints["data"]), *SHORT,
            "--ckpt_path", str(tmp_path / "old.ckpt")]
    if cross_gamma:
        with pytest.raises(SystemExit):
            main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: model.td.cross_gamma=0.5: ") and "removed" in err[0]
        with pytest.raises(InputError, match=r"model\.td\.cross_gamma=0\.5: "):
            load_module(tmp_path / "old.ckpt")  # the tools' loader (Lightning's instantiator path)
        return
    cli = main(args)
    assert cli.model.td == TD() and list((tmp_path / "logs").rglob("report.json"))
    assert load_module(tmp_path / "old.ckpt").td == TD()


def test_a_checkpoint_saved_before_the_teacher_existed_runs_without_it(tiny_checkpoints, tmp_path):
    # Hyper-parameters saved before model.teacher existed lack the key; those runs trained without
    # it, so the quickstart's teacher stays off under them (validate, fit --ckpt_path).
    ckpt = torch.load(tiny_checkpoints["ckpt"]["high"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"].pop("teacher") == {"weight": 3.0, "margin": 0.1}
    torch.save(ckpt, tmp_path / "old.ckpt")
    args = ["validate", *_tiny_args(tmp_path), "--data.data_dir", str(tiny_checkpoints["data"]), *SHORT]
    assert main(args + ["--ckpt_path", tiny_checkpoints["ckpt"]["high"]]).model.teacher is not None
    cli = main(args + ["--ckpt_path", str(tmp_path / "old.ckpt")])
    assert cli.model.teacher is None and "teacher" not in cli.model.batch_fields
    assert load_module(tmp_path / "old.ckpt").teacher is None


def test_periodic_evaluation_logs_curve_figure(tiny_checkpoints, tmp_path):
    """``--trainer.val_check_interval N`` evaluates every N training batches; each evaluation logs the
    curve scalars and the curve figure to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["fit", *_tiny_args(tmp_path), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--data.data_dir", str(tiny_checkpoints["data"]), *SHORT])
    (events,) = (tmp_path / "logs").rglob("events.out.tfevents*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("val/curve")] == [2, 4]  # the figure at the optimizer step
    # Lightning logs validation scalars at its own step counter (one behind here): two evaluations.
    assert len(acc.Scalars("val_curve/return_ep02")) == 2 == len(acc.Scalars("val/icrl_last10"))


def test_compare_checkpoints_into_one_figure(tiny_checkpoints, tmp_path):
    from icrl_lightning.compare import combine
    from icrl_lightning.compare import main as compare

    ck = tiny_checkpoints["ckpt"]
    out = tmp_path / "cmp"
    overrides = [*_tiny_overrides(tmp_path, tiny_checkpoints["data"]), *SHORT]
    record = compare(["--ckpt", ck["high"], ck["low"], "--labels", "high", "low",
                      "-c", str(REPO / "conf/experiment/quickstart.yaml"), "--out", str(out), "--", *overrides])
    saved = json.loads((out / "compare.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["labels"] == ["high", "low"] and saved["n_maps"] == 3 and saved["n_episodes"] == 3
    assert [saved["runs"][q]["checkpoint"] for q in ("high", "low")] == [ck["high"], ck["low"]]
    assert set(saved["runs"]["high"]["agents"]) == {"icrl", "no_context"}
    assert set(saved["baselines"]) == {"random", "q_learning", "q_optimistic", "oracle"}
    assert saved["baselines"]["oracle"]["mean_return"][-1] == 1.0
    assert (out / "compare.png").stat().st_size > 0
    reports = {q: json.loads(Path(saved["runs"][q]["report"]).read_text()) for q in ("high", "low")}
    assert all(r["checkpoint"] == ck[q] for q, r in reports.items())
    # Combining the written reports gives the same record; reports of other maps are refused.
    again = compare(["--reports", saved["runs"]["high"]["report"], saved["runs"]["low"]["report"],
                     "--labels", "high", "low", "--out", str(tmp_path / "again")])
    assert again["runs"]["low"]["agents"] == saved["runs"]["low"]["agents"]
    other = {**reports["low"], "maps": reports["low"]["maps"][::-1]}
    with pytest.raises(InputError, match="different maps"):
        combine({"high": reports["high"], "low": other})
