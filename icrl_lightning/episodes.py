"""The ``Episode`` record and its on-disk form: Parquet shards, one row per episode.

Shards are written to a temporary name and renamed into place, and a dataset counts as complete
only once its ``manifest.json`` exists (written last), so a killed build is never read as done.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("map_id", pa.int32()),
    ("map_rows", pa.list_(pa.string())),
    ("observations", pa.list_(pa.int16())),
    ("actions", pa.list_(pa.int8())),
    ("rewards", pa.list_(pa.float32())),
    ("terminated", pa.bool_()),
    ("truncated", pa.bool_()),
    ("return", pa.float32()),
    ("learner_episode", pa.int32()),
])


@dataclass
class Episode:
    """One episode: ``observations`` has one more entry than ``actions`` (the final state)."""

    map_id: int
    map_rows: tuple[str, ...]
    observations: list[int]
    actions: list[int]
    rewards: list[float]
    terminated: bool
    truncated: bool
    learner_episode: int = 0
    ret: float = field(init=False)

    def __post_init__(self):
        if len(self.observations) != len(self.actions) + 1 or len(self.rewards) != len(self.actions):
            raise ValueError("an episode needs len(observations) == len(actions) + 1 == len(rewards) + 1")
        self.ret = float(sum(self.rewards))

    @property
    def success(self) -> bool:
        return self.ret > 0


def write_shard(episodes: list[Episode], path: Path) -> None:
    table = pa.table({
        "map_id": [e.map_id for e in episodes],
        "map_rows": [list(e.map_rows) for e in episodes],
        "observations": [e.observations for e in episodes],
        "actions": [e.actions for e in episodes],
        "rewards": [e.rewards for e in episodes],
        "terminated": [e.terminated for e in episodes],
        "truncated": [e.truncated for e in episodes],
        "return": [e.ret for e in episodes],
        "learner_episode": [e.learner_episode for e in episodes],
    }, schema=SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_shard(path: Path) -> list[Episode]:
    try:
        table = pq.read_table(path, schema=SCHEMA)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ValueError(f"episode shard {path} is unreadable ({type(err).__name__}: {err}); "
                         "delete its dataset folder to rebuild it") from err
    cols = table.to_pydict()
    return [
        Episode(map_id=cols["map_id"][i], map_rows=tuple(cols["map_rows"][i]),
                observations=cols["observations"][i], actions=cols["actions"][i],
                rewards=cols["rewards"][i], terminated=cols["terminated"][i],
                truncated=cols["truncated"][i], learner_episode=cols["learner_episode"][i])
        for i in range(table.num_rows)
    ]


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


QUALITY_WEIGHTS = {"high": (5.0, 1.0), "medium": (1.0, 1.0), "low": (1.0, 5.0)}


def quality_weights(episodes: list[Episode], quality: str) -> np.ndarray:
    """SPEC data quality: high samples successes 5x more often than failures, low the reverse."""
    if quality not in QUALITY_WEIGHTS:
        raise ValueError(f"quality={quality!r}: choose one of {sorted(QUALITY_WEIGHTS)}")
    w_success, w_failure = QUALITY_WEIGHTS[quality]
    return np.array([w_success if e.success else w_failure for e in episodes])
