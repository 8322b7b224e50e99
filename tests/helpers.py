"""Tiny models, serializers and data modules built from config (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch
import yaml

from icrl_lightning.backbones import TinyLlama
from icrl_lightning.cli import main
from icrl_lightning.serialize import Serializer

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 256}
TINY_DATA = {"num_train_maps": 4, "episodes_per_map": 10, "seq_len": 256, "batch_size": 2, "eval_maps": 3}


def tiny_backbone(fmt: str = "compact", **overrides) -> TinyLlama:
    return TinyLlama(format=fmt, **{**TINY, **overrides})


def tiny_model(fmt: str = "compact", seed: int = 0, init_std: float | None = 0.2, **overrides):
    """(model in eval mode, tokenizer, serializer) with a fixed random init.

    ``init_std`` redraws the weight matrices wider than the LM default (0.02): attention is then
    far from uniform, so a wrong position, mask or cache entry changes the Q-values visibly."""
    torch.manual_seed(seed)
    spec = tiny_backbone(fmt, **overrides)
    model, tokenizer = spec.build()
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, init_std)
    model.eval()
    return model, tokenizer, Serializer(tokenizer, fmt, spec.max_tiles)


def tiny_datamodule(data_dir, **overrides):
    from icrl_lightning.data import ReplayDataModule

    return ReplayDataModule(data_dir=str(data_dir), **{**TINY_DATA, **overrides})


def print_config(args: list[str], capsys) -> dict:
    """The configuration ``python -m icrl_lightning ... --print_config`` prints, parsed."""
    with pytest.raises(SystemExit) as err:
        main(args)
    out = capsys.readouterr().out
    assert err.value.code in (0, None), out
    return yaml.safe_load(out)
