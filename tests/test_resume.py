"""Exact resume: a ``fit`` killed with SIGKILL after a checkpoint and resumed with ``--ckpt_path last``
ends where the uninterrupted run ends (loss, weights, target network, optimizer, scheduler), because
the replay stream continues where the checkpoint left it."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from icrl_lightning.cli import main
from icrl_lightning.data import ReplayLoader, ReplayStream

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

# Checkpoints after every optimizer step; the killed run dies in step KILL_AT, after the checkpoint
# of step KILL_AT - 1. Its resume skips (KILL_AT - 1) * ACCUMULATE = 9 batches: an odd offset for
# the two DataLoader workers.
MAX_STEPS, KILL_AT, ACCUMULATE = 5, 4, 3


class Recorder(L.Callback):
    """Appends each batch's index, loss and hash to ``out`` (one JSON line per batch); with
    ``hang_at_step``, writes ``out + '.hanging'`` and sleeps at that step so the test can SIGKILL it
    after the previous step's checkpoint is on disk (checkpoint callbacks run after this one).

    Args:
        out: the JSON-lines file.
        hang_at_step: the optimizer step at which to stop and wait for the kill (0: never).
    """

    def __init__(self, out: str, hang_at_step: int = 0):
        self.out, self.hang_at_step = out, hang_at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        digest = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()[:16]
        with open(self.out, "a") as f:
            f.write(json.dumps({"batch_idx": batch_idx, "step": trainer.global_step, "loss": float(outputs["loss"]),
                                "batch": digest}) + "\n")
        if self.hang_at_step and trainer.global_step == self.hang_at_step:
            Path(self.out + ".hanging").touch()
            time.sleep(600)


def _config(tmp: Path, data_dir: Path, run: str, sizes: dict, data_args: dict, hang_at_step: int = 0,
            recorder: str = "test_resume.Recorder") -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": MAX_STEPS,
            "accumulate_grad_batches": ACCUMULATE, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "default_root_dir": str(tmp / run),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / run / "ckpt"), "save_last": True, "every_n_train_steps": 1}},
                {"class_path": recorder,
                 "init_args": {"out": str(tmp / f"{run}.jsonl"), "hang_at_step": hang_at_step}},
            ],
        },
        "model": {"backbone": sizes, "warmup_steps": 2, "lr": 1e-3, "evaluation": {"max_episode_steps": 30}},
        # Two DataLoader workers: the resumed DataLoader must hand batches to its workers in the
        # order the uninterrupted one did.
        "data": {**data_args, "data_dir": str(data_dir), "num_workers": 2},
    }
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tensors(obj, prefix=""):
    """Every tensor and number inside a checkpoint entry, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")
    elif isinstance(obj, (int, float)):
        yield prefix, torch.tensor(obj)


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, tiny_data_dir, tiny_sizes, tiny_data_args,
                                                           repo_root):
    # The killed run is another process: the Recorder travels as a module file in its working folder.
    header = "import hashlib\nimport json\nimport time\nfrom pathlib import Path\n\nimport lightning as L\n\n\n"
    (tmp_path / "resume_probe.py").write_text(header + inspect.getsource(Recorder))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed_cfg = _config(tmp_path, tiny_data_dir, "b", tiny_sizes, tiny_data_args, hang_at_step=KILL_AT,
                         recorder="resume_probe.Recorder")
    proc = subprocess.Popen([sys.executable, "-m", "icrl_lightning", "fit", "-c", str(killed_cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # The uninterrupted run, in this process while the other one trains.
        full = main(["fit", "-c", str(_config(tmp_path, tiny_data_dir, "a", tiny_sizes, tiny_data_args))])
        assert full.trainer.global_step == MAX_STEPS
        deadline = time.monotonic() + 240
        while not (tmp_path / "b.jsonl.hanging").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run to kill never reached its step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == KILL_AT - 1

    resumed = main(["fit", "-c", str(_config(tmp_path, tiny_data_dir, "b", tiny_sizes, tiny_data_args)),
                    "--ckpt_path", "last"])
    assert resumed.trainer.global_step == MAX_STEPS

    # Every batch either run trained on is the uninterrupted run's batch of that index, with its loss ...
    a = {r["batch_idx"]: r for r in _records(tmp_path / "a.jsonl")}
    n_batches = MAX_STEPS * ACCUMULATE
    assert sorted(a) == list(range(n_batches))
    b = _records(tmp_path / "b.jsonl")
    for r in b:
        assert r["batch"] == a[r["batch_idx"]]["batch"], r
        assert r["loss"] == pytest.approx(a[r["batch_idx"]]["loss"], rel=1e-6, abs=1e-7), r
    # ... and the resumed run started right after the checkpoint's batches: the killed run's work
    # since the checkpoint (the batches of step KILL_AT) was done twice, nothing else.
    resumed_from = (KILL_AT - 1) * ACCUMULATE
    twice = set(range(resumed_from, KILL_AT * ACCUMULATE))
    counts = {i: sum(r["batch_idx"] == i for r in b) for i in range(n_batches)}
    assert counts == {i: 2 if i in twice else 1 for i in range(n_batches)}
    # ... and the same final state: weights, target network, optimizer moments, scheduler.
    ca = torch.load(tmp_path / "a" / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    cb = torch.load(last, weights_only=True, map_location="cpu")
    assert ca["global_step"] == cb["global_step"] == MAX_STEPS
    assert any(k.startswith("target_") for k in ca["state_dict"])
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        ta, tb = dict(_tensors(ca[key])), dict(_tensors(cb[key]))
        assert ta.keys() == tb.keys() and ta, key
        for name in ta:
            torch.testing.assert_close(tb[name], ta[name], rtol=1e-6, atol=1e-7, msg=f"{key}{name}")
    # The resumed model in memory is the checkpointed one.
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)


# --- the stream's resume logic, rank by rank and worker by worker -------------------------------------------
def _batches(stream: ReplayStream, workers: int) -> list[torch.Tensor]:
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers)
    return [b["input_ids"] for b in loader]


@pytest.mark.parametrize(("workers", "skip"), [(0, 3), (2, 3), (2, 4), (3, 5), (2, 7)])
def test_skipped_stream_is_the_tail_of_the_whole_stream(compact, synthetic, workers, skip):
    # 7 batches per rank with a short last one (13 sequences, batches of 2).
    episodes, weights, _ = synthetic(compact, n_maps=12, n_eps=20)
    for rank in (0, 1):
        kw = {"episodes": episodes, "weights": weights, "seq_len": 64, "pad_id": compact.pad_id,
              "num_sequences": 13, "set_size": (2, 4), "seed": 0, "rank": rank, "world_size": 2, "batch_size": 2}
        whole = _batches(ReplayStream(**kw), workers)
        assert len(whole) == 7 and whole[-1].shape[0] == 1
        tail = _batches(ReplayStream(**kw, skip_batches=skip), workers)
        assert len(tail) == 7 - skip
        for x, y in zip(whole[skip:], tail, strict=True):
            assert torch.equal(x, y)


def test_skipped_stream_keeps_the_extra_batch_fields(compact, synthetic):
    """A resumed stream built with ``fields={"conflict"}`` continues every field of the batches,
    the conflict marks included."""
    episodes, weights, _ = synthetic(compact, n_maps=4, n_eps=20)
    kw = {"episodes": episodes, "weights": weights, "seq_len": 64, "pad_id": compact.pad_id, "num_sequences": 10,
          "set_size": (2, 4), "seed": 0, "batch_size": 2, "fields": {"conflict"}}
    whole = list(DataLoader(ReplayStream(**kw), batch_size=2, num_workers=2))
    tail = list(DataLoader(ReplayStream(**kw, skip_batches=3), batch_size=2, num_workers=2))
    assert len(whole) == 5 and len(tail) == 2
    for x, y in zip(whole[3:], tail, strict=True):
        assert x.keys() == y.keys() == {"input_ids", "q_mask", "action", "reward", "done", "n_tokens", "conflict"}
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_longer_run_continues_the_same_stream(compact, synthetic):
    """Resuming with a larger max_steps (a longer stream) continues the same batches."""
    episodes, weights, _ = synthetic(compact, n_maps=4, n_eps=20)
    kw = {"episodes": episodes, "weights": weights, "seq_len": 64, "pad_id": compact.pad_id, "set_size": (2, 4),
          "seed": 0, "batch_size": 2}
    short = _batches(ReplayStream(**kw, num_sequences=8), 2)
    longer = _batches(ReplayStream(**kw, num_sequences=16, skip_batches=2), 2)
    for x, y in zip(short[2:], longer, strict=False):
        assert torch.equal(x, y)
    assert len(longer) == 6


def test_resume_under_another_layout_says_so(compact, synthetic, caplog):
    """The loader saves the stream's layout in checkpoints; a resume that cannot continue the same
    batches (here: another number of DataLoader workers) warns and names what changed."""
    episodes, weights, _ = synthetic(compact, n_maps=4, n_eps=20)
    stream = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=4, seed=0)
    layout = {"seed": 0, "num_workers": 2, "world_size": 1}
    saved = ReplayLoader(stream, layout).state_dict()
    with caplog.at_level(logging.WARNING, logger="icrl_lightning.data"):
        ReplayLoader(stream, layout).load_state_dict(saved)
        assert not caplog.records
        ReplayLoader(stream, {**layout, "num_workers": 4}).load_state_dict(saved)
    (record,) = caplog.records
    assert "num_workers: 2 -> 4" in record.getMessage()


def test_ckpt_path_last_finds_the_previous_runs_checkpoint(tmp_path, tiny_data_dir, tiny_sizes, tiny_data_args,
                                                          repo_root):
    """With the quickstart's logger every run writes to a new version_N folder; ``--ckpt_path last``
    still resumes from the previous run's last.ckpt instead of silently starting over."""
    args = ["-c", str(repo_root / "conf/experiment/quickstart.yaml"),
            "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path / "root"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            *[a for k, v in tiny_data_args.items() for a in (f"--data.{k}", str(v))],
            "--data.data_dir", str(tiny_data_dir),
            *[a for k, v in tiny_sizes.items() for a in (f"--model.backbone.{k}", str(v))],
            "--model.evaluation.max_episode_steps", "30"]
    first = main(["fit", *args, "--trainer.max_steps", "2"])
    (last,) = (tmp_path / "logs").rglob("last.ckpt")
    assert last.parent.parent.name == "version_0"
    resumed = main(["fit", *args, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(last)
    assert resumed.trainer.global_step == 3
    assert first.trainer.global_step == 2
