"""Callbacks: the in-context evaluation report; checkpoints at fixed steps (for sweeps)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from icrl_lightning.evaluation.figures import curve_figure, write_figures
from icrl_lightning.evaluation.report import print_table, write_report

# The data module settings that decide which maps were evaluated.
EVAL_DATA_KEYS = ("split_seed", "eval_split", "eval_maps", "eval_map_file", "env")


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
        # validate without --ckpt_path plays the model as built: random weights. Say so everywhere.
        untrained = stage == "validate" and not ckpt
        report = {**report, "checkpoint": ckpt, "checkpoint_step": _checkpoint_step(ckpt), "stage": stage,
                  "untrained": untrained,
                  "config": {"trainer": {"precision": str(trainer.precision)},
                             "data": {k: _jsonable(data[k]) for k in EVAL_DATA_KEYS if k in data},
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


class StepCheckpoints(ModelCheckpoint):
    """Keep a checkpoint every ``every_n_train_steps`` optimizer steps, named ``step=N.ckpt``, all of
    them (``python -m icrl_lightning.sweep`` evaluates those of the steps it was asked for). A class
    of its own, so that it sits beside the experiment's ``ModelCheckpoint`` with its own state key."""

    def __init__(self, every_n_train_steps: int, dirpath: str | None = None):
        super().__init__(dirpath=dirpath, filename="{step}", save_top_k=-1, every_n_train_steps=every_n_train_steps,
                         save_last=False)
