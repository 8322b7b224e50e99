"""The trainer presets under conf/trainer/ layer on an experiment config (``-c experiment -c preset``)
and parse; the strategies they name are built as Lightning expects; the CPU preset trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from icrl_lightning.cli import ICRLCLI, main
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.module import ICRLModule

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "conf/experiment/quickstart.yaml"
PRESETS = {p.stem: p for p in sorted((REPO / "conf/trainer").glob("*.yaml"))}


def test_the_presets_exist():
    assert set(PRESETS) == {"cpu", "gpu", "ddp", "fsdp", "deepspeed"}


def _contains(actual, expected) -> bool:
    """Every key of ``expected`` is in ``actual`` with the same value (the parser adds defaults)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    return actual == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_layers_on_an_experiment(name, print_config):
    preset = yaml.safe_load(PRESETS[name].read_text())["trainer"]
    cfg = print_config(["fit", "-c", str(QUICKSTART), "-c", str(PRESETS[name]), "--print_config"])
    trainer = cfg["trainer"]
    assert _contains(trainer, preset)
    # The experiment's own settings survive the layering.
    assert trainer["max_steps"] == yaml.safe_load(QUICKSTART.read_text())["trainer"]["max_steps"]
    assert len(trainer["callbacks"]) == 4
    assert cfg["model"]["backbone"]["hidden_size"] == 128


class _Capture(ICRLCLI):
    """Instantiates model, data and the trainer's arguments (the strategy object included), keeps
    the trainer's arguments, then stops: building a GPU trainer without a GPU would fail."""

    captured: dict = {}

    def instantiate_trainer(self, **kwargs):
        _Capture.captured = dict(self.config_init[self.subcommand]["trainer"])
        raise SystemExit(0)


def test_fsdp_wraps_each_llama_decoder_layer(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with pytest.raises(SystemExit):
        _Capture(ICRLModule, ReplayDataModule, parser_kwargs={"parser_mode": "omegaconf"},
                 args=["fit", "-c", str(QUICKSTART), "-c", str(PRESETS["fsdp"]), "--data.data_dir", str(tmp_path)])
    strategy = _Capture.captured["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {LlamaDecoderLayer}
    assert _Capture.captured["precision"] == "bf16-mixed"


def test_deepspeed_preset_is_zero_stage_2(print_config):
    cfg = print_config(["fit", "-c", str(QUICKSTART), "-c", str(PRESETS["deepspeed"]), "--print_config"])
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == 2


def test_cpu_preset_trains(tmp_path, tiny_sizes):
    cli = main([
        "fit", "-c", str(QUICKSTART), "-c", str(PRESETS["cpu"]),
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(tmp_path / "root"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--data.num_train_maps", "4", "--data.episodes_per_map", "10", "--data.seq_len", "256",
        "--data.batch_size", "2", "--data.data_dir", str(tmp_path / "data"),
        *[a for k, v in tiny_sizes.items() for a in (f"--model.backbone.{k}", str(v))],
        "--model.evaluation.max_episode_steps", "30",
    ])
    assert cli.trainer.global_step == 2
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert str(cli.trainer.precision) == "32-true"
