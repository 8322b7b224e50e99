"""Reliability (issue 6): bad configuration and bad files fail before any work with a message that
names the key / file / map / row; nothing is half-written; a non-finite loss stops training and keeps
the last good checkpoint; nothing unpickles untrusted files; the same seed gives the same bytes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import icrl_lightning.data.dataset as dataset_mod
import icrl_lightning.episodes as episodes_mod
from icrl_lightning.checks import InputError
from icrl_lightning.cli import main
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.episodes import read_shard, write_json_atomic
from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.module import ICRLModule

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 256}
TINY_DATA = {"num_train_maps": 4, "episodes_per_map": 10, "seq_len": 256, "batch_size": 2, "eval_maps": 3}


def _datamodule(data_dir, **overrides) -> ReplayDataModule:
    return ReplayDataModule(data_dir=str(data_dir), **{**TINY_DATA, **overrides})


def _args(tmp: Path, data_dir: Path | None = None) -> list[str]:
    """The quickstart config shrunk to a tiny model and dataset, every output under ``tmp``."""
    return [
        "-c", str(REPO / "conf/experiment/quickstart.yaml"),
        "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(tmp / "root"),
        "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
        "--data.num_train_maps", "4", "--data.episodes_per_map", "10", "--data.seq_len", "256",
        "--data.batch_size", "2", "--data.eval_maps", "3",
        "--data.data_dir", str(data_dir or tmp / "data"),
        *[a for k, v in TINY.items() for a in (f"--model.backbone.{k}", str(v))],
        "--model.evaluation.max_episode_steps", "30",
    ]


def _cli_error(args: list[str], capsys) -> str:
    """Run the CLI expecting a usage error; return what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# --- 1. bad configuration ---------------------------------------------------------------------------
def test_unknown_key_names_the_key(tmp_path, capsys):
    err = _cli_error(["fit", *_args(tmp_path), "--model.alhpa", "0.1"], capsys)
    assert "--model.alhpa" in err
    config = tmp_path / "typo.yaml"
    config.write_text("data:\n  seq_lenn: 256\n")
    err = _cli_error(["fit", *_args(tmp_path), "-c", str(config)], capsys)
    assert "data.seq_lenn" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("model.lr", "abc", 'Parser key "model.lr": Expected a <class \'float\'>. Got value: abc'),
    ("data.seq_len", "5.5", 'Parser key "data.seq_len": Expected a <class \'int\'>. Got value: 5.5'),
])
def test_wrong_type_names_the_key(tmp_path, capsys, key, value, expected):
    err = _cli_error(["fit", *_args(tmp_path), f"--{key}", value], capsys)
    assert expected in err
    assert "usage:" not in err and len(err.strip().splitlines()) == 1  # one line, no usage dump


