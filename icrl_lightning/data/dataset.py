"""The offline dataset on disk: the behaviour learner's episodes on the training maps, in Parquet
shards (``MAPS_PER_SHARD`` maps each), and ``manifest.json`` (settings, shards, maps), written
last. One folder per generating configuration, named by a hash of its settings.

Shards are written to a temporary name and renamed into place, and a dataset counts as complete
only once its manifest exists, so a killed build resumes from the shards it finished and is
never read as done."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from icrl_lightning.checks import InputError
from icrl_lightning.envs.frozen_lake import Map
from icrl_lightning.episodes import Episode, read_shard, shard_is_readable, write_json_atomic, write_shard

log = logging.getLogger(__name__)

MAPS_PER_SHARD = 25


def dataset_folder(data_dir: str | Path, settings: dict) -> Path:
    """``data_dir/episodes/<12 hex digits of the settings' hash>``."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data_dir) / "episodes" / key


def _write(path: Path, maps: list[Map], first: int, play: Callable[[Map, int], list[Episode]]) -> str:
    episodes: list[Episode] = []
    for map_id in range(first, first + len(maps)):
        episodes += play(maps[map_id - first], map_id)
    write_shard(episodes, path)
    return path.name


def build(folder: Path, settings: dict, maps: list[Map], play: Callable[[Map, int], list[Episode]],
          workers: int = 1) -> None:
    """Write ``play(rows, map_id)`` for every map into shards under ``folder``, then the manifest.
    Finished shards of an interrupted build are kept. ``workers`` > 1 plays the shards in that many
    processes (``play`` must then pickle); every map has its own seed, so the bytes are the same."""
    if (folder / "manifest.json").exists():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"data.data_dir: cannot make the dataset folder {folder}: a file is in the way") from None
    except PermissionError:
        raise InputError(f"data.data_dir: cannot write the dataset folder {folder} (permission denied)") from None
    shards, todo = [], []
    for s, first in enumerate(range(0, len(maps), MAPS_PER_SHARD)):
        path = folder / f"shard-{s:05d}.parquet"
        shards.append(path.name)
        if path.exists():
            if shard_is_readable(path):
                continue
            log.warning("rebuilding damaged shard %s", path)
        todo.append((path, maps[first:first + MAPS_PER_SHARD], first))
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        for path, chunk, first in todo:
            _write(path, chunk, first, play)
    else:
        # fork: the workers need only numpy, gymnasium and pyarrow, and start at once.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            for _ in pool.map(_write, *zip(*todo, strict=True), [play] * len(todo)):
                pass
    write_json_atomic({"settings": settings, "shards": shards, "maps": [list(m) for m in maps]},
                      folder / "manifest.json")
    log.info("built dataset %s (%d maps, %d worker(s))", folder, len(maps), workers)


def default_workers() -> int:
    """Processes for a dataset build: the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shards(folder: Path) -> list[Path]:
    """The shard files of a complete dataset, from its manifest."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"dataset {folder} is incomplete (no manifest.json); build it first")
    try:
        manifest = json.loads(manifest_path.read_text())
        names = manifest["shards"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(f"dataset manifest {manifest_path} is damaged ({type(err).__name__}: {err}): "
                         f"delete the dataset folder {folder} and run again to rebuild it") from None
    return [folder / name for name in names]


def iter_shards(folder: Path) -> Iterator[list[Episode]]:
    """The episodes of a complete dataset, one shard at a time (memory: one shard)."""
    for path in shards(folder):
        yield read_shard(path)


def load(folder: Path) -> list[Episode]:
    """Every episode of a complete dataset."""
    return [e for shard in iter_shards(folder) for e in shard]
