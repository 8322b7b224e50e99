"""The replay stream: packed token sequences of multi-episode sets, deterministic per seed,
split between ranks and DataLoader workers, and resumable after the batches already trained on."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from icrl_lightning.checks import InputError
from icrl_lightning.data.context import conflicts, teacher_actions
from icrl_lightning.serialize import EncodedEpisode

log = logging.getLogger(__name__)

SET_ORDERS = ("random", "learning")  # data.set_order
BATCH_FIELDS = ("conflict", "optimal", "teacher")  # batch fields computed only when the objective asks for them


class EpisodeTable:
    """One map's encoded episodes as a few flat arrays instead of many small objects (a dataset of
    25,000 maps x 200 episodes fits in memory); ``table[i]`` is an ``EncodedEpisode`` of views and
    ``table[a:b]`` a list of them, in the order played."""

    def __init__(self, episodes: list[EncodedEpisode]):
        if not episodes:
            raise ValueError("an EpisodeTable needs at least one episode")
        self.map_id = episodes[0].map_id
        self.ids = np.concatenate([e.ids for e in episodes])
        self.id_at = np.cumsum([0] + [len(e.ids) for e in episodes])
        self.q_pos = np.concatenate([e.q_pos for e in episodes])
        self.actions = np.concatenate([e.actions for e in episodes]).astype(np.int8)
        self.rewards = np.concatenate([e.rewards for e in episodes])
        self.tiles = np.concatenate([e.tiles for e in episodes]).astype(np.int16)
        self.step_at = np.cumsum([0] + [len(e.actions) for e in episodes])
        self.success = np.array([e.success for e in episodes])

    def __len__(self) -> int:
        return len(self.success)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        a, b = self.step_at[i], self.step_at[i + 1]
        return EncodedEpisode(ids=self.ids[self.id_at[i]:self.id_at[i + 1]], q_pos=self.q_pos[a:b],
                              actions=self.actions[a:b].astype(np.int64), rewards=self.rewards[a:b],
                              tiles=self.tiles[a:b].astype(np.int64), map_id=self.map_id,
                              success=bool(self.success[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class ReplayStream(IterableDataset):
    """Packed sequences of episode *sets*: a set is ``set_size`` episodes of one map, either drawn
    (with quality weights, without replacement) from that map's run and shuffled (``random``,
    SPEC), or a window of consecutive episodes of the run in the order played (``learning``,
    as Algorithm Distillation). Sets follow one another, so sequences hold map switches. Only
    whole episodes are packed; the rest of a sequence is padding. With ``random`` order, when the
    next episode of the current set does not fit, a later episode of the same set that fits goes
    first (the set's order is random anyway); sets stay contiguous either way.

    Each (rank, worker) owns a disjoint slice of the maps and its own seeded generator, so the
    stream is deterministic for a seed and no two readers produce the same sets.

    ``skip_batches`` resumes the stream: this rank's first ``skip_batches`` batches are generated
    and dropped, so a resumed run sees exactly the batches the uninterrupted run would have seen
    (for the same world size, ``num_workers`` and ``batch_size``). ``__len__`` stays the length of
    the whole stream, which is what Lightning's restored batch counter counts against.

    ``fields``: extra batch fields (``BATCH_FIELDS``) to compute; ``conflict`` marks the action
    positions of ``context.conflicts``; ``optimal`` (``[seq_len, actions]`` bool) marks at each
    action position the actions an optimal policy takes from that step's observation, read from ``optimal_actions``
    (map id -> the family's ``optimal_actions`` table of that task); ``teacher`` (``[seq_len,
    actions]`` bool, ``n_actions`` actions) marks at each action position the greedy actions of
    ``context.teacher_actions``'s optimistic learner replaying the context. ``history``: the maps'
    episodes are learning histories of that many episodes; a ``learning`` set is then one whole
    history (``set_size`` unused). ``set_per_sequence``: every sequence is one set from its first
    episode on (what does not fit is dropped, the rest is padding), so that no context holds two
    tasks and every context starts where an evaluation trial starts. ``observation_ids``
    (``Serializer.observation_ids``): permute observations; in every sequence each task's
    observations are written through a random permutation of these tokens (one per task and
    sequence, from a generator of its own, so the sets and packing are those of the unpermuted
    stream), so that an observation's token says nothing of the tile by itself and only the
    context does; ``permute_share`` < 1: only that share of the sequences (a coin per sequence from
    the same generator).
    """

    def __init__(
        self,
        episodes: dict[int, list[EncodedEpisode] | EpisodeTable],
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
        fields: frozenset[str] | set[str] = frozenset(),
        history: int | None = None,
        optimal_actions: dict[int, np.ndarray] | None = None,
        set_per_sequence: bool = False,
        observation_ids: np.ndarray | None = None,
        permute_share: float = 1.0,
        n_actions: int = 4,
    ):
        if set_order not in SET_ORDERS:
            raise InputError(f"data.set_order={set_order!r}: choose one of {', '.join(map(repr, SET_ORDERS))}")
        unknown = set(fields) - set(BATCH_FIELDS)
        if unknown:
            raise ValueError(f"unknown batch fields {sorted(unknown)}; known: {list(BATCH_FIELDS)}")
        longest = max(len(e) for eps in episodes.values() for e in eps)
        if longest > seq_len:
            raise InputError(f"data.seq_len={seq_len} is shorter than the longest episode ({longest} tokens): "
                             f"raise seq_len to at least {longest}")
        self.episodes, self.weights = episodes, weights
        self.seq_len, self.pad_id, self.num_sequences = seq_len, pad_id, num_sequences
        self.set_size, self.seed, self.rank, self.world_size = set_size, seed, rank, world_size
        self.batch_size, self.set_order, self.skip_batches = batch_size, set_order, skip_batches
        if "optimal" in fields and (optimal_actions is None or set(episodes) - set(optimal_actions)):
            raise ValueError("the optimal batch field needs the optimal_actions table of every map")
        self.fields = frozenset(fields)
        self.history = history
        self.optimal_actions = optimal_actions
        self._n_actions = next(iter(optimal_actions.values())).shape[1] if "optimal" in fields else 0
        self.n_actions = n_actions  # the teacher field's width
        self.set_per_sequence = set_per_sequence
        self.observation_ids, self.permute_share = observation_ids, permute_share

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

    def sets(self, rng: np.random.Generator, maps: list[int]):
        """Sets of episodes (lists) of ``maps``, forever."""
        lo, hi = self.set_size
        while True:
            m = maps[rng.integers(len(maps))]
            eps, w = self.episodes[m], self.weights[m]
            if self.set_order == "learning" and self.history:
                # One whole learning history (the behaviour's episodes come in histories from scratch).
                first = self.history * int(rng.integers(-(-len(eps) // self.history)))
                yield eps[first:first + self.history]
                continue
            k = min(int(rng.integers(lo, hi + 1)), len(eps))
            if self.set_order == "learning":
                first = int(rng.integers(len(eps) - k + 1))
                yield eps[first:first + k]
            else:
                yield [eps[i] for i in rng.choice(len(eps), size=k, replace=False, p=w / w.sum())]

    def permuted(self, chunk: list[EncodedEpisode], rng: np.random.Generator) -> list[EncodedEpisode]:
        """``chunk`` with each task's observation tokens sent through a random permutation of
        ``observation_ids`` (the same one for all of that task's episodes in the chunk; a tile's
        success and failure tokens move together)."""
        ids = self.observation_ids
        n = ids.shape[1]
        size = max(int(ids.max()), max(int(e.ids.max()) for e in chunk)) + 1
        tables = {}
        for m in dict.fromkeys(e.map_id for e in chunk):
            table = np.arange(size, dtype=np.int32)
            perm = rng.permutation(n)
            for row in ids:
                table[row] = row[perm]
            tables[m] = table
        return [dataclasses.replace(e, ids=tables[e.map_id][e.ids]) for e in chunk]

    def chunks(self, rng: np.random.Generator, maps: list[int], permute_rng: np.random.Generator | None = None):
        """The episodes of each sequence (whole sets in order, packed), forever; with
        ``observation_ids``, their observations permuted by draws of ``permute_rng``."""
        if self.observation_ids is not None and permute_rng is None:
            permute_rng = np.random.default_rng([self.seed, 1])
        sets = self.sets(rng, maps)
        pending: list[EncodedEpisode] = []  # what is left of the current set, in order
        reorder = self.set_order == "random"
        while True:
            chunk: list[EncodedEpisode] = []
            room = self.seq_len
            while True:
                if not pending:
                    if chunk and self.set_per_sequence:
                        break
                    pending = list(next(sets))
                fits = next((i for i, e in enumerate(pending if reorder else pending[:1]) if len(e) <= room), None)
                if fits is None:
                    break
                e = pending.pop(fits)
                chunk.append(e)
                room -= len(e)
            if self.set_per_sequence:
                pending = []  # the next sequence starts a new set; what did not fit is dropped
            if self.observation_ids is None or (self.permute_share < 1 and permute_rng.random() >= self.permute_share):
                yield chunk
            else:
                yield self.permuted(chunk, permute_rng)

    def __iter__(self):
        reader, readers, dropped, count = self._reader()
        maps = sorted(self.episodes)[reader::readers]
        chunks = self.chunks(np.random.default_rng([self.seed, reader]), maps,
                             np.random.default_rng([self.seed, reader, 1]))
        for _ in range(dropped):  # resuming: regenerate what was consumed (packing only; cheap)
            next(chunks)
        for _ in range(count):
            yield self.pack(next(chunks))

    def pack(self, chunk: list[EncodedEpisode]) -> dict[str, torch.Tensor]:
        """One training sequence of ``chunk``'s episodes, padded to ``seq_len``: token ids, the
        action positions (``q_mask``) with their action, reward and episode end (``done``: no
        bootstrap past it), the real length, and the extra ``fields``."""
        n = self.seq_len
        ids = np.full(n, self.pad_id, dtype=np.int64)
        q_mask = np.zeros(n, dtype=bool)
        action = np.zeros(n, dtype=np.int64)
        reward = np.zeros(n, dtype=np.float32)
        done = np.zeros(n, dtype=bool)
        conflict = np.zeros(n, dtype=bool) if "conflict" in self.fields else None
        optimal = np.zeros((n, self._n_actions), dtype=bool) if "optimal" in self.fields else None
        teacher = np.zeros((n, self.n_actions), dtype=bool) if "teacher" in self.fields else None
        flags = conflicts(chunk) if conflict is not None else [None] * len(chunk)
        labels = teacher_actions(chunk, self.n_actions) if teacher is not None else [None] * len(chunk)
        at = 0
        for e, flag, label in zip(chunk, flags, labels, strict=True):
            ids[at:at + len(e)] = e.ids
            if len(e.q_pos):
                pos = e.q_pos + at
                q_mask[pos], action[pos], reward[pos] = True, e.actions, e.rewards
                done[pos[-1]] = True  # the last action of an episode does not bootstrap within it
                if conflict is not None:
                    conflict[pos] = flag
                if optimal is not None:
                    optimal[pos] = self.optimal_actions[e.map_id][e.tiles]
                if teacher is not None:
                    teacher[pos] = label
            at += len(e)
        batch = {"input_ids": torch.from_numpy(ids), "q_mask": torch.from_numpy(q_mask),
                 "action": torch.from_numpy(action), "reward": torch.from_numpy(reward),
                 "done": torch.from_numpy(done), "n_tokens": torch.tensor(at)}
        if conflict is not None:
            batch["conflict"] = torch.from_numpy(conflict)
        if optimal is not None:
            batch["optimal"] = torch.from_numpy(optimal)
        if teacher is not None:
            batch["teacher"] = torch.from_numpy(teacher)
        return batch


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
