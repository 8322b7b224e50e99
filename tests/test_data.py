"""ReplayDataModule and ReplayStream: building the dataset, packing, sharding, weighting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_datamodule
from torch.utils.data import DataLoader

from icrl_lightning.backbones import build_tokenizer
from icrl_lightning.data import ReplayStream, conflicts, load_map_file, with_optimal
from icrl_lightning.envs import make_env, make_splits
from icrl_lightning.envs.frozen_lake import optimal_actions
from icrl_lightning.episodes import Episode, quality_weights, read_shard
from icrl_lightning.serialize import Serializer


@pytest.fixture(scope="module")
def compact():
    return Serializer(build_tokenizer("compact"), "compact")


def _files(d):
    return {p.name: p for p in sorted(d.iterdir())}


# --- building the dataset --------------------------------------------------------------------------
def test_prepare_data_builds_shards_and_manifest(tmp_path):
    dm = tiny_datamodule(tmp_path)
    dm.prepare_data()
    out = dm.dataset_dir
    assert out.parent == tmp_path / "episodes"
    files = _files(out)
    assert set(files) == {"manifest.json", "shard-00000.parquet"}
    manifest = json.loads(files["manifest.json"].read_text())
    assert manifest["shards"] == ["shard-00000.parquet"]
    assert manifest["settings"]["num_train_maps"] == 4 and manifest["settings"]["episodes_per_map"] == 10
    maps = [tuple(m) for m in manifest["maps"]]
    assert maps == make_splits(0, 4).train
    episodes = dm.load_episodes()
    assert len(episodes) == 40
    for m in range(4):
        mine = [e for e in episodes if e.map_id == m]
        assert [e.learner_episode for e in mine] == list(range(10))
        assert all(e.map_rows == maps[m] for e in mine)
    # Evaluation maps are never trained on.
    splits = make_splits(0, 0)
    assert not set(maps) & (set(splits.heldout) | set(splits.ood))
    # Second call: nothing is rewritten.
    mtimes = {n: p.stat().st_mtime_ns for n, p in files.items()}
    dm.prepare_data()
    tiny_datamodule(tmp_path).prepare_data()
    assert {n: p.stat().st_mtime_ns for n, p in _files(out).items()} == mtimes


def test_recorded_episodes_replay_in_the_env(tiny_data_dir):
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


def test_same_seed_same_bytes_in_two_dirs(tmp_path):
    a, b = tiny_datamodule(tmp_path / "a"), tiny_datamodule(tmp_path / "b")
    a.prepare_data()
    b.prepare_data()
    fa, fb = _files(a.dataset_dir), _files(b.dataset_dir)
    assert set(fa) == set(fb)
    for name in fa:
        assert fa[name].read_bytes() == fb[name].read_bytes(), name


def test_settings_pick_the_dataset_folder(tmp_path):
    base = tiny_datamodule(tmp_path)
    assert tiny_datamodule(tmp_path, batch_size=7, seq_len=999).dataset_dir == base.dataset_dir
    assert tiny_datamodule(tmp_path, seed=1).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, episodes_per_map=11).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, behaviour_q_init=1.0).dataset_dir != base.dataset_dir
    assert tiny_datamodule(tmp_path, behaviour_schedule="protocol", episodes_per_map=30).dataset_dir != \
        tiny_datamodule(tmp_path, episodes_per_map=30).dataset_dir
    mixed = tiny_datamodule(tmp_path, behaviour_schedule="mixed", episodes_per_map=30).dataset_dir
    assert mixed != tiny_datamodule(tmp_path, behaviour_schedule="protocol", episodes_per_map=30).dataset_dir
    assert mixed != tiny_datamodule(tmp_path, episodes_per_map=30).dataset_dir
    # Options added later enter the key only when set: older datasets keep their folder.
    assert "behaviour_q_init" not in base._generation_settings()


def test_interrupted_build_resumes_and_incomplete_is_refused(tmp_path):
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


# --- the stream from the real dataset -------------------------------------------------------------
def _stream(data_dir, serializer, num_sequences=6, rank=0, world_size=1, **overrides):
    dm = tiny_datamodule(data_dir, **overrides)
    dm.serializer = serializer
    return dm.train_stream(num_sequences, rank, world_size)


def _split_episodes(ids: list[int], s: Serializer) -> list[list[int]]:
    start, end = s.encode(s.fmt.episode_start)[0], s.encode(s.fmt.episode_end)[0]
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


def test_stream_packs_whole_episodes(tiny_data_dir, compact):
    stream = _stream(tiny_data_dir, compact, num_sequences=6)
    known = {}
    for e in tiny_datamodule(tiny_data_dir).load_episodes():
        enc = compact.episode(e.observations, e.actions, e.rewards, e.terminated, e.truncated)
        known[tuple(enc.ids.tolist())] = enc
    items = list(stream)
    assert len(items) == len(stream) == 6
    for it in items:
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
            assert it["truncated"][pos].tolist() == [False] * (len(pos) - 1) + [enc.truncated]
            # the action that follows each q position is the token after it
            assert ids[pos + 1].tolist() == compact.action_token_ids[enc.actions].tolist()
            at += len(ep)
        assert at == n
        assert it["done"].sum() == len(episodes)
        assert not (it["done"] & ~it["q_mask"]).any()
        assert not (it["truncated"] & ~it["done"]).any()
        # The next episode would not have fitted (packing is greedy).
        assert 256 - n < max(len(k) for k in known)


def test_outcome_tagged_stream_writes_failures_with_their_own_tokens(tiny_data_dir):
    """compact_outcome: in training sequences an episode without reward starts with <ep-> and writes
    its tiles as x-tokens; a success is written exactly as in compact."""
    s = Serializer(build_tokenizer("compact_outcome"), "compact_outcome")
    vocab = {i: t for t, i in s._tokenizer.get_vocab().items()}
    won = lost = 0
    for it in _stream(tiny_data_dir, s, num_sequences=4):
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


def test_stream_is_deterministic_per_seed(tiny_data_dir, compact):
    a = list(_stream(tiny_data_dir, compact))
    b = list(_stream(tiny_data_dir, compact))
    c = list(ReplayStream(**_kwargs_with_seed(tiny_data_dir, compact, 1)))
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k])
    assert any(not torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c, strict=True))


def _kwargs_with_seed(data_dir, s, seed):
    st = _stream(data_dir, s)
    return {"episodes": st.episodes, "weights": st.weights, "seq_len": st.seq_len, "pad_id": st.pad_id,
            "num_sequences": st.num_sequences, "set_size": st.set_size, "seed": seed}


def test_seq_len_shorter_than_longest_episode(tiny_data_dir, compact):
    with pytest.raises(ValueError, match="seq_len"):
        _stream(tiny_data_dir, compact, seq_len=20)


def test_llama3_episodes_need_longer_sequences(tiny_data_dir):
    # Same episodes, ten tokens a step: 256 tokens no longer hold the longest one.
    s = Serializer(build_tokenizer("llama3"), "llama3")
    with pytest.raises(ValueError, match="seq_len=256"):
        _stream(tiny_data_dir, s)
    items = list(_stream(tiny_data_dir, s, seq_len=2048, num_sequences=2))
    assert all(it["input_ids"].shape == (2048,) for it in items)


# --- the stream on synthetic episodes ---------------------------------------------------------------
def _synthetic(s: Serializer, n_maps: int, n_eps: int, success=lambda m, j: j % 2 == 0):
    """Episode j of map m is `<ep> o{m} left o{j} [r1.0] </ep>`: its tokens name its map and index."""
    episodes, weights, raw = {}, {}, {}
    for m in range(n_maps):
        eps = [Episode(map_id=m, map_rows=("SG",), observations=[m, j], actions=[0],
                       rewards=[1.0 if success(m, j) else 0.0], terminated=True, truncated=False,
                       learner_episode=j) for j in range(n_eps)]
        raw[m] = eps
        episodes[m] = [s.episode(e.observations, e.actions, e.rewards, e.terminated, e.truncated) for e in eps]
        weights[m] = quality_weights(eps, "medium")
    return episodes, weights, raw


def _decode(items, s: Serializer) -> list[tuple[int, int]]:
    """(map, episode index) of every packed episode, in stream order."""
    out = []
    for it in items:
        n = int(it["n_tokens"])
        for ep in _split_episodes(it["input_ids"][:n].tolist(), s):
            toks = s._tokenizer.convert_ids_to_tokens(ep)
            out.append((int(toks[1][1:]), int(toks[3][1:])))
    return out


def test_ranks_and_workers_read_disjoint_maps(compact):
    episodes, weights, _ = _synthetic(compact, n_maps=8, n_eps=30)
    seen = []
    for rank in (0, 1):
        st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=20, set_size=(2, 4),
                          seed=0, rank=rank, world_size=2)
        items = list(st)
        assert len(items) == 20
        seen.append({m for m, _ in _decode(items, compact)})
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
        per_batch = [{m for m, _ in _decode([{k: v[b] for k, v in batch.items()} for b in range(2)], compact)}
                     for batch in batches]
        # The DataLoader takes batches from its workers in turn.
        readers += [per_batch[0] | per_batch[2], per_batch[1] | per_batch[3]]
    assert all(readers)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not readers[i] & readers[j], (i, j, readers)


def test_more_readers_than_maps_is_an_error(compact):
    episodes, weights, _ = _synthetic(compact, n_maps=2, n_eps=5)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=2, seed=0, rank=2,
                      world_size=3)
    with pytest.raises(ValueError, match="maps"):
        list(st)


def test_random_order_sets(compact):
    lo, hi = 3, 5
    episodes, weights, _ = _synthetic(compact, n_maps=6, n_eps=40)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=60, set_size=(lo, hi),
                      seed=0)
    stream = _decode(list(st), compact)
    runs = _runs(stream, lambda a, b: a[0] == b[0])
    assert len(runs) > 10
    for run in runs[:-1]:  # the last one may be cut by the end of the stream
        assert len(run) >= lo
        if len(run) <= hi:  # a single set: episodes drawn without replacement
            assert len({j for _, j in run}) == len(run)
    # Not in learning order: consecutive indices are no more common than chance.
    consecutive = sum(b == (a[0], a[1] + 1) for a, b in zip(stream, stream[1:], strict=False))
    assert consecutive < 0.2 * len(stream)


def test_learning_order_windows(compact):
    lo, hi = 3, 5
    episodes, weights, _ = _synthetic(compact, n_maps=6, n_eps=40)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=60, set_size=(lo, hi),
                      seed=0, set_order="learning")
    stream = _decode(list(st), compact)
    runs = _runs(stream, lambda a, b: b == (a[0], a[1] + 1))
    assert len(runs) > 10
    for run in runs[:-1]:
        assert len(run) >= lo  # each run is one or more whole windows of consecutive episodes
    # Windows of at most `hi` start anywhere in the run, so most runs are single windows.
    assert sum(len(r) <= hi for r in runs) >= 0.5 * len(runs)


def test_trial_order_sets_are_whole_trials_in_played_order(compact):
    episodes, weights, _ = _synthetic(compact, n_maps=4, n_eps=12)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=60, seed=0,
                      set_order="trial", trial_length=3)
    stream = _decode(list(st), compact)
    runs = _runs(stream, lambda a, b: b == (a[0], a[1] + 1) and b[1] % 3 != 0)
    assert len(runs) > 10
    for run in runs[:-1]:  # the last one may be cut by the end of the stream
        assert [j for _, j in run] == [run[0][1], run[0][1] + 1, run[0][1] + 2] and run[0][1] % 3 == 0
    with pytest.raises(ValueError, match="behaviour_schedule=protocol"):
        ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=2, set_order="trial")


def test_protocol_data_holds_whole_trials(tmp_path, compact):
    dm = tiny_datamodule(tmp_path, behaviour_schedule="protocol", behaviour_q_init=1.0, episodes_per_map=30,
                         set_order="trial")
    dm.serializer = compact
    dm.prepare_data()
    eps = dm.load_episodes()
    assert len(eps) == 30 * dm.hparams.num_train_maps
    assert sorted({e.learner_episode for e in eps}) == list(range(30))
    assert dm.train_stream(4).trial_length == 30


def _runs(stream, joined):
    runs = [[stream[0]]]
    for a, b in zip(stream, stream[1:], strict=False):
        if joined(a, b):
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def test_bad_set_order(compact):
    episodes, weights, _ = _synthetic(compact, n_maps=2, n_eps=5)
    with pytest.raises(ValueError, match="set_order"):
        ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=2, set_order="sorted")


# --- quality weighting ---------------------------------------------------------------------------------
def test_quality_weights_values():
    eps = [Episode(0, ("SG",), [0, 1], [2], [r], True, False) for r in (1.0, 0.0, 0.0, 1.0)]
    assert quality_weights(eps, "high").tolist() == [5.0, 1.0, 1.0, 5.0]
    assert quality_weights(eps, "medium").tolist() == [1.0, 1.0, 1.0, 1.0]
    assert quality_weights(eps, "low").tolist() == [1.0, 5.0, 5.0, 1.0]
    with pytest.raises(ValueError, match="quality"):
        quality_weights(eps, "best")


@pytest.mark.parametrize(("quality", "lo", "hi"), [("high", 0.75, 0.92), ("medium", 0.4, 0.6), ("low", 0.08, 0.25)])
def test_quality_changes_the_success_share(compact, quality, lo, hi):
    # Half the episodes succeed; sets of 2 from 60 make the weights matter (SPEC: 5x).
    episodes, _, raw = _synthetic(compact, n_maps=2, n_eps=60)
    weights = {m: quality_weights(raw[m], quality) for m in raw}
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=150, set_size=(2, 2),
                      seed=0)
    stream = _decode(list(st), compact)
    share = np.mean([j % 2 == 0 for _, j in stream])
    assert lo < share < hi, share


def test_datamodule_quality_option_reaches_the_stream(tiny_data_dir, compact):
    high = _stream(tiny_data_dir, compact, quality="high")
    low = _stream(tiny_data_dir, compact, quality="low")
    raw = {}
    for e in tiny_datamodule(tiny_data_dir).load_episodes():
        raw.setdefault(e.map_id, []).append(e)
    for m in raw:
        assert high.weights[m].tolist() == [5.0 if e.success else 1.0 for e in raw[m]]
        assert low.weights[m].tolist() == [1.0 if e.success else 5.0 for e in raw[m]]


# --- evaluation maps ---------------------------------------------------------------------------------------
def test_eval_maps_from_splits(tiny_data_dir):
    dm = tiny_datamodule(tiny_data_dir, eval_maps=3)
    dm.setup("validate")
    splits = make_splits(0, 0)
    assert dm.eval_maps == splits.heldout[:3]
    dm = tiny_datamodule(tiny_data_dir, eval_maps=2, eval_split="ood")
    dm.setup("validate")
    assert dm.eval_maps == splits.ood[:2]
    batches = list(dm.val_dataloader())
    assert batches == [[(0, splits.ood[0]), (1, splits.ood[1])]]
    with pytest.raises(ValueError, match="eval_split"):
        tiny_datamodule(tiny_data_dir, eval_split="train").setup("validate")
    with pytest.raises(ValueError, match="eval_maps"):
        tiny_datamodule(tiny_data_dir, eval_maps=201).setup("validate")


def test_eval_map_file(tmp_path, tiny_data_dir):
    path = tmp_path / "maps.json"
    path.write_text(json.dumps([["SFF", "FHG"], ["SF", "FG"]]))
    assert load_map_file(path) == [("SFF", "FHG"), ("SF", "FG")]
    dm = tiny_datamodule(tiny_data_dir, eval_map_file=str(path))
    dm.setup("validate")
    assert dm.eval_maps == [("SFF", "FHG"), ("SF", "FG")]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[["SFF", "FFG"], ', "not valid JSON"),
        ('{"maps": []}', "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('[["SFF", "FFG"], ["SFF", "FG"]]', r"map 1\b.*ragged"),
        ('[["SFF", "FFG"], ["SF", "FG"], ["SFF", "FFF"]]', r"map 2\b.*no goal"),
        ('[["SXF", "FFG"]]', r"map 0\b.*unknown"),
    ],
)
def test_load_map_file_errors(tmp_path, text, match):
    path = tmp_path / "bad-maps.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_map_file(path)
    assert str(path) in str(err.value)


def test_load_map_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_map_file(tmp_path / "nope.json")


def test_read_shard_round_trip(tiny_data_dir):
    dm = tiny_datamodule(tiny_data_dir)
    eps = read_shard(dm.dataset_dir / "shard-00000.parquet")
    assert len(eps) == 40
    e = eps[0]
    assert len(e.observations) == len(e.actions) + 1 == len(e.rewards) + 1
    assert e.ret == sum(e.rewards)


# --- known bugs ------------------------------------------------------------------------------------------
def test_load_map_file_rejects_a_map_given_as_one_string(tmp_path):
    path = tmp_path / "maps.json"
    path.write_text(json.dumps([["SFF", "FFG"], "SHFG"]))
    with pytest.raises(ValueError, match="map 1"):
        load_map_file(path)


def test_stream_yields_len_sequences(compact):
    episodes, weights, _ = _synthetic(compact, n_maps=2, n_eps=10)
    st = ReplayStream(episodes, weights, seq_len=64, pad_id=compact.pad_id, num_sequences=5, seed=0, batch_size=2)
    assert len(list(st)) == len(st) == 5


def _episode_of_length(n: int, tag: int):
    from icrl_lightning.serialize import EncodedEpisode

    return EncodedEpisode(ids=np.full(n, tag, dtype=np.int32), q_pos=np.zeros(0, dtype=np.int32),
                          actions=np.zeros(0, dtype=np.int64), rewards=np.zeros(0, dtype=np.float32))


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
    stream._sets = lambda rng, maps: iter([[_episode_of_length(n, 10 * s + i) for i, n in enumerate(lengths)]
                                           for s, lengths in enumerate(sets)])
    chunks = stream._chunks(np.random.default_rng(0), [0])
    got = [next(chunks) for _ in range(len(expected))]
    assert [[len(e) for e in c] for c in got] == expected
    # Sets stay contiguous: every episode of set 0 comes before every episode of set 1.
    order = [int(e.ids[0]) // 10 for c in got for e in c]
    assert order == sorted(order)


def test_training_batches_carry_the_shortest_path_actions(tiny_data_dir, compact):
    """``optimal`` marks, at each action position, the moves that bring the agent one step closer to
    a goal: checked against the transitions the episodes really made."""
    from icrl_lightning.envs.frozen_lake import goal_distances

    dm = tiny_datamodule(tiny_data_dir)
    dm.serializer = compact
    seen = {True: 0, False: 0}
    for e in dm.load_episodes()[:200]:
        dist = goal_distances(e.map_rows).flatten()
        enc = with_optimal(compact.episode(e.observations, e.actions, e.rewards, e.terminated, e.truncated),
                           e.observations, optimal_actions(e.map_rows))
        assert enc.optimal.shape == (len(e.actions), 4)
        for t, a in enumerate(e.actions):
            s, nxt = e.observations[t], e.observations[t + 1]
            if dist[s] > 0:
                assert enc.optimal[t, a] == (dist[nxt] == dist[s] - 1), (e.map_rows, t)
                seen[bool(enc.optimal[t, a])] += 1
    assert seen[True] and seen[False]  # the data holds optimal and other moves
    item = next(iter(dm.train_stream(num_sequences=1)))
    assert item["optimal"].shape == (dm.hparams.seq_len, 4)
    assert not (item["optimal"].any(-1) & ~item["q_mask"]).any()
    assert item["optimal"].any(-1).sum() > 0


def _encoded(compact, map_id, tiles, actions, success):
    """An encoded episode on ``map_id`` that visits ``tiles`` (one per action) and ends on a goal
    (``success``) or in a hole."""
    obs = [*tiles, 63]
    rewards = [0.0] * (len(actions) - 1) + [1.0 if success else 0.0]
    enc = compact.episode(obs, actions, rewards, True, False)
    return with_optimal(enc, obs, np.zeros((64, 4), dtype=bool), map_id)


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
    # Episodes without tiles (e.g. built by hand) are never marked.
    bare = compact.episode([0, 63], [1], [0.0], True, False)
    assert not conflicts([s1, f1, bare])[2].any()


def test_training_batches_mark_conflicts_on_action_positions_only(tiny_data_dir, compact):
    dm = tiny_datamodule(tiny_data_dir)
    dm.serializer = compact
    items = list(dm.train_stream(num_sequences=16))
    marked = torch.stack([i["conflict"] for i in items])
    q_mask = torch.stack([i["q_mask"] for i in items])
    assert marked.any() and not (marked & ~q_mask).any()
    assert marked.sum() < 0.5 * q_mask.sum()
