"""Load a trained checkpoint and its evaluation maps outside the CLI (benchmarks, notebooks).

Checkpoints are read with ``weights_only=True``: hyper-parameters are plain values, never pickles."""

from __future__ import annotations

from pathlib import Path

import torch

from icrl_lightning.data import ReplayDataModule
from icrl_lightning.envs.frozen_lake import Map


def load_module(ckpt_path: str | Path, map_location: str = "cpu"):
    """The ``ICRLModule`` of a checkpoint, in eval mode."""
    from icrl_lightning.module import ICRLModule

    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    module = ICRLModule.load_from_checkpoint(str(path), map_location=map_location, weights_only=True)
    module.eval()
    return module


def checkpoint_eval_maps(ckpt_path: str | Path, **overrides) -> list[Map]:
    """The evaluation maps the checkpoint's data settings give (``overrides`` change any
    ``ReplayDataModule`` argument, e.g. ``eval_split="ood"``, ``eval_maps=10``)."""
    saved = torch.load(str(ckpt_path), map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {})
    settings = {k: v for k, v in saved.items() if not k.startswith("_")} | overrides
    data = ReplayDataModule(**settings)
    data.setup("validate")
    return list(data.eval_maps)
