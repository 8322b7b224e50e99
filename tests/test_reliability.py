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
from helpers import TINY, TINY_DATA, tiny_backbone, tiny_datamodule

import icrl_lightning.data as data_mod
import icrl_lightning.episodes as episodes_mod
from icrl_lightning.checks import InputError
from icrl_lightning.cli import main
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.episodes import read_shard, write_json_atomic
from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.module import ICRLModule

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]


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
    ("model.lr", "abc", 'Parser key "model.lr":\n  Expected a <class \'float\'>. Got value: abc'),
    ("data.seq_len", "5.5", 'Parser key "data.seq_len":\n  Expected a <class \'int\'>. Got value: 5.5'),
])
def test_wrong_type_names_the_key(tmp_path, capsys, key, value, expected):
    err = _cli_error(["fit", *_args(tmp_path), f"--{key}", value], capsys)
    assert expected in err


IMPOSSIBLE = [
    (["--model.lr", "0"], "model.lr=0.0 is out of range: allowed (0, inf)"),
    (["--model.lr", "-0.001"], "model.lr=-0.001 is out of range: allowed (0, inf)"),
    (["--model.alpha", "0"], "model.alpha=0.0 is out of range: allowed (0, 1]"),
    (["--model.alpha", "1.5"], "model.alpha=1.5 is out of range: allowed (0, 1]"),
    (["--model.gamma", "1.0"], "model.gamma=1.0 is out of range: allowed [0, 1)"),
    (["--model.gamma", "-0.1"], "model.gamma=-0.1 is out of range: allowed [0, 1)"),
    (["--model.loss", "l1"], "model.loss='l1': choose one of 'mse', 'normalized'"),
    (["--model.cql_weight", "-1"], "model.cql_weight=-1.0 is out of range: allowed [0, inf)"),
    (["--model.cql_on", "failures"], "model.cql_on='failures': choose one of ['all', 'successful']"),
    (["--model.cql_target", "bfs"], "model.cql_target='bfs': choose one of ['data', 'oracle']"),
    (["--model.cql_weight", "0", "--model.cql_target", "oracle"],
     "model.cql_on='successful' / model.cql_target='oracle' shape the conservative penalty, which is off "
     "(model.cql_weight=0): set model.cql_weight > 0"),
    (["--model.failure_reward", "0.5"], "model.failure_reward=0.5 is out of range: allowed (-inf, 0]"),
    (["--data.seq_len", "100"],
     "data.seq_len=100 is out of range: allowed [205, inf) (an episode of data.max_episode_steps=100 steps is "
     "205 tokens in the compact_outcome format)"),
    (["--data.set_size_min", "30", "--data.set_size_max", "20"],
     "data.set_size_max=20 is out of range: allowed [30, inf) (at least data.set_size_min)"),
    (["--data.set_size_min", "0"], "data.set_size_min=0 is out of range: allowed [1, inf)"),
    (["--data.min_size", "1"], "data.min_size=1 is out of range: allowed [2, inf) (a map is at least 2 x 2 tiles)"),
    (["--data.max_size", "2"], "data.max_size=2 is out of range: allowed [3, inf) (at least data.min_size)"),
    (["--data.max_size", "9"], "data.max_size: maps of 81 tiles, but the model's tokenizer writes at most 64 tiles"),
    (["--data.p_hole", "1.0"], "data.p_hole=1.0 is out of range: allowed [0, 1)"),
    (["--data.p_hole", "-0.2"], "data.p_hole=-0.2 is out of range: allowed [0, 1)"),
    (["--data.min_hops", "9"],
     "data.min_hops=9 is out of range: allowed [0, 8] (the farthest tiles of a 5 x 5 map are 8 moves apart)"),
    (["--data.behaviour_epsilon", "1.5"], "data.behaviour_epsilon=1.5 is out of range: allowed [0, 1]"),
    (["--data.behaviour_lr", "0"], "data.behaviour_lr=0.0 is out of range: allowed (0, 1]"),
    (["--data.num_train_maps", "0"], "data.num_train_maps=0 is out of range: allowed [1, inf)"),
    (["--data.episodes_per_map", "0"], "data.episodes_per_map=0 is out of range: allowed [1, inf)"),
    (["--data.max_episode_steps", "0"], "data.max_episode_steps=0 is out of range: allowed [1, inf)"),
    (["--data.batch_size", "0"], "data.batch_size=0 is out of range: allowed [1, inf)"),
    (["--data.eval_maps", "201"],
     "data.eval_maps=201 is out of range: allowed [1, 200] (200 maps of each split are reserved for evaluation)"),
    (["--data.quality", "best"], "data.quality='best': choose one of 'high', 'medium', 'low'"),
    (["--data.set_order", "sorted"], "data.set_order='sorted': choose one of 'random', 'learning', 'trial'"),
    (["--data.set_order", "trial"],
     "data.set_order=trial plays whole trials: it needs data.behaviour_schedule=protocol"),
    (["--data.behaviour_schedule", "eval"], "data.behaviour_schedule='eval': choose one of 'constant', 'protocol'"),
    (["--data.behaviour_schedule", "protocol", "--data.episodes_per_map", "100"],
     "data.episodes_per_map=100 with data.behaviour_schedule=protocol: use a multiple of 30"),
    (["--data.behaviour_q_init", "-1"], "data.behaviour_q_init=-1.0 is out of range: allowed [0, inf)"),
    (["--data.eval_split", "train"], "data.eval_split='train': choose one of 'heldout', 'ood'"),
    (["--data.seed", "-1"], "data.seed=-1 is out of range: allowed [0, inf) (numpy seeds are non-negative)"),
]


