"""Two processes (gloo, CPU): in-context evaluation, and fit through the CLI with the ddp preset.
Slow: each run spawns two Python processes.

Each scenario runs in its own subprocess with a timeout, so a collective that never completes
fails the test instead of hanging the suite. What a subprocess runs beside the package (a script,
a callback module) is written into its working folder, which Python puts on its path."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L
    import torch
    from icrl_lightning.backbones import TinyLlama
    from icrl_lightning.callbacks import InContextReport
    from icrl_lightning.data import ReplayDataModule
    from icrl_lightning.evaluation import EvalProtocol
    from icrl_lightning.module import ICRLModule

    OUT, N_MAPS, USE_REPORT = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    SIZES, DATA = json.loads(sys.argv[4]), json.loads(sys.argv[5])  # the tests' tiny sizes and data

    class Dump(L.Callback):
        """Saves rank 0's report without touching trainer.log_dir (a collective)."""

        def on_validation_end(self, trainer, pl_module):
            if trainer.global_rank == 0 and pl_module.eval_report is not None:
                r = pl_module.eval_report
                with open(OUT + "/dump.json", "w") as f:
                    json.dump({"n_maps": r["n_maps"], "maps": r["maps"],
                               "per_map": r["agents"]["oracle"]["per_map"]}, f)

    if __name__ == "__main__":
        torch.manual_seed(0)
        protocol = EvalProtocol(schedule=[0.5, 1.0], max_episode_steps=10, no_context=False, baselines=True)
        module = ICRLModule(backbone=TinyLlama(**SIZES), seq_len=256, evaluation=protocol)
        dm = ReplayDataModule(**{**DATA, "data_dir": OUT + "/data", "eval_maps": N_MAPS})
        dm.set_serializer(module.serializer, module.batch_fields)
        callbacks = [Dump()] + ([InContextReport()] if USE_REPORT else [])
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=OUT,
                            callbacks=callbacks)
        trainer.validate(module, datamodule=dm)
''')


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def run_validate(tmp_path, tiny_sizes, tiny_data_args):
    """``run_validate(n_maps, use_report)``: a 2-process ``validate`` of a fresh tiny module, in ``tmp_path``."""

    def run(n_maps: int, use_report: bool) -> subprocess.CompletedProcess:
        script = tmp_path / "run_ddp.py"
        script.write_text(SCRIPT)
        args = [str(tmp_path), str(n_maps), "1" if use_report else "0", json.dumps(tiny_sizes),
                json.dumps(tiny_data_args)]
        return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=300)

    return run


def _dump(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "dump.json").read_text())


@pytest.mark.slow
def test_ddp_evaluation_even_split(tmp_path, run_validate):
    out = run_validate(n_maps=4, use_report=False)
    assert out.returncode == 0, out.stderr[-3000:]
    dump = _dump(tmp_path)
    assert dump["n_maps"] == 4
    assert len({tuple(m) for m in dump["maps"]}) == 4
    assert [r[1] for r in dump["per_map"]] == [1.0] * 4  # the oracle's greedy episode always succeeds


@pytest.mark.slow
def test_ddp_evaluation_uneven_split_counts_each_map_once(tmp_path, run_validate):
    out = run_validate(n_maps=3, use_report=False)
    assert out.returncode == 0, out.stderr[-3000:]
    dump = _dump(tmp_path)
    assert dump["n_maps"] == 3
    assert len({tuple(m) for m in dump["maps"]}) == 3 == len(dump["maps"])


@pytest.mark.slow
def test_ddp_report_callback(tmp_path, run_validate):
    out = run_validate(n_maps=4, use_report=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_maps"] == 4


# --- fit under DDP through the real CLI and the ddp preset (on CPU: gloo) ------------------------------------
PROBE = textwrap.dedent('''
    """Written as ddp_probe.py into the fit's working folder; the CLI imports DumpRank by class path."""
    import hashlib
    import json

    import lightning as L
    import torch


    def digest(ids) -> str:
        return hashlib.sha256(ids.numpy().astype("int64").tobytes()).hexdigest()[:16]


    class DumpRank(L.Callback):
        """Each rank appends a hash of every batch it trains on (and whether the batch had
        conflict marks) to ``{out}/batches-rank{r}.jsonl`` and saves its final weights and target
        buffers to ``{out}/state-rank{r}.pt``.

        Args:
            out: folder for the files.
        """

        def __init__(self, out: str):
            self.out = out

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with open(f"{self.out}/batches-rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps({"digests": [digest(ids) for ids in batch["input_ids"]],
                                    "fields": sorted(batch)}) + "\\n")

        def on_train_end(self, trainer, pl_module):
            torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                       f"{self.out}/state-rank{trainer.global_rank}.pt")
