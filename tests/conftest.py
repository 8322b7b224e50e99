"""Shared fixtures: tiny models, serializers, data modules and episodes built from config (nothing
downloaded). Everything is offline, CPU-only and written under pytest's tmp paths. Factories are
session-scoped fixtures that return a function, so a test asks for them by name."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from icrl_lightning.backbones import TinyLlama, build_tokenizer
from icrl_lightning.cli import main
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.episodes import Episode, quality_weights
from icrl_lightning.serialize import Serializer

# Another process may be using the CPU: one thread per test run keeps timings predictable.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one test process per CPU this process may run on (its affinity, not the host's
    count, which a container can exceed), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 256}
TINY_DATA = {"num_train_maps": 4, "episodes_per_map": 10, "seq_len": 256, "batch_size": 2, "eval_maps": 3}


@pytest.fixture(scope="session")
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sizes() -> dict:
    """``TinyLlama`` sizes of the tests' models (``model.backbone.*``)."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_data_args() -> dict:
    """``ReplayDataModule`` arguments of the tests' tiny dataset (4 maps x 10 episodes)."""
    return dict(TINY_DATA)


def _tiny_backbone(fmt: str = "compact", **overrides) -> TinyLlama:
    return TinyLlama(format=fmt, **{**TINY, **overrides})


@pytest.fixture(scope="session")
def tiny_backbone():
    """``tiny_backbone(fmt="compact", **sizes)``: a ``TinyLlama`` spec at the tests' sizes."""
    return _tiny_backbone


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(fmt="compact", seed=0, init_std=0.2, **sizes)``: (model in eval mode, tokenizer,
    serializer) with a fixed random init. ``init_std`` redraws the weight matrices wider than the
    LM default (0.02): attention is then far from uniform, so a wrong position, mask or cache
    entry changes the Q-values visibly."""

    def make(fmt: str = "compact", seed: int = 0, init_std: float | None = 0.2, **overrides):
        torch.manual_seed(seed)
        spec = _tiny_backbone(fmt, **overrides)
        model, tokenizer = spec.build()
        if init_std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 2:
                        p.normal_(0.0, init_std)
        model.eval()
        return model, tokenizer, Serializer(tokenizer, fmt, spec.max_tiles)

    return make


def _tiny_datamodule(data_dir, serializer: Serializer | None = None, batch_fields=(), **overrides) -> ReplayDataModule:
    dm = ReplayDataModule(data_dir=str(data_dir), **{**TINY_DATA, **overrides})
    if serializer is not None:
        dm.set_serializer(serializer, batch_fields)
    return dm


@pytest.fixture(scope="session")
def tiny_datamodule():
    """``tiny_datamodule(data_dir, serializer=None, batch_fields=(), **overrides)``: the tests' tiny
    ``ReplayDataModule`` (the serializer handed over when given)."""
    return _tiny_datamodule


@pytest.fixture(scope="session")
def compact() -> Serializer:
    """The compact format's serializer (word-level tokenizer made in code)."""
    return Serializer(build_tokenizer("compact"), "compact")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A data_dir holding the tiny dataset (4 maps x 10 episodes), built once per session.
    Tests must not modify it."""
    root = tmp_path_factory.mktemp("data")
    _tiny_datamodule(root).prepare_data()
    return root


@pytest.fixture(scope="session")
def synthetic():
    """``synthetic(serializer, n_maps, n_eps, success=...)`` -> (encoded episodes by map, quality
    weights by map, the ``Episode`` records by map). Episode ``j`` of map ``m`` is
    ``<ep> o{m} left o{j} [r1.0] </ep>``: its tokens name its map and index."""

    def make(s: Serializer, n_maps: int, n_eps: int, success=lambda m, j: j % 2 == 0):
        episodes, weights, raw = {}, {}, {}
        for m in range(n_maps):
            eps = [Episode([m, j], [0], [1.0 if success(m, j) else 0.0], True, False, map_id=m, map_rows=("SG",),
                           learner_episode=j) for j in range(n_eps)]
            raw[m] = eps
            episodes[m] = [s.encode(e) for e in eps]
            weights[m] = quality_weights(eps, "medium")
        return episodes, weights, raw

    return make


@pytest.fixture(scope="session")
def decode_stream():
    """``decode_stream(batches, serializer)`` -> (map, episode index) of every packed episode of
    ``synthetic`` data, in stream order."""

    def decode(items, s: Serializer) -> list[tuple[int, int]]:
        start, end = s.piece(s.fmt.episode_start)[0], s.piece(s.fmt.episode_end)[0]
        out = []
        for it in items:
            ids = it["input_ids"][: int(it["n_tokens"])].tolist()
            cur: list[int] = []
            for t in ids:
                if t == start:
                    cur = [t]
                else:
                    cur.append(t)
                if t == end:
                    toks = s._tokenizer.convert_ids_to_tokens(cur)
                    out.append((int(toks[1][1:]), int(toks[3][1:])))
        return out

    return decode


@pytest.fixture(scope="session")
def save_tiny_model():
    """``save_tiny_model(folder, fmt="compact", seed=0, tie=False, max_positions=256)``: a tiny Llama
    with random weights and a word-level tokenizer for ``fmt``, saved as a model folder
    (config.json, safetensors, tokenizer), like a downloaded checkpoint."""

    def save(folder, fmt: str = "compact", seed: int = 0, tie: bool = False, max_positions: int = 256):
        torch.manual_seed(seed)
        tok = build_tokenizer(fmt)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                             pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None,
                             tie_word_embeddings=tie)
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # wider than the default init: attention far from uniform
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder

    return save


@pytest.fixture
def print_config(capsys):
    """``print_config(args)``: the configuration ``python -m icrl_lightning ... --print_config``
    prints, parsed."""

    def run(args: list[str]) -> dict:
        with pytest.raises(SystemExit) as err:
            main(args)
        out = capsys.readouterr().out
        assert err.value.code in (0, None), out
        return yaml.safe_load(out)

    return run


@pytest.fixture
def module_data(tiny_datamodule):
    """``module_data(module, data_dir, **overrides)``: the tiny data module, handed the module's
    serializer and the batch fields its objective reads (as the CLI does)."""

    def make(module, data_dir, **overrides):
        return tiny_datamodule(data_dir, module.serializer, module.batch_fields, **overrides)

    return make


@pytest.fixture
def make_batch(module_data):
    """``make_batch(module, data_dir, n=2)``: the first ``n`` packed sequences of the stream, stacked."""

    def make(module, data_dir, n: int = 2) -> dict:
        dm = module_data(module, data_dir, seq_len=module.hparams.seq_len)
        items = list(dm.train_stream(num_sequences=n))
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    return make