@pytest.mark.parametrize(("args", "message"), IMPOSSIBLE, ids=[" ".join(a) for a, _ in IMPOSSIBLE])
def test_impossible_value_fails_before_any_work(tmp_path, capsys, args, message):
    err = _cli_error(["fit", *_args(tmp_path), *args], capsys)
    assert f"error: {message}" in err
    assert "Traceback" not in err
    # Nothing was built, logged or trained.
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()


# --- 2. bad files ---------------------------------------------------------------------------------------
BAD_MAP_FILES = [
    ('[["SFF", "FFG"], ', " is not valid JSON: Expecting value: line 1 column 18"),
    ('{"maps": []}', ": expected a non-empty JSON list of maps (lists of row strings)"),
    ('[["SFF", "FFG"], ["SFF", "FG"]]', ", map 1: row 1 has 2 tiles, row 0 has 3 (ragged map)"),
    ('[["SFF", "FFG"], ["FFF", "FFG"]]', ", map 1: the map has no start tile 'S'"),
    ('[["SFF", "FFG"], ["SF", "FG"], ["SFF", "FFF"]]', ", map 2: the map has no goal tile 'G'"),
    ('[["SFF", "FXG"]]', ", map 0: row 1 has unknown tile letters ['X'] (allowed: S F H G)"),
    ('[["SFF", "FFG"], "SHFG"]', ", map 1: a map is a list of row strings, got str 'SHFG'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_MAP_FILES, ids=[m for _, m in BAD_MAP_FILES])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_bad_map_file(tmp_path, capsys, text, message, subcommand):
    path = tmp_path / "my-maps.json"
    path.write_text(text)
    err = _cli_error([subcommand, *_args(tmp_path), "--data.eval_map_file", str(path)], capsys)
    assert f"error: map file {path}{message}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # failed before the dataset was built


def test_missing_map_file(tmp_path, capsys):
    err = _cli_error(["validate", *_args(tmp_path), "--data.eval_map_file", str(tmp_path / "nope.json")], capsys)
    assert f"error: map file {tmp_path / 'nope.json'} does not exist" in err


def _copy_dataset(src_root: Path, dst_root: Path) -> Path:
    shutil.copytree(src_root, dst_root)
    return tiny_datamodule(dst_root).dataset_dir


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
        tiny_datamodule(tmp_path / "data").load_episodes()


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
        tiny_datamodule(tmp_path / "data").load_episodes()


# --- 3. nothing half-written ---------------------------------------------------------------------------------
def test_killed_build_is_resumed_never_read_as_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MAPS_PER_SHARD", 2)  # two shards for the tiny dataset
    reference = tiny_datamodule(tmp_path / "ref")
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

    dm = tiny_datamodule(tmp_path / "run")
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
    dm = tiny_datamodule(tmp_path)
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


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data_dir):
    torch.manual_seed(0)
    module = ICRLModule(backbone=tiny_backbone(), seq_len=256, evaluation=EvalProtocol(max_episode_steps=30))
    dm = _PoisonedData(data_dir=str(tiny_data_dir), num_train_maps=4, episodes_per_map=10, seq_len=256,
                       batch_size=2, eval_maps=3)
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
    here = tiny_datamodule(tmp_path / "a")
    here.prepare_data()
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / "b"), json.dumps(TINY_DATA)], env=env, check=True,
                   timeout=300)
    there = tiny_datamodule(tmp_path / "b").dataset_dir
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
