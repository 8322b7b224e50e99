"""``python -m icrl_lightning fit|validate ...``: Lightning's own CLI in omegaconf mode."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from icrl_lightning.checks import InputError
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.module import ICRLModule

log = logging.getLogger(__name__)


class ICRLCLI(LightningCLI):
    """Lightning's CLI for ``ICRLModule`` + ``ReplayDataModule``. ``--ckpt_path last`` finds the
    newest ``last*.ckpt`` of this experiment, also in the logger's earlier ``version_N`` folders
    (Lightning itself looks only in the new run's folder, finds nothing and starts from scratch)."""

    def add_arguments_to_parser(self, parser) -> None:
        # The agent's default context window is the length the model was trained on.
        parser.link_arguments("data.seq_len", "model.seq_len")

    def _resolve_last(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = last_checkpoint(self.trainer)
        if found is not None:
            log.info("--ckpt_path last: resuming from %s", found)
            config["ckpt_path"] = str(found)

    def before_fit(self) -> None:
        self._resolve_last()

    def before_validate(self) -> None:
        self._resolve_last()


def last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest ``last*.ckpt`` where this trainer's ``ModelCheckpoint`` callbacks write: their
    ``dirpath`` if set, else ``{logger.save_dir}/{logger.name}/*/checkpoints`` (every version of
    the experiment), else ``{default_root_dir}/checkpoints``."""
    folders: list[Path] = []
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.dirpath is not None:
            folders.append(Path(cb.dirpath))
        elif trainer.loggers and trainer.loggers[0].save_dir is not None:
            logger = trainer.loggers[0]
            folders += sorted((Path(logger.save_dir) / str(logger.name)).glob("*/checkpoints"))
        else:
            folders.append(Path(trainer.default_root_dir) / "checkpoints")
    candidates = [p for folder in folders for p in folder.glob("last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def main(args: list[str] | None = None) -> ICRLCLI:
    """Run the command line. A bad configuration value or input file (``InputError``, raised before
    any work starts) is printed as ``error: ...`` without a traceback and exits with status 2, like
    the parser's own errors (unknown keys, wrong types)."""
    torch.set_float32_matmul_precision("high")
    try:
        return ICRLCLI(
            ICRLModule,
            ReplayDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