IMPOSSIBLE = [
    (["--model.lr", "0"], "model.lr=0.0 is out of range: allowed (0, inf)"),
    (["--model.lr", "-0.001"], "model.lr=-0.001 is out of range: allowed (0, inf)"),
    (["--model.target.alpha", "0"], "model.target.alpha=0.0 is out of range: allowed (0, 1]"),
    (["--model.target.alpha", "1.5"], "model.target.alpha=1.5 is out of range: allowed (0, 1]"),
    (["--model.td.gamma", "1.0"], "model.td.gamma=1.0 is out of range: allowed [0, 1)"),
    (["--model.td.gamma", "-0.1"], "model.td.gamma=-0.1 is out of range: allowed [0, 1)"),
    (["--model.td.loss", "l1"], "model.td.loss='l1': choose one of 'mse', 'normalized'"),
    (["--model.td.reward_scale", "0"], "model.td.reward_scale=0.0 is out of range: allowed (0, inf)"),
    (["--model.td.conflict_weight", "-1"], "model.td.conflict_weight=-1.0 is out of range: allowed [0, inf)"),
    (["--model.cql.weight", "-1"],
     "model.cql.weight=-1.0 is out of range: allowed (0, inf) (model.cql: null turns the penalty off)"),
    (["--model.cql.weight", "0"],
     "model.cql.weight=0.0 is out of range: allowed (0, inf) (model.cql: null turns the penalty off)"),
    (["--model.cql.episodes", "failures"], "model.cql.episodes='failures': choose one of 'all', 'successful'"),
    (["--model.q_head", "mlp"], "model.q_head='mlp': choose one of 'tokens', 'linear'"),
    (["--model.evaluation.scenario", "bandit"],
     "model.evaluation.scenario='bandit': choose one of 'standard', 'nonstationary', 'stitching'"),
    (["--model.evaluation.schedule", "[0.5, 1.5]"],
     "model.evaluation.schedule: probabilities must lie in [0, 1], got [1.5]"),
    (["--model.evaluation.last_k", "0"], "model.evaluation.last_k=0 is out of range: allowed [1, inf)"),
    (["--model.evaluation.max_context", "100"],
     "evaluation max_context=100 tokens (0 = data.seq_len) cannot hold one longest episode"),
    (["--data.seq_len", "100"],
     "data.seq_len=100 is out of range: allowed [205, inf) (an episode of data.env.max_episode_steps=100 steps "
     "is 205 tokens in the compact_outcome format)"),
    (["--data.set_size_min", "30", "--data.set_size_max", "20"],
     "data.set_size_max=20 is out of range: allowed [30, inf) (at least data.set_size_min)"),
    (["--data.set_size_min", "0"], "data.set_size_min=0 is out of range: allowed [1, inf)"),
    (["--data.env.min_size", "1"],
     "data.env.min_size=1 is out of range: allowed [2, inf) (a map is at least 2 x 2 tiles)"),
    (["--data.env.max_size", "2"],
     "data.env.max_size=2 is out of range: allowed [3, inf) (at least data.env.min_size)"),
    (["--data.env.max_size", "9"],
     "data.env.max_size: maps of 81 tiles, but the model's tokenizer writes at most 64 tiles"),
    (["--data.env.p_hole", "1.0"], "data.env.p_hole=1.0 is out of range: allowed [0, 1)"),
    (["--data.env.p_hole", "-0.2"], "data.env.p_hole=-0.2 is out of range: allowed [0, 1)"),
    (["--data.env.min_hops", "9"],
     "data.env.min_hops=9 is out of range: allowed [0, 8] (the farthest tiles of a 5 x 5 map are 8 moves apart)"),
    (["--data.env.max_episode_steps", "0"], "data.env.max_episode_steps=0 is out of range: allowed [1, inf)"),
    (["--data.behaviour.epsilon", "1.5"], "data.behaviour.epsilon=1.5 is out of range: allowed [0, 1]"),
    (["--data.behaviour.lr", "0"], "data.behaviour.lr=0.0 is out of range: allowed (0, 1]"),
    (["--data.behaviour.q_init", "-1"], "data.behaviour.q_init=-1.0 is out of range: allowed [0, inf)"),
    (["--data.num_train_maps", "0"], "data.num_train_maps=0 is out of range: allowed [1, inf)"),
    (["--data.episodes_per_map", "0"], "data.episodes_per_map=0 is out of range: allowed [1, inf)"),
    (["--data.batch_size", "0"], "data.batch_size=0 is out of range: allowed [1, inf)"),
    (["--data.eval_maps", "201"],
     "data.eval_maps=201 is out of range: allowed [1, 200] (200 maps of each split are reserved for evaluation)"),
    (["--data.quality", "best"], "data.quality='best': choose one of 'high', 'medium', 'low'"),
    (["--data.set_order", "sorted"], "data.set_order='sorted': choose one of 'random', 'learning'"),
    (["--data.eval_split", "train"], "data.eval_split='train': choose one of 'heldout', 'ood'"),
    (["--data.seed", "-1"], "data.seed=-1 is out of range: allowed [0, inf) (numpy seeds are non-negative)"),
    (["--data.split_seed", "-1"],
     "data.split_seed=-1 is out of range: allowed [0, inf) (numpy seeds are non-negative)"),
]


