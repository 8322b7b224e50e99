"""Callbacks: the in-context evaluation report."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from icrl_lightning.evaluation.report import print_table, write_report


class InContextReport(L.Callback):
    """After every in-context evaluation (the validation loop: at the end of ``fit`` and in
    ``validate``), print the summary table and write ``report.json`` to the run's log directory.

    Args:
        filename: report file name inside the log directory.
        keep_every: also keep ``report-step{N}.json`` for each periodic evaluation during ``fit``.
    """

    def __init__(self, filename: str = "report.json", keep_every: bool = False):
        self.filename, self.keep_every = filename, keep_every

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
        report = {**report, "checkpoint": getattr(trainer, "ckpt_path", None),
                  "stage": trainer.state.fn.value if trainer.state.fn else None}
        write_report(report, log_dir / self.filename)
        if self.keep_every:
            write_report(report, log_dir / f"report-step{report['global_step']}.json")
        print_table(report)
        print(f"report: {log_dir / self.filename}")
