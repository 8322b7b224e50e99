"""``ReplayDataModule``: builds the offline dataset when it is absent and streams packed token
sequences of multi-episode sets; serves the held-out maps for in-context evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from icrl_lightning.behaviour import q_learning_run
from icrl_lightning.checks import SET_ORDERS, InputError, MissingInputFile, check_data_args, check_range
from icrl_lightning.envs.frozen_lake import OOD_MAX_SIZE, RESERVED_EVAL_MAPS, make_splits, optimal_actions, validate_map
from icrl_lightning.episodes import (
    Episode,
    quality_weights,
    read_shard,
    shard_is_readable,
    write_json_atomic,
    write_shard,
)
from icrl_lightning.evaluation.protocol import paper_schedule
from icrl_lightning.serialize import EncodedEpisode, Serializer

log = logging.getLogger(__name__)

MAPS_PER_SHARD = 25


class ReplayStream(IterableDataset):
    """Packed sequences of episode *sets*: a set is ``set_size`` episodes of one map drawn (with
    quality weights, without replacement) from that map's run and shuffled; sets follow one
    another, so sequences hold map switches. Only whole episodes are packed; the rest of a
    sequence is padding. With ``set_order="random"``, when the next episode of the current set
    does not fit, a later episode of the same set that fits goes first (the set's order is random
    anyway); sets stay contiguous either way.

    Each (rank, worker) owns a disjoint slice of the maps and its own seeded generator, so the
    stream is deterministic for a seed and no two readers produce the same sets.

    ``skip_batches`` resumes the stream: this rank's first ``skip_batches`` batches are generated
    and dropped, so a resumed run sees exactly the batches the uninterrupted run would have seen
    (for the same world size, ``num_workers`` and ``batch_size``). ``__len__`` stays the length of
    the whole stream, which is what Lightning's restored batch counter counts against.
    """

    def __init__(
        self,
        episodes: dict[int, list[EncodedEpisode]],
        weights: dict[int, np.ndarray],
        seq_len: int,
        pad_id: int,
        num_sequences: int,
        set_size: tuple[int, int] = (20, 40),
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        set_order: str = "random",
        skip_batches: int = 0,
        trial_length: int = 0,
    ):
        if set_order not in SET_ORDERS:
            raise InputError(f"data.set_order={set_order!r}: choose one of {', '.join(map(repr, SET_ORDERS))}")
        if set_order == "trial" and trial_length < 1:
            raise InputError("data.set_order='trial' needs trials in the data: set data.behaviour_schedule=protocol")
        longest = max(len(e) for eps in episodes.values() for e in eps)
        if longest > seq_len:
            raise InputError(f"data.seq_len={seq_len} is shorter than the longest episode ({longest} tokens): "
                             f"raise seq_len to at least {longest}")
        self.episodes, self.weights = episodes, weights
        self.seq_len, self.pad_id, self.num_sequences = seq_len, pad_id, num_sequences
        self.set_size, self.seed, self.rank, self.world_size = set_size, seed, rank, world_size
        self.batch_size, self.set_order, self.skip_batches = batch_size, set_order, skip_batches
        self.trial_length = trial_length
        # Online fine-tuning (callbacks.OnlineTrials): whole trials the model played itself, each a
        # set of its own in the order played, drawn instead of an offline set with probability
        # ``online_fraction``. Both stay empty / 0 for offline training.
        self.online: list[list[EncodedEpisode]] = []
        self.online_fraction = 0.0

    def __len__(self) -> int:
        return self.num_sequences

    def _reader(self) -> tuple[int, int, int, int]:
        """(global reader index, number of readers, sequences to drop, sequences to yield)."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.world_size * nw > len(self.episodes):
            raise InputError(f"{self.world_size * nw} data readers (ranks x data.num_workers) but only "
                             f"{len(self.episodes)} training maps: lower data.num_workers or raise data.num_train_maps")
        # Workers of one rank split that rank's batches; DataLoader takes batch k from worker k % nw,
        # counting from 0 again when a resumed run builds a new DataLoader: worker `wid` then plays
        # the reader that produced batches skip + wid, skip + wid + nw, ... in the uninterrupted run.
        bs, total = self.batch_size, self.num_sequences
        n_batches = -(-total // bs)
        skip = min(self.skip_batches, n_batches)
        local = (wid + skip) % nw

        def size(b: int) -> int:
            return min(bs, total - b * bs)

        dropped = sum(size(b) for b in range(local, skip, nw))
        count = sum(size(b) for b in range(skip + wid, n_batches, nw))
        return self.rank * nw + local, self.world_size * nw, dropped, count

    def _sets(self, rng: np.random.Generator, maps: list[int]):
        """Sets of episodes (lists), forever."""
        lo, hi = self.set_size
        while True:
            if self.online and self.online_fraction and rng.random() < self.online_fraction:
                yield list(self.online[rng.integers(len(self.online))])
                continue
            m = maps[rng.integers(len(maps))]
            eps, w = self.episodes[m], self.weights[m]
            if self.set_order == "trial":
                # One whole trial (a fresh learner's episodes under the evaluation schedule), as played.
                first = self.trial_length * int(rng.integers(-(-len(eps) // self.trial_length)))
                yield eps[first:first + self.trial_length]
                continue
            k = min(int(rng.integers(lo, hi + 1)), len(eps))
            if self.set_order == "learning":
                # A window of consecutive episodes of the learning run, in the order played.
                first = int(rng.integers(len(eps) - k + 1))
                yield eps[first:first + k]
            else:
                yield [eps[i] for i in rng.choice(len(eps), size=k, replace=False, p=w / w.sum())]

    def _chunks(self, rng: np.random.Generator, maps: list[int]):
        """The episodes of each sequence, forever."""
        sets = self._sets(rng, maps)
        pending: list[EncodedEpisode] = []  # what is left of the current set, in order
        reorder = self.set_order == "random"
        while True:
            chunk: list[EncodedEpisode] = []
            room = self.seq_len
            while True:
                if not pending:
                    pending = list(next(sets))
                fits = next((i for i, e in enumerate(pending if reorder else pending[:1]) if len(e) <= room), None)
                if fits is None:
                    break
                e = pending.pop(fits)
                chunk.append(e)
                room -= len(e)
            yield chunk

    def __iter__(self):
        reader, readers, dropped, count = self._reader()
        maps = sorted(self.episodes)[reader::readers]
        chunks = self._chunks(np.random.default_rng([self.seed, reader]), maps)
        for _ in range(dropped):  # resuming: regenerate what was consumed (packing only; cheap)
            next(chunks)
        for _ in range(count):
            yield self._pack(next(chunks))

    def _pack(self, chunk: list[EncodedEpisode]) -> dict[str, torch.Tensor]:
        L_ = self.seq_len
        ids = np.full(L_, self.pad_id, dtype=np.int64)
        q_mask = np.zeros(L_, dtype=bool)
        action = np.zeros(L_, dtype=np.int64)
        reward = np.zeros(L_, dtype=np.float32)
        done = np.zeros(L_, dtype=bool)
        truncated = np.zeros(L_, dtype=bool)
        optimal = np.zeros((L_, 4), dtype=bool)
        conflict = np.zeros(L_, dtype=bool)
        at = 0
        for e, flags in zip(chunk, conflicts(chunk), strict=True):
            ids[at:at + len(e)] = e.ids
            if len(e.q_pos):
                pos = e.q_pos + at
                q_mask[pos], action[pos], reward[pos] = True, e.actions, e.rewards
                done[pos[-1]] = True  # the last action of an episode does not bootstrap
                truncated[pos[-1]] = e.truncated
                if e.optimal is not None:
                    optimal[pos] = e.optimal
                conflict[pos] = flags
            at += len(e)
        return {"input_ids": torch.from_numpy(ids), "q_mask": torch.from_numpy(q_mask),
                "action": torch.from_numpy(action), "reward": torch.from_numpy(reward),
                "done": torch.from_numpy(done), "truncated": torch.from_numpy(truncated),
                "optimal": torch.from_numpy(optimal), "conflict": torch.from_numpy(conflict),
                "n_tokens": torch.tensor(at)}


def with_optimal(enc: EncodedEpisode, observations, table: np.ndarray, map_id: int = -1) -> EncodedEpisode:
    """``enc`` with ``optimal`` set: the shortest-path actions (``table``, from ``optimal_actions``
    of its map) at the tile of each of its steps; also the tiles themselves and the map's id (for
    ``conflicts``)."""
    enc.tiles = np.asarray(observations[: len(enc.actions)], dtype=np.int64)
    enc.optimal = table[enc.tiles]
    enc.map_id = map_id
    return enc


def nearest_visits(chunk: list[EncodedEpisode]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per episode of a packed sequence, per action: the action taken at the most recent visit of
    that tile among the earlier episodes of the sequence on the same map, and the same among the
    successful ones only (-1 where there is none). -1 throughout for an episode without tiles or
    map id."""
    last: dict[tuple[int, int], int] = {}  # (map, tile) -> action of the most recent visit
    last_ok: dict[tuple[int, int], int] = {}  # the same, successful episodes only
    out = []
    for e in chunk:
        if e.tiles is None or e.map_id < 0:
            out.append((np.full(len(e.actions), -1), np.full(len(e.actions), -1)))
            continue
        keys = [(e.map_id, int(t)) for t in e.tiles]
        out.append((np.array([last.get(k, -1) for k in keys], dtype=np.int64),
                    np.array([last_ok.get(k, -1) for k in keys], dtype=np.int64)))
        visit = {k: int(a) for k, a in zip(keys, e.actions, strict=True)}  # the last action on each tile
        last.update(visit)
        if e.rewards.sum() > 0:
            last_ok.update(visit)
    return out


def conflicts(chunk: list[EncodedEpisode]) -> list[np.ndarray]:
    """Per episode of a packed sequence, per action: whether the most recent visit of that tile
    (``nearest_visits``) failed and took another action than the most recent successful visit.
    There "copy the nearest visit" and "follow the success" disagree, the case that decides
    whether the agent recovers after a failed episode (positions the model may upweight:
    ``model.conflict_weight``)."""
    return [(recent >= 0) & (success >= 0) & (recent != success) for recent, success in nearest_visits(chunk)]


class MapList(Dataset):
    """Evaluation maps; a batch is a list of ``(index, rows)``."""

    def __init__(self, maps: list[tuple[str, ...]]):
        self.maps = maps

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int):
        return i, self.maps[i]


def _as_list(batch):
    return batch


def load_map_file(path: str | Path) -> list[tuple[str, ...]]:
    """A JSON file holding a list of maps, each a list of row strings (gymnasium ``desc``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInputFile(f"map file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"map file {path} is not valid JSON: {err}") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"map file {path}: expected a non-empty JSON list of maps (lists of row strings)")
    return [validate_map(m, where=f"map file {path}, map {i}") for i, m in enumerate(data)]


class ReplayDataModule(L.LightningDataModule):
    """Offline Frozen Lake replay data and held-out evaluation maps.

    Args:
        data_dir: where episode datasets live (one folder per generating configuration).
        seed: seeds the training maps, behaviour runs and the replay stream.
        split_seed: seeds the held-out and out-of-distribution maps (kept apart from ``seed`` so that
            runs at different seeds are evaluated on the same maps; training maps never include them).
        num_train_maps: training maps (SPEC: 250).
        episodes_per_map: episodes of the Q-learning run on each training map; all are kept.
        behaviour_epsilon: the Q-learner's exploration rate.
        behaviour_lr: the Q-learner's step size.
        behaviour_gamma: the Q-learner's discount.
        behaviour_q_init: the Q-learner's initial table value. 0 (default) never learns from a
            hole (its reward is 0, like an untried move), so it walks into the same hole again; an
            optimistic 1.0 prefers untried moves to a move that ended in a hole (with
            ``behaviour_lr`` 1 it never repeats one) and so explores systematically.
        behaviour_schedule: ``constant`` (default): one run per map, a random action with
            probability ``behaviour_epsilon``. ``protocol``: trials of the evaluation schedule
            (30 episodes: greedy with probability 0.0 .. 0.9 two episodes each, then 1.0 for ten),
            a fresh learner per trial, so the data holds the kind of exploration the evaluation
            plays; ``episodes_per_map`` is then a multiple of 30. ``mixed``: one run per map, each
            episode greedy with a probability drawn from that schedule, so the random walks of
            early exploration also follow episodes that found the goal, as in an evaluation
            context (``behaviour_epsilon`` unused).
        max_episode_steps: time limit of every episode (SPEC: 100).
        min_size: smallest map side of the in-distribution family.
        max_size: largest map side of the in-distribution family.
        p_hole: hole probability of a tile that is neither start nor goal.
        min_hops: shortest start-to-goal distance a valid map must have.
        set_size_min: fewest episodes of one map in a set (SPEC: 20).
        set_size_max: most episodes of one map in a set (SPEC: 40).
        quality: ``high`` / ``medium`` / ``low`` (SPEC data-quality weighting; ``random`` order only).
        set_order: ``random`` (SPEC: a set's episodes drawn from the whole run and shuffled),
            ``learning`` (a window of consecutive episodes of the run, in the order played) or
            ``trial`` (one whole trial of ``behaviour_schedule: protocol`` data, in the order played,
            like an evaluation context; ``set_size_*`` are then unused).
        seq_len: tokens per training sequence.
        batch_size: sequences per device batch.
        num_workers: DataLoader worker processes.
        eval_split: ``heldout`` (same sizes as training) or ``ood`` (6..7 x 6..7).
        eval_maps: how many maps of the split to evaluate on (at most 200 are reserved).
        eval_map_file: a JSON list of maps (lists of row strings) to evaluate on instead.

    Every argument is range-checked here; the map file and ``seq_len`` against the longest
    possible episode are checked at the start of ``prepare_data`` (they need the model's
    serializer), so a bad value fails before the dataset is built or a step is trained.

    ``fit --ckpt_path ...`` continues the replay stream where the checkpoint left it: the stream
    skips the ``global_step x accumulate_grad_batches`` batches this rank already trained on.
    """

    def __init__(
        self,
        data_dir: str = "data",
        seed: int = 0,
        split_seed: int = 0,
        num_train_maps: int = 250,
        episodes_per_map: int = 200,
        behaviour_epsilon: float = 0.1,
        behaviour_lr: float = 0.5,
        behaviour_gamma: float = 0.9,
        behaviour_q_init: float = 0.0,
        behaviour_schedule: str = "constant",
        max_episode_steps: int = 100,
        min_size: int = 3,
        max_size: int = 5,
        p_hole: float = 0.2,
        min_hops: int = 4,
        set_size_min: int = 20,
        set_size_max: int = 40,
        quality: str = "medium",
        set_order: str = "random",
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        eval_split: str = "heldout",
        eval_maps: int = 50,
        eval_map_file: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_data_args(self.hparams, RESERVED_EVAL_MAPS, len(paper_schedule()))
        self.serializer: Serializer | None = None
        self._eval_maps_from_file: list[tuple[str, ...]] | None = None

    # --- the offline dataset -------------------------------------------------------------------
    def _generation_settings(self) -> dict:
        h = self.hparams
        keys = ("seed", "num_train_maps", "episodes_per_map", "behaviour_epsilon", "behaviour_lr",
                "behaviour_gamma", "max_episode_steps", "min_size", "max_size", "p_hole", "min_hops")
        settings = {"learner": "tabular_q", "version": 1, **{k: h[k] for k in keys}}
        # Added later: only non-default values enter the key, so existing datasets keep their folder.
        if h.behaviour_q_init != 0.0:
            settings["behaviour_q_init"] = h.behaviour_q_init
        if h.behaviour_schedule != "constant":
            settings["behaviour_schedule"] = h.behaviour_schedule
        if h.split_seed != h.seed:  # the training maps exclude the evaluation maps of split_seed
            settings["split_seed"] = h.split_seed
        return settings

    def _behaviour_schedule(self) -> list[float] | None:
        return paper_schedule() if self.hparams.behaviour_schedule in ("protocol", "mixed") else None

    def _split_kwargs(self) -> dict:
        h = self.hparams
        return {"min_size": h.min_size, "max_size": h.max_size, "p_hole": h.p_hole, "min_hops": h.min_hops}

    @property
    def dataset_dir(self) -> Path:
        settings = json.dumps(self._generation_settings(), sort_keys=True)
        key = hashlib.sha256(settings.encode()).hexdigest()[:12]
        return Path(self.hparams.data_dir) / "episodes" / key

    def prepare_data(self) -> None:
        """Build the dataset when absent. Shards are written atomically and the manifest last,
        so an interrupted build resumes from the shards it finished. Only ``fit`` needs the
        dataset: ``validate`` under a trainer builds nothing."""
        self._preflight()
        if self.trainer is not None and self.trainer.state.fn not in (None, TrainerFn.FITTING):
            return
        out = self.dataset_dir
        if (out / "manifest.json").exists():
            return
        out.mkdir(parents=True, exist_ok=True)
        h = self.hparams
        splits = make_splits(h.seed, h.num_train_maps, h.split_seed, **self._split_kwargs())
        shards = []
        for s, first in enumerate(range(0, len(splits.train), MAPS_PER_SHARD)):
            path = out / f"shard-{s:05d}.parquet"
            shards.append(path.name)
            if path.exists():
                if shard_is_readable(path):
                    continue
                log.warning("rebuilding damaged shard %s", path)
            episodes: list[Episode] = []
            for map_id in range(first, min(first + MAPS_PER_SHARD, len(splits.train))):
                episodes += self.behaviour_run(splits.train[map_id], map_id, seed=[h.seed, 3, map_id])
            write_shard(episodes, path)
        write_json_atomic({"settings": self._generation_settings(), "shards": shards,
                           "maps": [list(m) for m in splits.train]}, out / "manifest.json")
        log.info("built dataset %s (%d maps)", out, len(splits.train))

    def behaviour_run(self, rows, map_id: int, seed: list[int]) -> list[Episode]:
        """The behaviour learner's episodes on one map with this module's ``behaviour_*`` settings
        (the dataset's; the tools also run it on held-out maps, with their own seeds)."""
        h = self.hparams
        return q_learning_run(rows, map_id, h.episodes_per_map, seed=seed, epsilon=h.behaviour_epsilon,
                              lr=h.behaviour_lr, gamma=h.behaviour_gamma, max_episode_steps=h.max_episode_steps,
                              q_init=h.behaviour_q_init, schedule=self._behaviour_schedule(),
                              sample_schedule=h.behaviour_schedule == "mixed")

    def load_episodes(self) -> list[Episode]:
        out = self.dataset_dir
        manifest_path = out / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"dataset {out} is incomplete (no manifest.json); run prepare_data()")
        try:
            manifest = json.loads(manifest_path.read_text())
            shards = manifest["shards"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"dataset manifest {manifest_path} is damaged ({type(err).__name__}: {err}): "
                             f"delete the dataset folder {out} and run again to rebuild it") from None
        return [e for name in shards for e in read_shard(out / name)]

    # --- checks that need the model -------------------------------------------------------------
    def _attached_serializer(self) -> Serializer | None:
        if self.serializer is None and self.trainer is not None and self.trainer.lightning_module is not None:
            self.serializer = getattr(self.trainer.lightning_module, "serializer", None)
        return self.serializer

    def longest_episode_tokens(self, serializer: Serializer) -> int:
        """Tokens of the longest episode the data can hold: ``max_episode_steps`` steps on the
        largest training map (a reward or a truncation marker at the end, whichever is longer)."""
        h = self.hparams
        n, tile = h.max_episode_steps, min(h.max_size**2, serializer.max_tiles) - 1
        obs, actions = [tile] * (n + 1), [0] * n
        return max(len(serializer.episode(obs, actions, [0.0] * (n - 1) + [r], not trunc, trunc))
                   for r in (0.0, 1.0) for trunc in (False, True))

    def _preflight(self) -> None:
        """Checks that need the model's serializer or read files: before any data is built."""
        h = self.hparams
        if h.eval_map_file and self._eval_maps_from_file is None:
            self._eval_maps_from_file = load_map_file(h.eval_map_file)
        serializer = self._attached_serializer()
        if serializer is None:
            return
        sizes = {"data.max_size": h.max_size**2}
        if h.eval_map_file:
            sizes["data.eval_map_file"] = max(len(m) * len(m[0]) for m in self._eval_maps_from_file)
        elif h.eval_split == "ood":
            sizes["data.eval_split=ood"] = OOD_MAX_SIZE**2
        key, biggest = max(sizes.items(), key=lambda kv: kv[1])
        if biggest > serializer.max_tiles:
            raise InputError(f"{key}: maps of {biggest} tiles, but the model's tokenizer writes at most "
                             f"{serializer.max_tiles} tiles: raise model.backbone.max_tiles to {biggest}")
        need = self.longest_episode_tokens(serializer)
        check_range("data.seq_len", h.seq_len, need, None,
                    why=f"an episode of data.max_episode_steps={h.max_episode_steps} steps is {need} tokens "
                        f"in the {serializer.fmt.name} format")

    # --- streams --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._preflight()  # again: prepare_data runs on one process per node only
        h = self.hparams
        if h.eval_map_file:
            self.eval_maps = self._eval_maps_from_file
        else:
            splits = make_splits(h.split_seed, 0, **self._split_kwargs())
            self.eval_maps = (splits.heldout if h.eval_split == "heldout" else splits.ood)[: h.eval_maps]

    def train_stream(self, num_sequences: int, rank: int = 0, world_size: int = 1,
                     skip_batches: int = 0) -> ReplayStream:
        h = self.hparams
        by_map: dict[int, list[Episode]] = {}
        for e in self.load_episodes():
            by_map.setdefault(e.map_id, []).append(e)
        # Map rows by training-map id: online fine-tuning plays its trials on them.
        self.train_maps = {m: eps[0].map_rows for m, eps in by_map.items()}
        encoded = {}
        for m, eps in by_map.items():
            table = optimal_actions(eps[0].map_rows)  # one BFS per map
            encoded[m] = [with_optimal(self.serializer.episode(e.observations, e.actions, e.rewards, e.terminated,
                                                               e.truncated), e.observations, table, m)
                          for e in eps]
        weights = {m: quality_weights(eps, h.quality) for m, eps in by_map.items()}
        trial_length = len(paper_schedule()) if h.behaviour_schedule == "protocol" else 0
        return ReplayStream(encoded, weights, h.seq_len, self.serializer.pad_id, num_sequences,
                            (h.set_size_min, h.set_size_max), h.seed, rank, world_size, h.batch_size, h.set_order,
                            skip_batches, trial_length=trial_length)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        if t.max_steps is None or t.max_steps < 1:
            raise InputError("trainer.max_steps must be set (>= 1): the replay stream is sized from it")
        num_sequences = t.max_steps * t.accumulate_grad_batches * self.hparams.batch_size
        # A resumed fit has its step counter restored by now: continue the stream after the batches
        # already trained on (checkpoints are taken after an optimizer step).
        skip = t.global_step * t.accumulate_grad_batches
        if skip:
            log.info("resuming the replay stream after %d batches per rank", skip)
        stream = self.train_stream(num_sequences, t.global_rank, t.world_size, skip)
        return ReplayLoader(stream, self._layout(), batch_size=self.hparams.batch_size,
                            num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        # One batch holds every map of this rank: the agent plays them in lock-step.
        return DataLoader(MapList(self.eval_maps), batch_size=len(self.eval_maps), collate_fn=_as_list)

    def _layout(self) -> dict:
        """What decides which batch comes at which step."""
        h, t = self.hparams, self.trainer
        keys = ("seed", "seq_len", "batch_size", "num_workers", "set_size_min", "set_size_max", "quality",
                "set_order")
        return {"dataset": self.dataset_dir.name, **{k: h[k] for k in keys}, "world_size": t.world_size,
                "accumulate_grad_batches": t.accumulate_grad_batches}


class ReplayLoader(DataLoader):
    """The replay stream's ``DataLoader``. Its position is not state of its own: the stream skips
    what the restored step counter says was trained on. What it saves in checkpoints (Lightning
    keeps the state of loaders that have ``state_dict``) is the stream's layout, so that a resume
    under a different layout, which cannot continue the same batches, says so.

    Args:
        dataset: the ``ReplayStream``.
        layout: everything that decides which batch comes at which step (seed, sizes, world size, ...).
        **kwargs: ``DataLoader`` arguments.
    """

    def __init__(self, dataset: ReplayStream, layout: dict, **kwargs):
        super().__init__(dataset, **kwargs)
        self.layout = layout

    def state_dict(self) -> dict:
        return {"stream_layout": self.layout}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("stream_layout", {})
        changed = {k: (v, self.layout.get(k)) for k, v in saved.items() if self.layout.get(k) != v}
        if changed:
            log.warning("the checkpoint's replay stream was laid out differently (%s): training continues after the "
                        "same number of batches, but not with the batches the uninterrupted run would have seen",
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
