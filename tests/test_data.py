"""ReplayDataModule and ReplayStream: building the dataset, packing, sharding, weighting."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from icrl_lightning.backbones import build_tokenizer
from icrl_lightning.behaviour import QLearning
from icrl_lightning.checks import InputError
from icrl_lightning.data import BATCH_FIELDS, SET_ORDERS, ReplayStream, conflicts
from icrl_lightning.envs import FrozenLake, make_env, make_splits
from icrl_lightning.episodes import Episode, quality_weights, read_shard
from icrl_lightning.serialize import EncodedEpisode, Serializer

BATCH_KEYS = {"input_ids", "q_mask", "action", "reward", "done", "n_tokens"}


def _files(d):
    return {p.name: p for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def make_stream(tiny_datamodule):
    """``make_stream(data_dir, serializer, num_sequences=6, rank=0, world_size=1, batch_fields=(), **overrides)``:
    the tiny data module's replay stream."""

    def make(data_dir, serializer, num_sequences=6, rank=0, world_size=1, batch_fields=(), **overrides):
        dm = tiny_datamodule(data_dir, serializer, batch_fields, **overrides)
        return dm.train_stream(num_sequences, rank, world_size)

    return make


# --- building the dataset --------------------------------------------------------------------------
def test_prepare_data_builds_shards_and_manifest(tmp_path, tiny_datamodule):
    dm = tiny_datamodule(tmp_path)
    dm.prepare_data()
    out = dm.dataset_dir
    assert out.parent == tmp_path / "episodes"
    files = _files(out)
    assert set(files) == {"manifest.json", "shard-00000.parquet"}
    manifest = json.loads(files["manifest.json"].read_text())
    assert manifest["shards"] == ["shard-00000.parquet"]
    assert manifest["settings"] == dm.generation_settings()
    assert manifest["settings"]["num_train_maps"] == 4 and manifest["settings"]["episodes_per_map"] == 10
    maps = [tuple(m) for m in manifest["maps"]]
    assert maps == make_splits(0, 4).train
    episodes = dm.load_episodes()
    assert len(episodes) == 40
    for m in range(4):
        mine = [e for e in episodes if e.map_id == m]
        assert [e.learner_episode for e in mine] == list(range(10))
        assert all(e.map_rows == maps[m] for e in mine)
        # The behaviour learner's run on that map, seeded by (seed, 3, map).
        assert mine == dm.behaviour_run(maps[m], m, seed=[0, 3, m])
    # Evaluation maps are never trained on.
    splits = make_splits(0, 0)
    assert not set(maps) & (set(splits.heldout) | set(splits.ood))
    # Second call: nothing is rewritten.
    mtimes = {n: p.stat().st_mtime_ns for n, p in files.items()}
    dm.prepare_data()
    tiny_datamodule(tmp_path).prepare_data()
    assert {n: p.stat().st_mtime_ns for n, p in _files(out).items()} == mtimes


def test_recorded_episodes_replay_in_the_env(tiny_data_dir, tiny_datamodule):
    """Every stored episode is what the environment does with its actions."""
    episodes = tiny_datamodule(tiny_data_dir).load_episodes()
    assert any(e.success for e in episodes) and any(not e.success for e in episodes)
    for e in episodes:
        env = make_env(e.map_rows)
        obs, _ = env.reset(seed=0)
        # reset picks among the start tiles; put the agent where the episode started
        env.unwrapped.s = e.observations[0]
        assert e.map_rows[e.observations[0] // len(e.map_rows[0])][e.observations[0] % len(e.map_rows[0])] == "S"
        for t, a in enumerate(e.actions):
            obs, r, term, trunc, _ = env.step(a)
            assert obs == e.observations[t + 1] and r == e.rewards[t]
        assert term == e.terminated and trunc == e.truncated
        assert e.terminated or e.truncated
        env.close()


def test_same_seed_same_bytes_in_two_dirs(tmp_path, tiny_datamodule):
    a, b = tiny_datamodule(tmp_path / "a"), tiny_datamodule(tmp_path / "b")
    a.prepare_data()
    b.prepare_data()
    fa, fb = _files(a.dataset_dir), _files(b.dataset_dir)
    assert set(fa) == set(fb)
    for name in fa:
        assert fa[name].read_bytes() == fb[name].read_bytes(), name


def test_settings_pick_the_dataset_folder(tmp_path, tiny_datamodule):
    base = tiny_datamodule(tmp_path)
    assert tiny_datamodule(tmp_path, batch_size=7, seq_len=999).dataset_dir == base.dataset_dir
    assert tiny_datamodule(tmp_path, quality="high", set_order="learning").dataset_dir == base.dataset_dir
    assert tiny_datamodule(tmp_path, seed=1).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, episodes_per_map=11).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, behaviour=QLearning(q_init=1.0)).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, behaviour=QLearning(epsilon=0.2)).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, env=FrozenLake(max_episode_steps=60)).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, env=FrozenLake(max_size=4)).dataset_dir != base.dataset_dir
    # The defaults, given explicitly, are the same dataset.
    assert tiny_datamodule(tmp_path, env=FrozenLake(), behaviour=QLearning()).dataset_dir == base.dataset_dir
    # Options added later enter the key only when set: older datasets keep their folder.
    assert "behaviour_q_init" not in base.generation_settings()
    assert "split_seed" not in base.generation_settings()


