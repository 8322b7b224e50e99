"""The real entry point: ``fit`` + ``validate`` smoke run, ``--help``, and every YAML under conf/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from icrl_lightning.cli import main
from icrl_lightning.module import ICRLModule

# In-process runs pass args while pytest owns sys.argv; LightningCLI warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "conf").rglob("*.yaml"))
AGENTS = {"icrl", "no_context", "random", "q_learning", "oracle"}


def _tiny_args(tmp: Path) -> list[str]:
    return [
        "-c", str(REPO / "conf/experiment/quickstart.yaml"),
        "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(tmp / "root"),
        "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
        "--data.num_train_maps", "4",
        "--data.episodes_per_map", "10",
        "--data.seq_len", "256",
        "--data.batch_size", "2",
        "--data.eval_maps", "3",
        "--data.data_dir", str(tmp / "data"),
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


def _repo_datasets() -> set[str]:
    d = REPO / "data" / "episodes"
    return {p.name for p in d.iterdir()} if d.exists() else set()


def test_fit_then_validate(tmp_path):
    repo_datasets = _repo_datasets()
    fit = main(["fit", *_tiny_args(tmp_path)])
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

    val = main(["validate", *_tiny_args(tmp_path), "--ckpt_path", str(ckpts[0])])
    reports = [r for r in _reports(tmp_path) if r["stage"] == "validate"]
    assert len(reports) == 1
    val_report = reports[0]
    _check_report(val_report)
    assert val_report["checkpoint"] == str(ckpts[0])
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


def test_help_through_module_entry_point():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "icrl_lightning", "fit", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--model.alpha", "--model.gamma", "--model.loss", "--data.set_order", "--data.quality",
                 "--data.seq_len", "--model.evaluation"):
        assert flag in out.stdout, flag
    assert "Polyak" in out.stdout  # argument docstrings become the help text


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["fit", "--model.alhpa", "0.1"])
    assert err.value.code != 0


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as err:
        main(args)
    out = capsys.readouterr().out
    assert err.value.code in (0, None), out
    return yaml.safe_load(out)


def test_there_are_configs():
    assert REPO / "conf/experiment/quickstart.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "conf")) for p in CONFIGS])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_every_config_parses(path, subcommand, capsys):
    top = yaml.safe_load(path.read_text()) or {}
    known = {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"}
    if set(top) <= known:
        args = [subcommand, "-c", str(path), "--print_config"]
    else:  # a fragment of one section, e.g. conf/model/*.yaml holding the model's arguments
        section = path.parent.name
        assert section in known, f"{path}: top-level keys {sorted(top)} are neither CLI sections nor a fragment"
        args = [subcommand, f"--{section}", str(path), "--print_config"]
    cfg = _print_config(args, capsys)
    assert {"trainer", "model", "data"} <= set(cfg)
    assert isinstance(cfg["data"]["seq_len"], int)