@pytest.mark.parametrize(("args", "message"), IMPOSSIBLE, ids=[" ".join(a) for a, _ in IMPOSSIBLE])
def test_impossible_value_fails_before_any_work(tmp_path, capsys, args, message):
    err = _cli_error(["fit", *_args(tmp_path), *args], capsys)
    assert f"error: {message}" in err
    assert "Traceback" not in err
    # Nothing was built, logged or trained.
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


# --- 2. bad files: every file argument fails with one line naming it -----------------------------------
BAD_MAP_FILES = [
    ('[["SFF", "FFG"], ', " is not valid JSON (Expecting value at line 1, column 18)"),
    ('{"maps": []}', ": expected a non-empty JSON list of maps (lists of row strings)"),
    ("[]", ": expected a non-empty JSON list of maps (lists of row strings)"),
    ('[["SFF", "FFG"], ["SFF", "FG"]]', ", map 1: row 1 has 2 tiles, row 0 has 3 (ragged map)"),
    ('[["SFF", "FFG"], ["FFF", "FFG"]]', ", map 1: the map has no start tile 'S'"),
    ('[["SFF", "FFG"], ["SF", "FG"], ["SFF", "FFF"]]', ", map 2: the map has no goal tile 'G'"),
    ('[["SFF", "FXG"]]', ", map 0: row 1 has unknown tile letters ['X'] (allowed: S F H G)"),
    ('[["SFF", "FFG"], "SHFG"]', ", map 1: a map is a list of row strings, got str 'SHFG'"),
    ('[["SFF", "FFG"], ["SHG", "HFF"]]',
     ", map 1: no path from start tile(s) [0] to a goal (holes block every way): the agent could never solve it"),
]


@pytest.mark.parametrize(("text", "message"), BAD_MAP_FILES, ids=[m for _, m in BAD_MAP_FILES])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_bad_map_file(tmp_path, capsys, text, message, subcommand):
    path = tmp_path / "my-maps.json"
    path.write_text(text)
    err = _cli_error([subcommand, *_args(tmp_path), "--data.eval_map_file", str(path)], capsys)
    assert f"error: data.eval_map_file: {path}{message}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()  # failed before the dataset was built


def _bad_path(tmp: Path, kind: str) -> Path:
    """A file argument that is wrong in one way: missing, a folder, empty, not text, ..."""
    p = tmp / f"bad-{kind}"
    if kind == "folder":
        p.mkdir()
    elif kind == "empty":
        p.write_text("")
    elif kind == "binary":
        p.write_bytes(b"\xff\xfe\x00garbage")
    elif kind == "text":
        p.write_text("just some text\n")
    return p


FILE_KINDS = {"missing": "does not exist", "folder": "is a folder", "empty": "is empty",
              "binary": "is not a text file (not UTF-8)"}


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_bad_map_file_kinds(tmp_path, capsys, kind):
    path = _bad_path(tmp_path, kind)
    err = _cli_error(["validate", *_args(tmp_path), "--data.eval_map_file", str(path)], capsys)
    assert err.strip() == f"error: data.eval_map_file: {path} {FILE_KINDS[kind]}" + (
        ", not a file" if kind == "folder" else "")


CONFIG_KINDS = {**FILE_KINDS, "list": "expected a mapping of sections", "broken": "is not valid YAML at line 2"}