def test_dataset_key_of_the_defaults_is_the_original_one(tmp_path, tiny_datamodule):
    """The folder name is the hash of the settings the first version wrote (same names, same
    values): the redesign and ``split_seed == seed`` keep existing datasets where they are."""
    for seed in (0, 1):
        original = {"learner": "tabular_q", "version": 1, "seed": seed, "num_train_maps": 4, "episodes_per_map": 10,
                    "behaviour_epsilon": 0.1, "behaviour_lr": 0.5, "behaviour_gamma": 0.9, "max_episode_steps": 100,
                    "min_size": 3, "max_size": 5, "p_hole": 0.2, "min_hops": 4}
        key = hashlib.sha256(json.dumps(original, sort_keys=True).encode()).hexdigest()[:12]
        dm = tiny_datamodule(tmp_path, seed=seed, split_seed=seed)
        assert dm.generation_settings() == original
        assert dm.dataset_dir == tmp_path / "episodes" / key
    # The folder the version before the redesign used for the tiny dataset.
    assert tiny_datamodule(tmp_path).dataset_dir.name == "5f8865021c16"


def test_tiny_dataset_episodes_are_pinned(tiny_data_dir, tiny_datamodule):
    """The tiny dataset's episodes (maps, steps, order) are those the version before the redesign
    generated at the same seed: a change here changes every dataset."""
    eps = tiny_datamodule(tiny_data_dir).load_episodes()
    rec = [[e.map_id, list(e.map_rows), list(e.observations), list(e.actions), [float(r) for r in e.rewards],
            bool(e.terminated), bool(e.truncated), e.learner_episode] for e in eps]
    assert (len(eps), sum(e.success for e in eps)) == (40, 24)
    assert hashlib.sha256(json.dumps(rec).encode()).hexdigest()[:16] == "8d5a5063d560e6e3"


def test_interrupted_build_resumes_and_incomplete_is_refused(tmp_path, tiny_datamodule):
    dm = tiny_datamodule(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest"):
        dm.load_episodes()
    dm.prepare_data()
    shard = dm.dataset_dir / "shard-00000.parquet"
    good = shard.read_bytes()
    (dm.dataset_dir / "manifest.json").unlink()
    before = shard.stat().st_mtime_ns
    dm.prepare_data()  # the finished shard is kept, the manifest rewritten
    assert shard.stat().st_mtime_ns == before and shard.read_bytes() == good
    assert (dm.dataset_dir / "manifest.json").exists()
    shard.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="shard-00000"):
        dm.load_episodes()


# --- split_seed: evaluation maps fixed across data seeds -------------------------------------------------
def test_split_seed_shares_the_evaluation_maps_across_seeds(tmp_path, tiny_datamodule):
    a = tiny_datamodule(tmp_path, seed=0)
    b = tiny_datamodule(tmp_path, seed=1, split_seed=0, eval_split="ood")
    heldout, ood = a.heldout_maps("heldout"), a.heldout_maps("ood")
    assert len(heldout) == len(ood) == 200
    assert b.heldout_maps("heldout") == heldout and b.heldout_maps("ood") == ood
    b.setup("validate")
    assert b.eval_maps == ood[:3]
    # Another split_seed, other evaluation maps.
    own = tiny_datamodule(tmp_path, seed=1, split_seed=1)
    assert own.heldout_maps("heldout") != heldout
    # Another split_seed is another dataset (its training maps exclude other maps).
    assert b.generation_settings() == {**own.generation_settings(), "split_seed": 0}
    assert b.dataset_dir != own.dataset_dir


def test_training_maps_never_contain_the_evaluation_maps_of_split_seed(tmp_path, tiny_datamodule):
    """3 x 3 maps are few, so a run at seed 1 would draw held-out maps of split_seed 0 if they were
    not excluded (see test_envs); the dataset's training maps hold none of them."""
    env = FrozenLake(min_size=3, max_size=3, min_hops=3)
    dm = tiny_datamodule(tmp_path, seed=1, split_seed=0, env=env, num_train_maps=30, episodes_per_map=1)
    dm.prepare_data()
    train = {tuple(m) for m in json.loads((dm.dataset_dir / "manifest.json").read_text())["maps"]}
    assert len(train) == 30
    reserved = set(dm.heldout_maps("heldout")) | set(dm.heldout_maps("ood"))
    assert reserved == set(env.splits(0, 0).heldout) | set(env.splits(0, 0).ood)
    assert not train & reserved
    assert {e.map_rows for e in dm.load_episodes()} == train


