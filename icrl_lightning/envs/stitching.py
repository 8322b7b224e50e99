"""Behaviour-stitching layouts of Frozen Lake (SPEC Sec. 4.3): a map and context episodes whose
useful parts must be joined to reach the goal from the map's start.

A layout file holds one layout ``{"map": [row strings], "context": [[tile, ...], ...]}``
(``data/stitching.json``: the paper's) or a list of them (``data/stitching_layouts.json``: many,
made by ``make_layouts`` on held-out maps). ``make_layout`` builds one from a terrain
the way the paper's is built: a shortest path from the start is followed to a split tile, where
the failed context episode steps into a neighbouring hole, and the successful context episode
reaches the goal through the same split tile from another tile. Joining the failed episode's
prefix to the successful episode's suffix is a shortest path from the start.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from icrl_lightning.checks import InputError, read_json_file
from icrl_lightning.envs.frozen_lake import Map, _neighbours, path_steps, validate_map

Layout = tuple[Map, list[list[int]]]


def _layout(data, what: str) -> Layout:
    if not isinstance(data, dict) or set(data) != {"map", "context"}:
        raise InputError(f"{what}: expected an object with the keys 'map' (row strings) and 'context' "
                         "(a list of tile paths), or a list of such objects")
    rows = validate_map(data["map"], f"{what}, map")
    paths = data["context"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, list) for p in paths):
        raise InputError(f"{what}: 'context' must be a non-empty list of tile paths (lists of tile indices)")
    for i, p in enumerate(paths):
        path_steps(rows, p, f"{what}, context {i}")
    return rows, paths


def load_stitching_layouts(path: str | Path, what: str = "model.evaluation.stitching_file") -> list[Layout]:
    """The layouts of a stitching file: one object ``{"map", "context"}`` or a non-empty list of them."""
    data = read_json_file(path, what)
    if isinstance(data, list):
        if not data:
            raise InputError(f"{what}: {path}: the list of layouts is empty")
        return [_layout(d, f"{what}: {path}, layout {i}") for i, d in enumerate(data)]
    return [_layout(data, f"{what}: {path}")]


def load_stitching_file(path: str | Path, what: str = "model.evaluation.stitching_file") -> Layout:
    """``(map, context paths)`` of a one-layout stitching file (``data/stitching.json`` holds SPEC's)."""
    layouts = load_stitching_layouts(path, what)
    if len(layouts) != 1:
        raise InputError(f"{what}: {path} holds {len(layouts)} layouts; expected one")
    return layouts[0]


def _bfs(rows: Map, source: int, blocked: set[int]) -> dict[int, int]:
    """Parent of every tile reachable from ``source`` over frozen tiles (holes and ``blocked`` are
    never entered; a goal is entered but not left)."""
    ncol = len(rows[0])
    parent = {source: source}
    queue = deque([source])
    while queue:
        t = queue.popleft()
        if rows[t // ncol][t % ncol] == "G" and t != source:
            continue
        for _, rr, cc in _neighbours(rows, t // ncol, t % ncol):
            n = rr * ncol + cc
            if n not in parent and n not in blocked and rows[rr][cc] != "H":
                parent[n] = t
                queue.append(n)
    return parent


def _path(parent: dict[int, int], end: int) -> list[int]:
    path = [end]
    while parent[path[-1]] != path[-1]:
        path.append(parent[path[-1]])
    return path[::-1]


def make_layout(terrain: Map, rng: np.random.Generator, min_hops: int = 4, min_lead: int = 2) -> dict | None:
    """One stitching layout on ``terrain`` (its holes and goals; its starts count as frozen), or
    ``None`` when the draw finds none.

    A start tile ``s`` and a goal ``g`` at least ``min_hops`` moves apart (the map family's
    ``min_hops``: 4) are drawn, with a shortest path ``s .. g``. A split tile ``t`` on it (not
    ``s``, not ``g``) with a hole ``h`` beside it off the path gives the failed episode
    ``s .. t, h``. The successful episode starts at a tile off the path, ``min_lead`` or more moves
    from ``t`` without crossing the path, and follows a shortest such way to ``t``, then the path
    on to ``g``. The map keeps one start (``s``) and one goal (``g``); other starts and goals
    become frozen.
    """
    ncol = len(terrain[0])
    cells = "".join(terrain)
    free = [t for t, x in enumerate(cells) if x in "SF"]
    goals = [t for t, x in enumerate(cells) if x == "G"]
    rng.shuffle(free)
    for s in free:
        g = int(rng.choice(goals))
        grid = [["F" if x in "SG" else x for x in row] for row in terrain]
        grid[s // ncol][s % ncol], grid[g // ncol][g % ncol] = "S", "G"
        rows = tuple("".join(r) for r in grid)
        parent = _bfs(rows, s, set())
        path = _path(parent, g) if g in parent else []
        if len(path) - 1 < min_hops:
            continue
        splits = list(range(1, len(path) - 1))
        rng.shuffle(splits)
        for k in splits:
            t = path[k]
            holes = [rr * ncol + cc for _, rr, cc in _neighbours(rows, t // ncol, t % ncol) if rows[rr][cc] == "H"]
            if not holes:
                continue
            h = int(rng.choice(holes))
            lead = _bfs(rows, t, set(path) - {t})  # the way in stays off the path
            far = sorted(a for a in lead if a != t and len(_path(lead, a)) - 1 >= min_lead)
            if not far:
                continue
            a = int(rng.choice(far))
            success = _path(lead, a)[::-1] + path[k + 1:]
            return {"map": list(rows), "context": [success, path[:k + 1] + [h]]}
    return None


def make_layouts(terrains: list[Map], n: int, seed: int, per_terrain: int = 2,
                 exclude: frozenset[Map] = frozenset(), **kwargs) -> list[dict]:
    """Up to ``n`` layouts, at most ``per_terrain`` from each terrain in order (distinct layouts,
    none whose map is in ``exclude``, e.g. training maps), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for terrain in terrains:
        made: list[dict] = []
        for _ in range(4 * per_terrain):
            layout = make_layout(terrain, rng, **kwargs)
            if layout is not None and layout not in made and tuple(layout["map"]) not in exclude:
                made.append(layout)
            if len(made) == per_terrain:
                break
        out.extend(made)
        if len(out) >= n:
            return out[:n]
    return out
