"""Callbacks: the in-context evaluation report; online fine-tuning on the model's own trials."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from icrl_lightning.checks import InputError, check_range
from icrl_lightning.data import with_optimal
from icrl_lightning.envs.frozen_lake import optimal_actions
from icrl_lightning.evaluation.figures import curve_figure, write_figures
from icrl_lightning.evaluation.report import print_table, write_report
from icrl_lightning.module import _eval_mode

# The data module settings that decide which maps were evaluated.
EVAL_DATA_KEYS = ("split_seed", "eval_split", "eval_maps", "eval_map_file", "min_size", "max_size", "p_hole", "min_hops",
                  "max_episode_steps")


def _jsonable(value):
    """Hyper-parameters as plain JSON values (dataclasses as dicts, other objects as text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _checkpoint_step(path) -> int | None:
    """The optimizer step a checkpoint was saved at (``validate`` does not restore it into the trainer)."""
    if not path or not Path(path).is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


class InContextReport(L.Callback):
    """After every in-context evaluation (the validation loop: at the end of ``fit``, periodically
    during ``fit`` when the trainer's ``val_check_interval`` asks for it, and in ``validate``),
    print the summary table and write ``report.json`` and the PNG figures (``curves.png``,
    ``trajectories.png``) to the run's log directory; during ``fit`` also log the curve figure
    to TensorBoard (tag ``val/curve``) at the current step. Rank 0 only.

    Args:
        filename: report file name inside the log directory.
        keep_every: also keep ``report-step{N}.json`` (and its figures, prefixed ``step{N}-``)
            for each periodic evaluation during ``fit``.
        figures: write the PNG figures next to the report.
        log_figure: log the curve figure to the logger (TensorBoard) during ``fit``.
    """

    def __init__(self, filename: str = "report.json", keep_every: bool = False, figures: bool = True,
                 log_figure: bool = True):
        self.filename, self.keep_every = filename, keep_every
        self.figures, self.log_figure = figures, log_figure

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Every rank asks: trainer.log_dir is a collective under DDP.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._write(trainer, pl_module, log_dir)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: Path) -> None:
        report = getattr(pl_module, "eval_report", None)
        if report is None:
            return
        stage = trainer.state.fn.value if trainer.state.fn else None
        datamodule = getattr(trainer, "datamodule", None)
        data = getattr(datamodule, "hparams", {}) or {}
        ckpt = getattr(trainer, "ckpt_path", None)
        report = {**report, "checkpoint": ckpt, "checkpoint_step": _checkpoint_step(ckpt), "stage": stage,
                  "config": {"data": {k: _jsonable(data[k]) for k in EVAL_DATA_KEYS if k in data},
                             "model": _jsonable(dict(getattr(pl_module, "hparams", {})))}}
        write_report(report, log_dir / self.filename)
        written = [log_dir / self.filename]
        if self.keep_every:
            write_report(report, log_dir / f"report-step{report['global_step']}.json")
        if self.figures:
            written += write_figures(report, log_dir)
            if self.keep_every:
                write_figures(report, log_dir, prefix=f"step{report['global_step']}-")
        if self.log_figure and stage == "fit":
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("val/curve", curve_figure(report, f"step {report['global_step']}"),
                                      global_step=report["global_step"], close=True)
        print_table(report)
        print("report: " + ", ".join(str(p) for p in written))