@pytest.mark.parametrize("kind", sorted(CONFIG_KINDS))
def test_bad_config_file(tmp_path, capsys, kind):
    if kind == "list":
        path = tmp_path / "list.yaml"
        path.write_text("- 1\n- 2\n")
    elif kind == "broken":
        path = tmp_path / "broken.yaml"
        path.write_text("model: [lr\n")
    else:
        path = _bad_path(tmp_path, kind)
    err = _cli_error(["fit", *_args(tmp_path), "-c", str(path)], capsys)
    assert err.startswith("error: -c") and str(path) in err and CONFIG_KINDS[kind] in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _not_a_checkpoint(tmp: Path, kind: str) -> Path:
    if kind == "torch-dict":  # a real torch file, but not a Lightning checkpoint
        p = tmp / "weights.pt"
        torch.save({"w": torch.zeros(2)}, p)
        return p
    return _bad_path(tmp, kind)


CKPT_KINDS = {"missing": "does not exist", "folder": "is a folder; give a .ckpt file",
              "empty": "is empty", "binary": "is not a PyTorch checkpoint (not the zip archive torch.save writes)",
              "text": "is not a PyTorch checkpoint (not the zip archive torch.save writes)",
              "torch-dict": "is not a checkpoint written by icrl_lightning's fit"}


@pytest.mark.parametrize("kind", sorted(CKPT_KINDS))
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_bad_checkpoint(tmp_path, capsys, kind, subcommand):
    path = _not_a_checkpoint(tmp_path, kind)
    err = _cli_error([subcommand, *_args(tmp_path), "--ckpt_path", str(path)], capsys)
    assert err.startswith(f"error: --ckpt_path: {path} {CKPT_KINDS[kind]}"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "data").exists()


def test_validate_last_without_a_checkpoint(tmp_path, capsys):
    err = _cli_error(["validate", *_args(tmp_path), "--ckpt_path", "last"], capsys)
    assert err.startswith("error: --ckpt_path last: this experiment has no last*.ckpt to evaluate")


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "binary", "text"])
def test_bad_stitching_file(tmp_path, capsys, kind):
    path = _bad_path(tmp_path, kind)
    err = _cli_error(["validate", *_args(tmp_path), "-c", str(REPO / "conf/experiment/eval_stitching.yaml"),
                      "--model.evaluation.stitching_file", str(path)], capsys)
    assert err.startswith(f"error: model.evaluation.stitching_file: {path}"), err
    assert len(err.strip().splitlines()) == 1


def test_data_dir_that_is_a_file(tmp_path, capsys):
    path = _bad_path(tmp_path, "text")
    err = _cli_error(["fit", *_args(tmp_path, data_dir=path)], capsys)
    assert err.strip() == f"error: data.data_dir={str(path)!r} is a file: give a folder (datasets are built under it)"


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text"])
def test_bad_model_path(tmp_path, capsys, kind):
    path = _bad_path(tmp_path, kind)
    if kind != "folder":
        path = path.with_suffix(".gguf")
        if kind != "missing":
            path.write_text("" if kind == "empty" else "not a gguf file")
    err = _cli_error(["fit", *_args(tmp_path), "-c", str(REPO / "conf/model/smollm2_135m_ia3.yaml"),
                      "--model.pretrained.path", str(path)], capsys)
    assert err.startswith("error: ") and str(path) in err and "model.pretrained" in err + "GGUF", err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _copy_dataset(src_root: Path, dst_root: Path) -> Path:
    shutil.copytree(src_root, dst_root)
    return _datamodule(dst_root).dataset_dir


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _wrong_schema(p: Path):
    pq.write_table(pa.table({"x": [1, 2]}), p)