# --- the stream from the real dataset -------------------------------------------------------------
def _split_episodes(ids: list[int], s: Serializer) -> list[list[int]]:
    start, end = s.piece(s.fmt.episode_start)[0], s.piece(s.fmt.episode_end)[0]
    out, cur = [], None
    for t in ids:
        if t == start:
            assert cur is None, "an episode starts inside another"
            cur = [t]
        else:
            assert cur is not None, "tokens outside an episode"
            cur.append(t)
            if t == end:
                out.append(cur)
                cur = None
    assert cur is None, "the sequence ends inside an episode"
    return out


def test_stream_packs_whole_episodes(tiny_data_dir, compact, make_stream, tiny_datamodule):
    stream = make_stream(tiny_data_dir, compact, num_sequences=6)
    known = {}
    for e in tiny_datamodule(tiny_data_dir).load_episodes():
        enc = compact.encode(e)
        known[tuple(enc.ids.tolist())] = enc
    items = list(stream)
    assert len(items) == len(stream) == 6
    for it in items:
        assert set(it) == BATCH_KEYS  # no extra fields unless asked for
        ids = it["input_ids"]
        assert ids.shape == (256,) and ids.dtype == torch.long
        for k in ("q_mask", "action", "reward", "done"):
            assert it[k].shape == (256,)
        n = int(it["n_tokens"])
        assert 0 < n <= 256
        assert (ids[n:] == compact.pad_id).all()  # padding only at the end
        assert not (ids[:n] == compact.pad_id).any()
        assert not it["q_mask"][n:].any()
        episodes = _split_episodes(ids[:n].tolist(), compact)
        at = 0
        for ep in episodes:
            enc = known[tuple(ep)]  # a whole, unmodified episode of the dataset
            pos = enc.q_pos + at
            mask = torch.zeros(256, dtype=torch.bool)
            mask[pos] = True
            assert torch.equal(it["q_mask"][at:at + len(ep)], mask[at:at + len(ep)])
            assert it["action"][pos].tolist() == enc.actions.tolist()
            assert it["reward"][pos].tolist() == enc.rewards.tolist()
            assert it["done"][pos].tolist() == [False] * (len(pos) - 1) + [True]
            # the action that follows each q position is the token after it
            assert ids[pos + 1].tolist() == compact.action_token_ids[enc.actions].tolist()
            at += len(ep)
        assert at == n
        assert it["done"].sum() == len(episodes)
        assert not (it["done"] & ~it["q_mask"]).any()
        # The next episode would not have fitted (packing is greedy).
        assert 256 - n < max(len(k) for k in known)


def test_outcome_tagged_stream_writes_failures_with_their_own_tokens(tiny_data_dir, make_stream):
    """compact_outcome: in training sequences an episode without reward starts with <ep-> and writes
    its tiles as x-tokens; a success is written exactly as in compact."""
    s = Serializer(build_tokenizer("compact_outcome"), "compact_outcome")
    vocab = {i: t for t, i in s._tokenizer.get_vocab().items()}
    won = lost = 0
    for it in make_stream(tiny_data_dir, s, num_sequences=4):
        ids, n = it["input_ids"].tolist(), int(it["n_tokens"])
        done = torch.nonzero(it["done"]).flatten().tolist()
        starts = [j for j in range(n) if vocab[ids[j]] in ("<ep>", "<ep->")]
        assert len(starts) == len(done)
        for a, last in zip(starts, done, strict=True):
            toks = [vocab[t] for t in ids[a:last + 3]]
            success = float(it["reward"][last]) > 0
            tiles = [t for t in toks if t[0] in "ox" and t[1:].isdigit()]
            assert toks[0] == ("<ep>" if success else "<ep->")
            assert tiles and all(t[0] == ("o" if success else "x") for t in tiles)
            won, lost = won + success, lost + (not success)
    assert won and lost


def test_stream_is_deterministic_per_seed(tiny_data_dir, compact, make_stream):
    a = list(make_stream(tiny_data_dir, compact))
    b = list(make_stream(tiny_data_dir, compact))
    st = make_stream(tiny_data_dir, compact)
    c = list(ReplayStream(st.episodes, st.weights, st.seq_len, st.pad_id, st.num_sequences, st.set_size, seed=1))
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k])
    assert any(not torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c, strict=True))


def test_seq_len_shorter_than_longest_episode(tiny_data_dir, compact, make_stream):
    with pytest.raises(InputError, match="seq_len"):
        make_stream(tiny_data_dir, compact, seq_len=20)
    # The stream itself refuses too (for episodes handed over directly).
    st = make_stream(tiny_data_dir, compact)
    longest = max(len(e) for eps in st.episodes.values() for e in eps)
    with pytest.raises(InputError, match=rf"data\.seq_len={longest - 1} is shorter than the longest episode "
                                         rf"\({longest} tokens\)"):
        ReplayStream(st.episodes, st.weights, longest - 1, st.pad_id, 2)
    assert len(ReplayStream(st.episodes, st.weights, longest, st.pad_id, 2)) == 2