def trial_episodes(rows: tuple[str, ...], trajectories: list[list[int]], actions: list[list[int]],
                   max_episode_steps: int) -> list[dict]:
    """The episodes of one played trial as behaviour records (observations, actions, rewards,
    terminated, truncated), rebuilt from the tiles visited: Frozen Lake pays 1 on a goal tile
    and ends on a goal or a hole."""
    width = len(rows[0])
    out = []
    for tiles, acts in zip(trajectories, actions, strict=True):
        last = rows[tiles[-1] // width][tiles[-1] % width]
        terminated = last in "GH"
        rewards = [0.0] * len(acts)
        if acts and last == "G":
            rewards[-1] = 1.0
        out.append({"observations": list(tiles), "actions": list(acts), "rewards": rewards, "terminated": terminated,
                    "truncated": not terminated and len(acts) >= max_episode_steps})
    return out


class OnlineTrials(L.Callback):
    """Online fine-tuning on the model's own trials (SPEC, "what the paper leaves open": the
    offline data never shows the model's own mistakes, e.g. a greedy episode that replays the
    failed path before it).

    From ``start_step`` on, every ``every_n_steps`` optimizer steps the current online network
    plays the evaluation protocol's schedule (with its step limit and context window) on
    ``maps`` training maps, never the held-out ones. Each trial becomes a set of the replay
    stream in the order played, and a set is drawn from the newest ``buffer`` trials instead of
    the offline data with probability ``fraction``. TD targets on those sets teach, for example,
    that the move which ended the last episode in a hole is worth 0 here. With
    ``model.cql_target: oracle`` the trials carry the map's shortest-path actions, so the penalty
    teaches the best move from the model's own exploration contexts (like DAgger).

    Logs ``online/last10`` (the mean return of the trials' last 10 episodes, training maps) and
    ``online/trials``. Needs ``data.num_workers: 0`` (the trials must reach the stream that
    trains). Not exact on resume: the trial buffer is not checkpointed, so a resumed run starts
    with an empty buffer.

    Args:
        every_n_steps: optimizer steps between two rounds of trials.
        start_step: first step that plays trials (the model should first learn from the offline data).
        maps: training maps played per round (drawn at random, seeded by ``seed`` and the step).
        fraction: probability that a set of the stream is an online trial, once there is one.
        buffer: how many of the newest trials are kept.
        seed: seeds the map draw and the trials' exploration.
    """

    def __init__(self, every_n_steps: int = 100, start_step: int = 200, maps: int = 50, fraction: float = 0.5,
                 buffer: int = 200, seed: int = 0):
        check_range("OnlineTrials.every_n_steps", every_n_steps, 1, None)
        check_range("OnlineTrials.start_step", start_step, 0, None)
        check_range("OnlineTrials.maps", maps, 1, None)
        check_range("OnlineTrials.fraction", fraction, 0, 1)
        check_range("OnlineTrials.buffer", buffer, 1, None)
        self.every_n_steps, self.start_step, self.maps = every_n_steps, start_step, maps
        self.fraction, self.buffer, self.seed = fraction, buffer, seed
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        if getattr(loader, "num_workers", 0):
            raise InputError("OnlineTrials needs data.num_workers=0: trials played in the main process cannot "
                             "reach DataLoader worker processes")
        if not hasattr(getattr(trainer, "datamodule", None), "train_maps"):
            raise InputError("OnlineTrials needs the ReplayDataModule (its training maps)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step < self.start_step or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step  # with gradient accumulation several batches end on one step
        stream = trainer.train_dataloader.dataset
        rows = trainer.datamodule.train_maps
        rng = np.random.default_rng([self.seed, step, trainer.global_rank])
        ids = [int(i) for i in rng.choice(sorted(rows), size=min(self.maps, len(rows)), replace=False)]
        protocol = pl_module.protocol
        with _eval_mode(pl_module.model):
            trial = pl_module._agent().play([rows[i] for i in ids], protocol.greedy_probs(),
                                            seed=int(rng.integers(2**31)), keys=ids)
        serializer = pl_module.serializer
        for k, i in enumerate(ids):
            episodes = trial_episodes(rows[i], trial.trajectories[k], trial.actions[k], protocol.max_episode_steps)
            best = optimal_actions(rows[i])  # for model.cql_target=oracle, as on the offline data
            stream.online.append([with_optimal(serializer.episode(**e), e["observations"], best, i)
                                  for e in episodes])
        del stream.online[: -self.buffer]
        stream.online_fraction = self.fraction
        last = trial.returns[:, -protocol.last_k:].mean()
        pl_module.log("online/last10", float(last), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("online/trials", float(len(stream.online)), on_step=True, on_epoch=False, batch_size=1)