''')


def _digest(ids) -> str:
    """The probe's batch hash (``digest`` in ``PROBE``)."""
    return hashlib.sha256(ids.numpy().astype("int64").tobytes()).hexdigest()[:16]


FIT_STEPS = 3
# Not the defaults: the conflict marks (a batch field the model asks the data for) and the
# penalty run under DDP too.
OBJECTIVE = {"td": {"conflict_weight": 5.0}, "cql": {"weight": 1.0, "episodes": "successful"}}


def _fit_config(tmp: Path, data_dir: Path, sizes: dict, data_args: dict) -> Path:
    (tmp / "ddp_probe.py").write_text(PROBE)
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": FIT_STEPS, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "default_root_dir": str(tmp / "root"),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / "ckpt"), "save_last": True}},
                {"class_path": "icrl_lightning.callbacks.InContextReport", "init_args": {"figures": False}},
                {"class_path": "ddp_probe.DumpRank", "init_args": {"out": str(tmp)}},
            ],
        },
        "model": {"backbone": sizes, "warmup_steps": 1, "lr": 1e-3, **OBJECTIVE,
                  "evaluation": {"max_episode_steps": 20, "schedule": [0.0, 0.5, 1.0, 1.0]}},
        "data": {**data_args, "data_dir": str(data_dir), "eval_maps": 5},
    }
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory, tiny_data_dir, tiny_sizes, tiny_data_args, repo_root) -> tuple[Path, Path]:
    """(run folder, config): a 2-rank fit through the CLI with conf/trainer/ddp.yaml, moved to CPU."""
    tmp = tmp_path_factory.mktemp("ddp_fit")
    config = _fit_config(tmp, tiny_data_dir, tiny_sizes, tiny_data_args)
    preset = ["-c", str(repo_root / "conf/trainer/ddp.yaml"), "--trainer.accelerator", "cpu",
              "--trainer.devices", "2", "--trainer.precision", "32-true"]
    out = subprocess.run([sys.executable, "-m", "icrl_lightning", "fit", "-c", str(config), *preset],
                         cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp, config


@pytest.mark.slow
def test_ddp_fit_data_and_weights(ddp_fit, tiny_data_dir, tiny_data_args, tiny_datamodule, compact):
    """Each rank trains on its own rank's stream (disjoint maps, with the batch fields the model
    asked for), and the weights and target buffers are identical on both ranks afterwards (and in
    the checkpoint)."""
    tmp, _ = ddp_fit
    dm = tiny_datamodule(tiny_data_dir, compact, {"conflict"})
    seen = []
    for rank in (0, 1):
        batches = [json.loads(line) for line in (tmp / f"batches-rank{rank}.jsonl").read_text().splitlines()]
        assert len(batches) == FIT_STEPS
        assert all("conflict" in b["fields"] for b in batches)
        n = FIT_STEPS * tiny_data_args["batch_size"]
        expected = [_digest(item["input_ids"]) for item in dm.train_stream(n, rank, 2)]
        assert [d for b in batches for d in b["digests"]] == expected, rank
        seen.append(set(expected))
    assert not seen[0] & seen[1]

    s0, s1 = (torch.load(tmp / f"state-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert s0.keys() == s1.keys() and any(k.startswith("target_") for k in s0)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    ckpt = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == FIT_STEPS
    hp = ckpt["hyper_parameters"]
    assert hp["td"]["conflict_weight"] == 5.0 and hp["cql"] == OBJECTIVE["cql"]
    for k in s0:
        assert torch.equal(ckpt["state_dict"][k], s0[k]), k


@pytest.mark.slow
def test_ddp_fit_evaluation_equals_one_process(ddp_fit):
    """The report of the evaluation at the end of the 2-rank fit (maps split across ranks, results
    gathered) equals a single-process ``validate`` of the same checkpoint on the same maps."""
    tmp, config = ddp_fit
    reports = sorted((tmp / "root").rglob("report.json"))
    assert len(reports) == 1
    ddp = json.loads(reports[0].read_text())
    out = subprocess.run([sys.executable, "-m", "icrl_lightning", "validate", "-c", str(config),
                          "--ckpt_path", str(tmp / "ckpt" / "last.ckpt"),
                          "--trainer.default_root_dir", str(tmp / "validate")],
                         cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    (single_path,) = list((tmp / "validate").rglob("report.json"))
    single = json.loads(single_path.read_text())
    assert ddp["n_maps"] == single["n_maps"] == 5
    assert ddp["maps"] == single["maps"]
    for agent in single["agents"]:
        assert ddp["agents"][agent]["per_map"] == single["agents"][agent]["per_map"], agent
