"""``python -m icrl_lightning fit|validate ...``: Lightning's own CLI in omegaconf mode."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LightningCLI

from icrl_lightning.data import ReplayDataModule
from icrl_lightning.module import ICRLModule


class ICRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The agent's default context window is the length the model was trained on.
        parser.link_arguments("data.seq_len", "model.seq_len")


def main(args: list[str] | None = None) -> ICRLCLI:
    torch.set_float32_matmul_precision("high")
    return ICRLCLI(
        ICRLModule,
        ReplayDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )
