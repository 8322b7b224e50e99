"""The ``Episode`` record and its on-disk form: Parquet shards, one row per episode.

Shards are written to a temporary name and renamed into place, and a dataset counts as complete
only once its ``manifest.json`` exists (written last), so a killed build is never read as done.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from icrl_lightning.checks import InputError

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


@dataclass(frozen=True)
class Episode:
    """One episode, the one record every part of the pipeline reads and writes: the behaviour
    learners' data, the shards on disk, the evaluation agent's trials, the context of a scenario.

    ``observations`` has one more entry than ``actions`` (the final state); ``rewards`` one per
    action. ``map_id`` indexes the map in its set (training maps, an evaluation batch; -1 unknown),
    ``map_rows`` is the map itself when known, ``learner_episode`` the episode's place in the run
    that played it."""

    observations: list[int]
    actions: list[int]
    rewards: list[float]
    terminated: bool
    truncated: bool = False
    map_id: int = -1
    map_rows: tuple[str, ...] = ()
    learner_episode: int = 0

    def __post_init__(self):
        if len(self.observations) != len(self.actions) + 1 or len(self.rewards) != len(self.actions):
            raise ValueError("an episode needs len(observations) == len(actions) + 1 == len(rewards) + 1")

    @property
    def ret(self) -> float:
        return float(sum(self.rewards))

    @property
    def success(self) -> bool:
        return self.ret > 0

    @property
    def tiles(self) -> list[int]:
        """The tile each action was taken on."""
        return self.observations[:-1]

    def steps(self) -> dict:
        """The episode's own fields (what a context episode needs), as plain JSON values."""
        return {"observations": list(self.observations), "actions": list(self.actions),
                "rewards": list(self.rewards), "terminated": self.terminated, "truncated": self.truncated}


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
    _replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


def _unreadable(path: Path, what: str) -> InputError:
    return InputError(f"episode shard {path} is unreadable ({what}); it is damaged or was not written by this "
                      f"version: delete the dataset folder {path.parent} and run again to rebuild it")


def shard_is_readable(path: Path) -> bool:
    """Cheap check (footer and schema only) that ``path`` is a complete shard."""
    try:
        return pq.read_schema(path).equals(SCHEMA, check_metadata=False)
    except (OSError, pa.ArrowException):
        return False


def read_shard(path: Path) -> list[Episode]:
    try:
        table = pq.read_table(path, schema=SCHEMA)
    except FileNotFoundError:
        raise _unreadable(path, "the file is missing") from None
    except (OSError, pa.ArrowException, ValueError) as err:  # pyarrow raises several types for a damaged file
        raise _unreadable(path, f"{type(err).__name__}: {err}") from err
    cols = table.to_pydict()
    episodes = []
    for i in range(table.num_rows):
        try:
            episodes.append(Episode(
                observations=cols["observations"][i], actions=cols["actions"][i], rewards=cols["rewards"][i],
                terminated=cols["terminated"][i], truncated=cols["truncated"][i], map_id=cols["map_id"][i],
                map_rows=tuple(cols["map_rows"][i]), learner_episode=cols["learner_episode"][i]))
        except (TypeError, ValueError) as err:
            raise _unreadable(path, f"row {i}: {err}") from err
    return episodes


def write_json_atomic(obj, path: Path) -> None:
    text = json.dumps(obj, indent=2)
    _replace_atomically(path, lambda tmp: tmp.write_text(text))


def _replace_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name in the same folder, flush it to disk, then rename it over
    ``path``: a reader sees the old file or the whole new one, never a part. The temporary name
    holds the process id, so two processes building the same dataset never write the same file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


QUALITY_WEIGHTS = {"high": (5.0, 1.0), "medium": (1.0, 1.0), "low": (1.0, 5.0)}


def quality_weights(episodes: list[Episode], quality: str) -> np.ndarray:
    """SPEC data quality: high samples successes 5x more often than failures, low the reverse."""
    if quality not in QUALITY_WEIGHTS:
        raise InputError(f"data.quality={quality!r}: choose one of {sorted(QUALITY_WEIGHTS)}")
    w_success, w_failure = QUALITY_WEIGHTS[quality]
    return np.array([w_success if e.success else w_failure for e in episodes])