def test_llama3_episodes_need_longer_sequences(tiny_data_dir, make_stream, tiny_datamodule):
    # Same episodes, ten tokens a step: 256 tokens no longer hold the longest one.
    s = Serializer(build_tokenizer("llama3"), "llama3")
    with pytest.raises(InputError, match=r"data\.seq_len=256 is out of range.*llama3 format"):
        make_stream(tiny_data_dir, s)
    # The episodes of the dataset alone do not fit either.
    dm = tiny_datamodule(tiny_data_dir, s, seq_len=2048)
    st = dm.train_stream(2)
    with pytest.raises(InputError, match="seq_len=256 is shorter than the longest episode"):
        ReplayStream(st.episodes, st.weights, 256, st.pad_id, 2)
    items = list(make_stream(tiny_data_dir, s, seq_len=2048, num_sequences=2))
    assert all(it["input_ids"].shape == (2048,) for it in items)


# --- the stream on synthetic episodes ---------------------------------------------------------------
def test_ranks_and_workers_read_disjoint_maps(compact, synthetic, decode_stream):
    episodes, weights, _ = synthetic(compact, n_maps=8, n_eps=30)
    seen = []
    for rank in (0, 1):
        st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=20, set_size=(2, 4),
                          seed=0, rank=rank, world_size=2)
        items = list(st)
        assert len(items) == 20
        seen.append({m for m, _ in decode_stream(items, compact)})
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(8))
    # Two workers per rank: four disjoint readers, and each rank's DataLoader yields its full count.
    readers = []
    for rank in (0, 1):
        st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=8, set_size=(2, 4),
                          seed=0, rank=rank, world_size=2, batch_size=2)
        batches = list(DataLoader(st, batch_size=2, num_workers=2))
        assert len(batches) == 4
        per_batch = [{m for m, _ in decode_stream([{k: v[b] for k, v in batch.items()} for b in range(2)], compact)}
                     for batch in batches]
        # The DataLoader takes batches from its workers in turn.
        readers += [per_batch[0] | per_batch[2], per_batch[1] | per_batch[3]]
    assert all(readers)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not readers[i] & readers[j], (i, j, readers)


def test_more_readers_than_maps_is_an_error(compact, synthetic):
    episodes, weights, _ = synthetic(compact, n_maps=2, n_eps=5)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=2, seed=0, rank=2,
                      world_size=3)
    with pytest.raises(InputError, match="maps"):
        list(st)


def _runs(stream, joined):
    runs = [[stream[0]]]
    for a, b in zip(stream, stream[1:], strict=False):
        if joined(a, b):
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def test_random_order_sets(compact, synthetic, decode_stream):
    lo, hi = 3, 5
    episodes, weights, _ = synthetic(compact, n_maps=6, n_eps=40)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=60, set_size=(lo, hi),
                      seed=0)
    stream = decode_stream(list(st), compact)
    runs = _runs(stream, lambda a, b: a[0] == b[0])
    assert len(runs) > 10
    for run in runs[:-1]:  # the last one may be cut by the end of the stream
        assert len(run) >= lo
        if len(run) <= hi:  # a single set: episodes drawn without replacement
            assert len({j for _, j in run}) == len(run)
    # Not in learning order: consecutive indices are no more common than chance.
    consecutive = sum(b == (a[0], a[1] + 1) for a, b in zip(stream, stream[1:], strict=False))
    assert consecutive < 0.2 * len(stream)


def test_learning_order_windows(compact, synthetic, decode_stream):
    lo, hi = 3, 5
    episodes, weights, _ = synthetic(compact, n_maps=6, n_eps=40)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=60, set_size=(lo, hi),
                      seed=0, set_order="learning")
    stream = decode_stream(list(st), compact)
    runs = _runs(stream, lambda a, b: b == (a[0], a[1] + 1))
    assert len(runs) > 10
    for run in runs[:-1]:
        assert len(run) >= lo  # each run is one or more whole windows of consecutive episodes
    # Windows of at most `hi` start anywhere in the run, so most runs are single windows.
    assert sum(len(r) <= hi for r in runs) >= 0.5 * len(runs)


@pytest.mark.parametrize("order", ["sorted", "trial"])
def test_bad_set_order(compact, synthetic, tmp_path, tiny_datamodule, order):
    assert SET_ORDERS == ("random", "learning")  # "trial" (whole protocol trials) was removed
    episodes, weights, _ = synthetic(compact, n_maps=2, n_eps=5)
    with pytest.raises(InputError, match=rf"data\.set_order='{order}': choose one of 'random', 'learning'"):
        ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=2, set_order=order)
    with pytest.raises(InputError, match=rf"data\.set_order='{order}'"):
        tiny_datamodule(tmp_path, set_order=order)


# --- quality weighting ---------------------------------------------------------------------------------
def test_quality_weights_values():
    eps = [Episode([0, 1], [2], [r], True, False, map_id=0, map_rows=("SG",)) for r in (1.0, 0.0, 0.0, 1.0)]
    assert quality_weights(eps, "high").tolist() == [5.0, 1.0, 1.0, 5.0]
    assert quality_weights(eps, "medium").tolist() == [1.0, 1.0, 1.0, 1.0]
    assert quality_weights(eps, "low").tolist() == [1.0, 5.0, 5.0, 1.0]
    with pytest.raises(InputError, match="quality"):
        quality_weights(eps, "best")