DAMAGE = {
    "truncated": _truncate,
    "garbage": lambda p: p.write_bytes(b"not parquet at all"),
    "empty": lambda p: p.write_bytes(b""),
    "wrong-schema": _wrong_schema,
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_shard_names_the_file_and_the_fix(tmp_path, tiny_data_dir, damage):
    out = _copy_dataset(tiny_data_dir, tmp_path / "data")
    shard = out / "shard-00000.parquet"
    DAMAGE[damage](shard)
    with pytest.raises(InputError) as err:
        read_shard(shard)
    assert str(err.value).startswith(f"episode shard {shard} is unreadable (")
    assert f"delete the dataset folder {out} and run again to rebuild it" in str(err.value)
    with pytest.raises(InputError, match=re.escape(str(shard))):
        _datamodule(tmp_path / "data").load_episodes()


def test_damaged_shard_through_the_cli(tmp_path, tiny_data_dir, capsys):
    out = _copy_dataset(tiny_data_dir, tmp_path / "data")
    _truncate(out / "shard-00000.parquet")
    err = _cli_error(["fit", *_args(tmp_path)], capsys)
    assert f"error: episode shard {out / 'shard-00000.parquet'} is unreadable" in err
    assert "Traceback" not in err


def test_damaged_manifest(tmp_path, tiny_data_dir):
    out = _copy_dataset(tiny_data_dir, tmp_path / "data")
    _truncate(out / "manifest.json")
    with pytest.raises(InputError, match=re.escape(f"dataset manifest {out / 'manifest.json'} is damaged")):
        _datamodule(tmp_path / "data").load_episodes()


# --- 3. nothing half-written ---------------------------------------------------------------------------------
def test_killed_build_is_resumed_never_read_as_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_mod, "MAPS_PER_SHARD", 2)  # two shards for the tiny dataset
    reference = _datamodule(tmp_path / "ref")
    reference.prepare_data()
    assert sorted(p.name for p in reference.dataset_dir.iterdir()) == [
        "manifest.json", "shard-00000.parquet", "shard-00001.parquet"]

    # A build that dies while writing its second shard: the process is gone half-way through
    # writing the file (a stray temporary file stays behind) and no manifest was written.
    real_write_table = pq.write_table

    def dying_write_table(table, where, **kw):
        if "shard-00001" in str(where):
            Path(where).write_bytes(b"PAR1 half a shard")
            raise KeyboardInterrupt("killed")
        real_write_table(table, where, **kw)

    dm = _datamodule(tmp_path / "run")
    monkeypatch.setattr(episodes_mod.pq, "write_table", dying_write_table)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    monkeypatch.setattr(episodes_mod.pq, "write_table", real_write_table)
    out = dm.dataset_dir
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet"]  # the temporary file was removed
    # A process that is SIGKILLed cannot clean up: leave a stray temporary file as it would.
    (out / ".shard-00001.parquet.99999.tmp").write_bytes(b"PAR1 half a shard")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        dm.load_episodes()  # never read as complete

    first = out / "shard-00000.parquet"
    mtime = first.stat().st_mtime_ns
    dm.prepare_data()  # resumes: keeps the finished shard, writes the rest, then the manifest
    assert first.stat().st_mtime_ns == mtime
    for name in ("manifest.json", "shard-00000.parquet", "shard-00001.parquet"):
        assert (out / name).read_bytes() == (reference.dataset_dir / name).read_bytes(), name
    assert len(dm.load_episodes()) == 40


def test_resumed_build_rebuilds_a_damaged_shard(tmp_path):
    dm = _datamodule(tmp_path)
    dm.prepare_data()
    out = dm.dataset_dir
    good = (out / "shard-00000.parquet").read_bytes()
    (out / "manifest.json").unlink()
    _truncate(out / "shard-00000.parquet")  # e.g. a copy cut short, under the final name
    dm.prepare_data()
    assert (out / "shard-00000.parquet").read_bytes() == good


