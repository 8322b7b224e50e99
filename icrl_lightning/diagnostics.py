"""A small public API for the diagnostic probes in ``tools/``: learner contexts of training or
held-out maps, packed like training sequences, and the Q-values a checkpoint reads from them.

    from icrl_lightning.checkpoints import load_run
    from icrl_lightning import diagnostics
    module, data = load_run("runs/quickstart/version_0/checkpoints/last.ckpt")
    by_map = diagnostics.learner_episodes(data, "heldout", maps=50)
    for seq in diagnostics.single_map_sequences(by_map, module.serializer, seq_len=512, rng=rng):
        q = diagnostics.q_values(module, seq.batch)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from icrl_lightning.data import ReplayDataModule, ReplayStream
from icrl_lightning.episodes import Episode, quality_weights
from icrl_lightning.module import ICRLModule
from icrl_lightning.serialize import Serializer

# Map ids of fresh runs on held-out maps, apart from the training maps' ids.
HELDOUT_IDS = 1_000_000


def learner_episodes(data: ReplayDataModule, split: str = "train", maps: int | None = None) -> dict[int, list[Episode]]:
    """The behaviour learner's episodes by map: ``train``, the dataset's (built if absent);
    ``heldout``, fresh runs with the dataset's behaviour settings on the held-out maps (ids from
    ``HELDOUT_IDS``), to tell reading the context from recognising a memorised training map.
    ``maps``: the first that many maps (None: all)."""
    by_map: dict[int, list[Episode]] = {}
    if split == "train":
        data.prepare_data()
        for e in data.load_episodes():
            by_map.setdefault(e.map_id, []).append(e)
        keep = sorted(by_map) if maps is None else sorted(by_map)[:maps]
        return {m: by_map[m] for m in keep}
    if split != "heldout":
        raise ValueError(f"split={split!r}: choose 'train' or 'heldout'")
    seed = data.hparams.seed
    for i, rows in enumerate(data.heldout_maps("heldout")[:maps]):
        by_map[HELDOUT_IDS + i] = data.behaviour_run(rows, HELDOUT_IDS + i, seed=[seed, 4, i])
    return by_map


def replay_stream(data: ReplayDataModule, by_map: dict[int, list[Episode]], num_sequences: int,
                  fields=frozenset()) -> ReplayStream:
    """A replay stream over ``by_map`` with the data module's set, packing and quality settings."""
    if data.serializer is None:
        raise RuntimeError("replay_stream needs the data module's serializer: load_run hands it over")
    weights = {m: quality_weights(eps, data.hparams.quality) for m, eps in by_map.items()}
    return data.stream(data.encode(by_map), weights, num_sequences, fields=fields)


@dataclass
class Sequence:
    """One packed single-map sequence: ``batch`` (``input_ids`` / ``q_mask`` as ``[1, T]``, and per
    action ``action``, ``reward``, ``done``), the ``episodes`` packed, and per action the index of
    its episode in the sequence (``episode_index``: how many earlier episodes it can read)."""

    batch: dict[str, torch.Tensor]
    episodes: list[Episode]
    episode_index: list[int]


def single_map_sequences(by_map: dict[int, list[Episode]], serializer: Serializer, seq_len: int,
                         rng: np.random.Generator, maps: int | None = None, per_map: int = 30) -> Iterator[Sequence]:
    """For each of the first ``maps`` maps: ``per_map`` of its episodes drawn at random and packed
    whole, in the order drawn, into one sequence of at most ``seq_len`` tokens (it stops at the
    first that does not fit; episodes without an action are left out; a map with nothing packed
    yields nothing)."""
    for map_id in sorted(by_map)[:maps]:
        episodes = by_map[map_id]
        chunk, packed, index, room = [], [], [], seq_len
        for k, i in enumerate(rng.choice(len(episodes), size=min(per_map, len(episodes)), replace=False)):
            e = episodes[i]
            enc = serializer.encode(e)
            if not len(enc.q_pos):
                continue
            if len(enc) > room:
                break
            room -= len(enc)
            chunk.append(enc)
            packed.append(e)
            index += [k] * len(enc.actions)
        if not packed:
            continue
        # The training stream's own packing, cut to the packed tokens.
        b = ReplayStream({map_id: chunk}, {map_id: np.ones(len(chunk))}, seq_len, serializer.pad_id, 1).pack(chunk)
        n, q = int(b["n_tokens"]), b["q_mask"]
        batch = {"input_ids": b["input_ids"][None, :n], "q_mask": q[None, :n], "action": b["action"][q],
                 "reward": b["reward"][q], "done": b["done"][q]}
        yield Sequence(batch, packed, index)


@torch.no_grad()
def q_values(module: ICRLModule, batch: dict[str, torch.Tensor], target: bool = False) -> torch.Tensor:
    """Q(context, .) ``[N, 4]`` at every action position of ``batch`` (online or target network);
    ``batch`` may be one packed sequence (``[T]``) or a batch (``[B, T]``)."""
    ids, mask = batch["input_ids"], batch["q_mask"]
    if ids.dim() == 1:
        ids, mask = ids[None], mask[None]
    return module.q_values(ids, mask, target=target)