@pytest.mark.parametrize(("quality", "lo", "hi"), [("high", 0.75, 0.92), ("medium", 0.4, 0.6), ("low", 0.08, 0.25)])
def test_quality_changes_the_success_share(compact, synthetic, decode_stream, quality, lo, hi):
    # Half the episodes succeed; sets of 2 from 60 make the weights matter (SPEC: 5x).
    episodes, _, raw = synthetic(compact, n_maps=2, n_eps=60)
    weights = {m: quality_weights(raw[m], quality) for m in raw}
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=150, set_size=(2, 2),
                      seed=0)
    stream = decode_stream(list(st), compact)
    share = np.mean([j % 2 == 0 for _, j in stream])
    assert lo < share < hi, share


def test_datamodule_quality_option_reaches_the_stream(tiny_data_dir, compact, make_stream, tiny_datamodule):
    high = make_stream(tiny_data_dir, compact, quality="high")
    low = make_stream(tiny_data_dir, compact, quality="low")
    raw = {}
    for e in tiny_datamodule(tiny_data_dir).load_episodes():
        raw.setdefault(e.map_id, []).append(e)
    for m in raw:
        assert high.weights[m].tolist() == [5.0 if e.success else 1.0 for e in raw[m]]
        assert low.weights[m].tolist() == [1.0 if e.success else 5.0 for e in raw[m]]


# --- evaluation maps ---------------------------------------------------------------------------------------
def test_eval_maps_from_splits(tiny_data_dir, tiny_datamodule):
    dm = tiny_datamodule(tiny_data_dir, eval_maps=3)
    dm.setup("validate")
    splits = make_splits(0, 0)
    assert dm.eval_maps == splits.heldout[:3]
    dm = tiny_datamodule(tiny_data_dir, eval_maps=2, eval_split="ood")
    dm.setup("validate")
    assert dm.eval_maps == splits.ood[:2]
    batches = list(dm.val_dataloader())
    assert batches == [[(0, splits.ood[0]), (1, splits.ood[1])]]
    with pytest.raises(InputError, match="eval_split"):
        tiny_datamodule(tiny_data_dir, eval_split="train").setup("validate")
    with pytest.raises(InputError, match="eval_maps"):
        tiny_datamodule(tiny_data_dir, eval_maps=201).setup("validate")
    # The selection maps: other held-out maps than the first 50, which results are reported on.
    dm = tiny_datamodule(tiny_data_dir, eval_maps=100, eval_skip=50)
    dm.setup("validate")
    assert dm.eval_maps == splits.heldout[50:150] and not set(dm.eval_maps) & set(splits.heldout[:50])
    with pytest.raises(InputError, match="data.eval_skip=150 \\+ data.eval_maps=100"):
        tiny_datamodule(tiny_data_dir, eval_maps=100, eval_skip=150).setup("validate")
    with pytest.raises(InputError, match="data.eval_skip"):
        tiny_datamodule(tiny_data_dir, eval_skip=-1)
    with pytest.raises(InputError, match="data.eval_skip=5 picks tasks of data.eval_split"):
        tiny_datamodule(tiny_data_dir, eval_skip=5, eval_map_file="maps.json")


def test_eval_map_file(tmp_path, tiny_data_dir, tiny_datamodule):
    path = tmp_path / "maps.json"
    path.write_text(json.dumps([["SFF", "FHG"], ["SF", "FG"]]))
    dm = tiny_datamodule(tiny_data_dir, eval_map_file=str(path))
    dm.setup("validate")
    assert dm.eval_maps == [("SFF", "FHG"), ("SF", "FG")]


def test_eval_map_file_is_checked_at_construction(tmp_path, tiny_data_dir, tiny_datamodule):
    """The map file is read when the data module is built: a bad file fails before any work."""
    path = tmp_path / "maps.json"
    path.write_text(json.dumps([["SF", "FG"], ["SHG", "HFF"]]))
    with pytest.raises(InputError, match=r"^data\.eval_map_file: .*maps\.json, map 1: no path from start tile"):
        tiny_datamodule(tiny_data_dir, eval_map_file=str(path))
    with pytest.raises(InputError, match=r"^data\.eval_map_file: .*missing\.json does not exist"):
        tiny_datamodule(tiny_data_dir, eval_map_file=str(tmp_path / "missing.json"))


def test_read_shard_round_trip(tiny_data_dir, tiny_datamodule):
    dm = tiny_datamodule(tiny_data_dir)
    eps = read_shard(dm.dataset_dir / "shard-00000.parquet")
    assert len(eps) == 40
    assert eps == dm.load_episodes()
    e = eps[0]
    assert isinstance(e, Episode)
    assert len(e.observations) == len(e.actions) + 1 == len(e.rewards) + 1
    assert e.ret == sum(e.rewards)
    assert isinstance(e.map_rows, tuple)


