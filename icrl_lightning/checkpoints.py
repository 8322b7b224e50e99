"""Load a trained run outside the CLI (tools, notebooks): the ``ICRLModule`` of a checkpoint and
the ``ReplayDataModule`` its data settings give, connected as the CLI connects them.

Checkpoints are read with ``weights_only=True``: hyper-parameters are plain values, never pickles."""

from __future__ import annotations

from pathlib import Path

from icrl_lightning.checks import InputError
from icrl_lightning.cli import check_checkpoint
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.envs.frozen_lake import Map
from icrl_lightning.module import ICRLModule


def load_module(ckpt_path: str | Path, map_location: str = "cpu", what: str = "checkpoint") -> ICRLModule:
    """The ``ICRLModule`` of a checkpoint, in eval mode (a bad file is an ``InputError`` naming ``what``)."""
    check_checkpoint(str(ckpt_path), what)
    module = ICRLModule.load_from_checkpoint(str(ckpt_path), map_location=map_location, weights_only=True)
    module.eval()
    return module


# Data options removed after they did not help (docs/results.md), with the value that meant "off":
# checkpoints of the versions that had them save them.
REMOVED_DATA = {"as_played": False}


def data_settings(ckpt_path: str | Path, what: str = "checkpoint") -> dict:
    """The checkpoint's ``ReplayDataModule`` arguments, less the removed options at their "off"
    value (one that was on is an ``InputError`` naming it: this version cannot replay that data)."""
    saved = check_checkpoint(str(ckpt_path), what)
    settings = {k: v for k, v in saved.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}
    for key, off in REMOVED_DATA.items():
        value = settings.pop(key, off)
        if value != off:
            raise InputError(f"{what}: {ckpt_path} was trained with data.{key}={value!r}, an option removed since "
                             f"(it did not help, see docs/results.md); load it with the version that trained it")
    return settings


def load_run(ckpt_path: str | Path, map_location: str = "cpu", what: str = "checkpoint",
             **data_overrides) -> tuple[ICRLModule, ReplayDataModule]:
    """(module in eval mode, its data module with the serializer handed over); ``data_overrides``
    change any ``ReplayDataModule`` argument (e.g. ``data_dir``, ``eval_split="ood"``)."""
    module = load_module(ckpt_path, map_location, what)
    data = ReplayDataModule(**(data_settings(ckpt_path, what) | data_overrides))
    data.set_serializer(module.serializer, module.batch_fields)
    return module, data


def checkpoint_eval_maps(ckpt_path: str | Path, **overrides) -> list[Map]:
    """The evaluation maps the checkpoint's data settings give (``overrides`` change any
    ``ReplayDataModule`` argument, e.g. ``eval_split="ood"``, ``eval_maps=10``)."""
    data = ReplayDataModule(**(data_settings(ckpt_path) | overrides))
    data.setup("validate")
    return list(data.eval_maps)
