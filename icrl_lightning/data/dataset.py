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
from collections.abc import Callable
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


def build(folder: Path, settings: dict, maps: list[Map], play: Callable[[Map, int], list[Episode]]) -> None:
    """Write ``play(rows, map_id)`` for every map into shards under ``folder``, then the manifest.
    Finished shards of an interrupted build are kept."""
    if (folder / "manifest.json").exists():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"data.data_dir: cannot make the dataset folder {folder}: a file is in the way") from None
    except PermissionError:
        raise InputError(f"data.data_dir: cannot write the dataset folder {folder} (permission denied)") from None
    shards = []
    for s, first in enumerate(range(0, len(maps), MAPS_PER_SHARD)):
        path = folder / f"shard-{s:05d}.parquet"
        shards.append(path.name)
        if path.exists():
            if shard_is_readable(path):
                continue
            log.warning("rebuilding damaged shard %s", path)
        episodes: list[Episode] = []
        for map_id in range(first, min(first + MAPS_PER_SHARD, len(maps))):
            episodes += play(maps[map_id], map_id)
        write_shard(episodes, path)
    write_json_atomic({"settings": settings, "shards": shards, "maps": [list(m) for m in maps]},
                      folder / "manifest.json")
    log.info("built dataset %s (%d maps)", folder, len(maps))


def load(folder: Path) -> list[Episode]:
    """Every episode of a complete dataset, shard by shard."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"dataset {folder} is incomplete (no manifest.json); build it first")
    try:
        manifest = json.loads(manifest_path.read_text())
        shards = manifest["shards"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(f"dataset manifest {manifest_path} is damaged ({type(err).__name__}: {err}): "
                         f"delete the dataset folder {folder} and run again to rebuild it") from None
    return [e for name in shards for e in read_shard(folder / name)]