# --- the Episode record ---------------------------------------------------------------------------------
def test_episode_is_frozen_and_checks_its_lengths():
    e = Episode([0, 1, 2], [2, 2], [0.0, 1.0], True, map_id=3, map_rows=("SFG",), learner_episode=4)
    assert (e.truncated, e.map_id, e.map_rows, e.learner_episode) == (False, 3, ("SFG",), 4)
    assert e.ret == 1.0 and e.success and e.tiles == [0, 1]
    assert e.steps() == {"observations": [0, 1, 2], "actions": [2, 2], "rewards": [0.0, 1.0], "terminated": True,
                         "truncated": False}
    assert json.loads(json.dumps(e.steps())) == e.steps()
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.map_id = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.terminated = False
    fail = Episode([4], [], [], False, True)
    assert (fail.ret, fail.success, fail.tiles, fail.map_id, fail.map_rows, fail.learner_episode) == \
        (0.0, False, [], -1, (), 0)
    for obs, acts, rews in (([0, 1], [2], []), ([0], [2], [0.0]), ([0, 1, 2], [2], [0.0]), ([], [], []),
                            ([0, 1], [2, 2], [0.0, 0.0])):
        with pytest.raises(ValueError, match=r"len\(observations\) == len\(actions\) \+ 1 == len\(rewards\) \+ 1"):
            Episode(obs, acts, rews, True)


# --- the stream's length and packing -------------------------------------------------------------------------
def test_stream_yields_len_sequences(compact, synthetic):
    episodes, weights, _ = synthetic(compact, n_maps=2, n_eps=10)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=5, seed=0, batch_size=2)
    assert len(list(st)) == len(st) == 5


def _episode_of_length(n: int, tag: int) -> EncodedEpisode:
    return EncodedEpisode(ids=np.full(n, tag, dtype=np.int32), q_pos=np.zeros(0, dtype=np.int32),
                          actions=np.zeros(0, dtype=np.int64), rewards=np.zeros(0, dtype=np.float32),
                          tiles=np.zeros(0, dtype=np.int64))


