"""Two-process (gloo, CPU) in-context evaluation. Slow: each run spawns two Python processes.

Each scenario runs in its own subprocess with a timeout, so a collective that never completes
fails the test instead of hanging the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L
    import torch
    from helpers import tiny_backbone, tiny_datamodule
    from icrl_lightning.callbacks import InContextReport
    from icrl_lightning.evaluation import EvalProtocol
    from icrl_lightning.module import ICRLModule

    OUT, N_MAPS, USE_REPORT = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

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
        module = ICRLModule(backbone=tiny_backbone(), seq_len=256, evaluation=protocol)
        dm = tiny_datamodule(OUT + "/data", eval_maps=N_MAPS)
        callbacks = [Dump()] + ([InContextReport()] if USE_REPORT else [])
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=OUT,
                            callbacks=callbacks)
        trainer.validate(module, datamodule=dm)
''')


def _run(tmp_path: Path, n_maps: int, use_report: bool) -> subprocess.CompletedProcess:
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, str(script), str(tmp_path), str(n_maps), "1" if use_report else "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _dump(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "dump.json").read_text())


@pytest.mark.slow
def test_ddp_evaluation_even_split(tmp_path):
    out = _run(tmp_path, n_maps=4, use_report=False)
    assert out.returncode == 0, out.stderr[-3000:]
    dump = _dump(tmp_path)
    assert dump["n_maps"] == 4
    assert len({tuple(m) for m in dump["maps"]}) == 4
    assert [r[1] for r in dump["per_map"]] == [1.0] * 4  # the oracle's greedy episode always succeeds


@pytest.mark.slow
def test_ddp_evaluation_uneven_split_counts_each_map_once(tmp_path):
    out = _run(tmp_path, n_maps=3, use_report=False)
    assert out.returncode == 0, out.stderr[-3000:]
    dump = _dump(tmp_path)
    assert dump["n_maps"] == 3
    assert len({tuple(m) for m in dump["maps"]}) == 3 == len(dump["maps"])


@pytest.mark.slow
def test_ddp_report_callback(tmp_path):
    out = _run(tmp_path, n_maps=4, use_report=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_maps"] == 4