def test_report_write_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json_atomic({"n": 1}, path)
    with pytest.raises(TypeError):
        write_json_atomic({"n": object()}, path)  # fails while serialising
    real_write_text = Path.write_text

    def dying_write_text(self, text, *a, **kw):
        real_write_text(self, text[: len(text) // 2], *a, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", dying_write_text)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic({"n": 2, "pad": "x" * 1000}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# --- 5. a non-finite loss --------------------------------------------------------------------------------------
class _Poisoned:
    """Yields the loader's batches with an infinite reward in batch ``at``."""

    def __init__(self, loader, at: int):
        self.loader, self.at = loader, at

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.at:
                batch["reward"] = torch.where(batch["q_mask"], torch.inf, batch["reward"])
            yield batch


class _PoisonedData(ReplayDataModule):
    def train_dataloader(self):
        return _Poisoned(super().train_dataloader(), at=3)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data_dir, tiny_backbone):
    torch.manual_seed(0)
    module = ICRLModule(backbone=tiny_backbone(), seq_len=256, evaluation=EvalProtocol(max_episode_steps=30))
    dm = _PoisonedData(data_dir=str(tiny_data_dir), num_train_maps=4, episodes_per_map=10, seq_len=256,
                       batch_size=2, eval_maps=3).set_serializer(module.serializer, module.batch_fields)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt],
                        default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite TD loss \(inf\) at global step 3\b"):
        trainer.fit(module, datamodule=dm)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # The weights in memory are still the last good ones (no step was taken on the bad batch).
    for k, v in module.state_dict().items():
        assert torch.equal(v, last["state_dict"][k]), k


# --- 6. untrusted inputs ----------------------------------------------------------------------------------------
def _sources() -> list[Path]:
    files = sorted((REPO / "icrl_lightning").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    assert len(files) > 10
    return files


def test_no_pickle_loads_and_no_remote_code():
    for path in _sources():
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(", text):
            # the call's arguments, up to its closing parenthesis
            depth, end = 0, call.end() - 1
            for end in range(call.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            assert "weights_only=True" in text[call.start():end], f"{path}: torch.load without weights_only=True"
        assert not re.search(r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|\bjoblib\.load\(", text), path
        assert not re.search(r"trust_remote_code\s*=\s*True", text), f"{path}: trust_remote_code hard-coded on"


def test_checkpoints_load_without_unpickling(tmp_path, capsys):
    main(["fit", *_args(tmp_path), "--trainer.limit_val_batches", "0"])
    ckpts = list((tmp_path / "logs").rglob("*.ckpt"))
    assert ckpts
    for path in ckpts:
        torch.load(path, weights_only=True, map_location="cpu")  # plain tensors and containers only


# --- 7. determinism ---------------------------------------------------------------------------------------------
_BUILD = """
import json, sys
from icrl_lightning.data import ReplayDataModule
ReplayDataModule(data_dir=sys.argv[1], **json.loads(sys.argv[2])).prepare_data()
"""


def test_same_dataset_bytes_in_another_process(tmp_path):
    """Built here and in a fresh process with another hash seed: byte-identical shards."""
    here = _datamodule(tmp_path / "a")
    here.prepare_data()
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / "b"), json.dumps(TINY_DATA)], env=env, check=True,
                   timeout=300)
    there = _datamodule(tmp_path / "b").dataset_dir
    assert here.dataset_dir.name == there.name
    names = sorted(p.name for p in here.dataset_dir.iterdir())
    assert names == sorted(p.name for p in there.iterdir())
    for name in names:
        assert (here.dataset_dir / name).read_bytes() == (there / name).read_bytes(), name


SCHEDULE = "[0.0, 0.3, 0.6, 0.9, 1.0, 1.0]"


def test_same_evaluation_report_twice(tmp_path):
    main(["fit", *_args(tmp_path), "--trainer.limit_val_batches", "0"])
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    reports = []
    for _ in range(2):
        before = set((tmp_path / "logs").rglob("report.json"))
        main(["validate", *_args(tmp_path), "--ckpt_path", str(ckpt), "--model.evaluation.schedule", SCHEDULE])
        (new,) = set((tmp_path / "logs").rglob("report.json")) - before
        report = json.loads(new.read_text())
        report.pop("timings")
        reports.append(report)
    assert reports[0] == reports[1]
    returns = np.array(reports[0]["agents"]["icrl"]["per_map"])
    assert returns.shape == (3, 6)