@pytest.mark.parametrize(("set_order", "expected"), [
    # random order: when the next episode of the set does not fit, a later one of the same set that
    # fits goes first; the next set starts only once the current one is used up.
    ("random", [[6, 3, 1], [6, 2, 2], [4, 4, 1], [5, 5]]),
    # learning order keeps the played order: the sequence ends at the first episode that does not fit.
    ("learning", [[6], [6, 3, 1], [2, 4, 4], [2, 1, 5]]),
])
def test_packing_fills_from_the_current_set_only(set_order, expected):
    sets = [[6, 6, 3, 1], [2, 4, 4, 2, 1], [5, 5], [10]]  # episode lengths of the sets, in the order drawn
    stream = ReplayStream({0: [_episode_of_length(6, 0)]}, {0: np.ones(1)}, seq_len=10, pad_id=0, num_sequences=4,
                          set_order=set_order)
    stream.sets = lambda rng, maps: iter([[_episode_of_length(n, 10 * s + i) for i, n in enumerate(lengths)]
                                          for s, lengths in enumerate(sets)])
    chunks = stream.chunks(np.random.default_rng(0), [0])
    got = [next(chunks) for _ in range(len(expected))]
    assert [[len(e) for e in c] for c in got] == expected
    # Sets stay contiguous: every episode of set 0 comes before every episode of set 1.
    order = [int(e.ids[0]) // 10 for c in got for e in c]
    assert order == sorted(order)


def test_pack_lays_the_chunk_out_in_order(compact):
    a = compact.encode(Episode([0, 1, 5], [2, 1], [0.0, 1.0], True, map_id=0))
    b = compact.encode(Episode([0, 0], [0], [0.0], False, True, map_id=0))
    st = ReplayStream({0: [a, b]}, {0: np.ones(2)}, seq_len=20, pad_id=compact.pad_id, num_sequences=1)
    item = st.pack([a, b])
    n = len(a) + len(b)
    assert set(item) == BATCH_KEYS
    assert int(item["n_tokens"]) == n
    assert item["input_ids"][:n].tolist() == a.ids.tolist() + b.ids.tolist()
    assert (item["input_ids"][n:] == compact.pad_id).all()
    pos = [*a.q_pos.tolist(), *(b.q_pos + len(a)).tolist()]
    assert torch.nonzero(item["q_mask"]).flatten().tolist() == pos
    assert item["action"][pos].tolist() == [2, 1, 0]
    assert item["reward"][pos].tolist() == [0.0, 1.0, 0.0]
    assert torch.nonzero(item["done"]).flatten().tolist() == [pos[1], pos[2]]


# --- conflicts: the context's most recent visit failed and disagrees with its most recent success --------------
def _encoded(compact, map_id, tiles, actions, success):
    """An encoded episode on ``map_id`` that visits ``tiles`` (one per action) and ends on a goal
    (``success``) or in a hole."""
    obs = [*tiles, 63]
    rewards = [0.0] * (len(actions) - 1) + [1.0 if success else 0.0]
    return compact.encode(Episode(obs, actions, rewards, True, False, map_id=map_id))


def test_conflicts_mark_where_the_nearest_visit_failed_and_disagrees_with_the_nearest_success(compact):
    s1 = _encoded(compact, 7, [0, 1, 5], [2, 1, 2], True)
    f1 = _encoded(compact, 7, [0, 4], [1, 1], False)          # at tile 0: 1, the success took 2
    other = _encoded(compact, 8, [0, 1], [3, 3], False)       # another map: never counts
    cur = _encoded(compact, 7, [0, 1, 5, 0], [2, 1, 2, 2], True)
    flags = conflicts([s1, f1, other, cur])
    # f1 itself: its nearest visit of tile 0 is the success. cur: tile 0 (twice; only earlier
    # episodes count) last seen in f1, which disagrees with s1; tiles 1 and 5 last seen in s1.
    assert [f.tolist() for f in flags] == [[False] * 3, [False, False], [False] * 2, [True, False, False, True]]
    # Once a success takes the failure's action there, or without a success, nothing is marked.
    s2 = _encoded(compact, 7, [0, 4, 6], [1, 2, 2], True)
    assert not conflicts([s1, f1, s2, cur])[3].any()
    assert not conflicts([f1, cur])[1].any()
    # Episodes of an unknown map (map_id -1, e.g. built by hand) are never marked.
    bare = compact.encode(Episode([0, 63], [1], [0.0], True, False))
    assert bare.map_id == -1
    assert not conflicts([s1, f1, bare])[2].any()


def test_training_batches_mark_conflicts_on_action_positions_only(tiny_data_dir, compact, make_stream):
    assert BATCH_FIELDS == ("conflict", "optimal", "teacher")
    stream = make_stream(tiny_data_dir, compact, num_sequences=16, batch_fields={"conflict"})
    assert stream.fields == {"conflict"}
    items = list(stream)
    assert all(set(i) == BATCH_KEYS | {"conflict"} for i in items)
    marked = torch.stack([i["conflict"] for i in items])
    q_mask = torch.stack([i["q_mask"] for i in items])
    assert marked.dtype == torch.bool and marked.shape == q_mask.shape
    assert marked.any() and not (marked & ~q_mask).any()
    assert marked.sum() < 0.5 * q_mask.sum()
    # Without the field: no "conflict" key, and the same sequences otherwise.
    plain = list(make_stream(tiny_data_dir, compact, num_sequences=16))
    assert all(set(i) == BATCH_KEYS for i in plain)
    for x, y in zip(items, plain, strict=True):
        for k in BATCH_KEYS:
            assert torch.equal(x[k], y[k]), k


def test_packed_conflicts_are_the_chunks_conflicts(tiny_data_dir, compact, make_stream):
    """The ``conflict`` field is ``conflicts(chunk)`` laid out at each episode's action positions."""
    stream = make_stream(tiny_data_dir, compact, num_sequences=4, batch_fields={"conflict"})
    chunks = stream.chunks(np.random.default_rng(0), sorted(stream.episodes))
    seen = 0
    for _ in range(8):
        chunk = next(chunks)
        item = stream.pack(chunk)
        want = torch.zeros(stream.seq_len, dtype=torch.bool)
        at = 0
        for e, flag in zip(chunk, conflicts(chunk), strict=True):
            want[torch.from_numpy(e.q_pos.astype(np.int64) + at)] = torch.from_numpy(flag)
            at += len(e)
        assert torch.equal(item["conflict"], want)
        seen += int(want.sum())
    assert seen


def test_unknown_batch_field_is_an_error(compact, synthetic):
    episodes, weights, _ = synthetic(compact, n_maps=2, n_eps=5)
    with pytest.raises(ValueError, match=r"unknown batch fields \['best'\]"):
        ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=2, fields={"best"})
    with pytest.raises(ValueError, match=r"unknown batch fields \['truncated'\]"):
        ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=2,
                     fields={"conflict", "truncated"})


def test_parallel_build_writes_the_same_bytes(tmp_path, tiny_datamodule):
    """Shards built by two worker processes are byte-identical to a one-process build."""
    one = tiny_datamodule(tmp_path / "one", num_train_maps=60, episodes_per_map=4, build_workers=1)
    two = tiny_datamodule(tmp_path / "two", num_train_maps=60, episodes_per_map=4, build_workers=2)
    one.prepare_data()
    two.prepare_data()
    assert one.dataset_dir.name == two.dataset_dir.name  # the worker count is not a dataset setting
    names = sorted(p.name for p in one.dataset_dir.iterdir())
    assert len([n for n in names if n.endswith(".parquet")]) == 3
    assert names == sorted(p.name for p in two.dataset_dir.iterdir())
    for name in names:
        assert (one.dataset_dir / name).read_bytes() == (two.dataset_dir / name).read_bytes(), name


def test_episode_table_gives_back_the_encoded_episodes(tiny_data_dir, tiny_datamodule, compact):
    from icrl_lightning.data.stream import EpisodeTable

    dm = tiny_datamodule(tiny_data_dir, compact)
    eps = [e for e in dm.load_episodes() if e.map_id == 1]
    encoded = [compact.encode(e) for e in eps]
    table = EpisodeTable(encoded)
    assert len(table) == len(encoded)
    for got, want in zip(table, encoded, strict=True):
        for field in ("ids", "q_pos", "actions", "rewards", "tiles"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field
            assert getattr(got, field).dtype == getattr(want, field).dtype, field
        assert (got.map_id, got.success, len(got)) == (want.map_id, want.success, len(want))
    assert [e.ids.tolist() for e in table[2:5]] == [e.ids.tolist() for e in encoded[2:5]]


def test_learning_sets_are_whole_histories(compact, synthetic, decode_stream):
    episodes, weights, _ = synthetic(compact, n_maps=3, n_eps=12)
    stream = ReplayStream(episodes, weights, seq_len=400, pad_id=compact.pad_id, num_sequences=20, set_order="learning",
                          history=4, set_size=(1, 12))
    sets = stream.sets(np.random.default_rng(0), sorted(episodes))
    for _ in range(30):
        s = next(sets)
        idx = [int(compact._tokenizer.convert_ids_to_tokens(e.ids.tolist())[3][1:]) for e in s]  # episode j: o{j}
        assert len(s) == 4 and idx[0] % 4 == 0 and idx == list(range(idx[0], idx[0] + 4)), idx


# --- permuted observations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["compact", "compact_outcome"])
def test_permute_observations_renames_tiles_consistently_and_keeps_everything_else(tiny_data_dir, make_stream, fmt):
    """Each sequence writes each map's tiles through one permutation of the observation tokens (a
    tile's success and failure tokens together); the sets, packing and every other token are those
    of the unpermuted stream, and the permutations differ between sequences."""
    s = Serializer(build_tokenizer(fmt), fmt)
    obs = s.observation_ids()
    assert obs.shape == ((2 if fmt == "compact_outcome" else 1), s.max_tiles)
    plain = make_stream(tiny_data_dir, s, num_sequences=8)
    perm = make_stream(tiny_data_dir, s, num_sequences=8, permute_observations=1.0)
    assert perm.observation_ids is not None and plain.observation_ids is None
    tile_of = {int(t): i for row in obs for i, t in enumerate(row)}
    kind_of = {int(t): k for k, row in enumerate(obs) for t in row}
    renamings = set()
    for a, b in zip(plain.chunks(np.random.default_rng([0, 0]), sorted(plain.episodes)),
                    perm.chunks(np.random.default_rng([0, 0]), sorted(perm.episodes)), strict=False):
        assert [e.tiles.tolist() for e in a] == [e.tiles.tolist() for e in b]
        renaming = {}
        for ea, eb in zip(a, b, strict=True):
            for x, y in zip(ea.ids.tolist(), eb.ids.tolist(), strict=True):
                if x in tile_of:
                    assert y in tile_of and kind_of[y] == kind_of[x]  # a failure token stays a failure token
                    assert renaming.setdefault((ea.map_id, tile_of[x]), tile_of[y]) == tile_of[y]
                else:
                    assert x == y
        pairs = {}
        for (m, t), u in renaming.items():  # one map's tiles go to distinct tokens
            assert pairs.setdefault((m, u), t) == t
        renamings.add(tuple(sorted(renaming.items())))
        if len(renamings) > 2:
            break
    assert len(renamings) > 2
    item = next(iter(perm))
    assert set(item) == BATCH_KEYS


def test_permute_observations_share_permutes_some_sequences(tiny_data_dir, make_stream, compact):
    plain = make_stream(tiny_data_dir, compact, num_sequences=40)
    half = make_stream(tiny_data_dir, compact, num_sequences=40, permute_observations=0.5)
    kinds = []
    for a, b, _ in zip(plain.chunks(np.random.default_rng([0, 0]), sorted(plain.episodes)),
                       half.chunks(np.random.default_rng([0, 0]), sorted(half.episodes)), range(40), strict=False):
        kinds.append(all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b, strict=True)))
    assert 8 < sum(kinds) < 32  # about half the sequences left as they are
    with pytest.raises(InputError, match="data.permute_observations"):
        make_stream(tiny_data_dir, compact, permute_observations=1.5)


def test_permute_observations_needs_one_token_per_observation(tmp_path, tiny_datamodule):
    class TwoTokens(Serializer):  # as a text format writes "observation: 3"
        def observation(self, obs):
            return (*super().observation(obs), self.pad_id)

    two = TwoTokens(build_tokenizer("compact"), "compact")
    with pytest.raises(ValueError, match="one token each"):
        two.observation_ids()
    with pytest.raises(InputError, match="data.permute_observations"):
        tiny_datamodule(tmp_path, two, permute_observations=True)
