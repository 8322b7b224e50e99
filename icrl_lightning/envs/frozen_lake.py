"""Frozen Lake map family (SPEC "Environment") on gymnasium's own ``FrozenLake-v1``.

A map is a tuple of row strings in gymnasium ``desc`` form (``S`` start, ``G`` goal,
``H`` hole, ``F`` frozen). Maps are generated with the authors' probabilities and kept only
when every start reaches a goal in at least ``min_hops`` moves.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import gymnasium as gym
import numpy as np

from icrl_lightning.checks import InputError, check_range, read_json_file
from icrl_lightning.envs.family import (
    ProblemFamily,
    Task,
    TaskSplits,
    fork_rebinding_env,
    paper_schedule,  # noqa: F401 - imported from here before families
)

# gymnasium's action indices: 0 left, 1 down, 2 right, 3 up.
ACTIONS = ("left", "down", "right", "up")
_MOVES = ((0, -1), (1, 0), (0, 1), (-1, 0))
TILES = frozenset("SFHG")

Map = Task


def validate_map(rows: Map | list[str], where: str = "map") -> Map:
    """Check a map's shape and letters; returns it as a tuple. ``where`` names it in errors."""
    if isinstance(rows, str) or not isinstance(rows, (list, tuple)):
        raise InputError(f"{where}: a map is a list of row strings, got {type(rows).__name__} {rows!r}")
    rows = tuple(rows)
    if not rows or not all(isinstance(r, str) for r in rows):
        raise InputError(f"{where}: a map is a non-empty list of row strings, got {rows!r}")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise InputError(f"{where}: row {i} has {len(row)} tiles, row 0 has {width} (ragged map)")
        bad = set(row) - TILES
        if bad:
            raise InputError(f"{where}: row {i} has unknown tile letters {sorted(bad)} (allowed: S F H G)")
    text = "".join(rows)
    if "S" not in text:
        raise InputError(f"{where}: the map has no start tile 'S'")
    if "G" not in text:
        raise InputError(f"{where}: the map has no goal tile 'G'")
    dist = goal_distances(rows)
    stuck = [r * width + c for r in range(len(rows)) for c in range(width) if rows[r][c] == "S" and dist[r, c] < 0]
    if stuck:
        raise InputError(f"{where}: no path from start tile(s) {stuck} to a goal (holes block every way): "
                         "the agent could never solve it")
    return rows


def _neighbours(rows: Map, r: int, c: int):
    nrow, ncol = len(rows), len(rows[0])
    for a, (dr, dc) in enumerate(_MOVES):
        rr, cc = min(max(r + dr, 0), nrow - 1), min(max(c + dc, 0), ncol - 1)
        yield a, rr, cc


def goal_distances(rows: Map) -> np.ndarray:
    """Moves from every tile to the nearest goal avoiding holes (-1 = unreachable), by BFS."""
    nrow, ncol = len(rows), len(rows[0])
    dist = np.full((nrow, ncol), -1, dtype=np.int64)
    queue: deque[tuple[int, int]] = deque()
    for r in range(nrow):
        for c in range(ncol):
            if rows[r][c] == "G":
                dist[r, c] = 0
                queue.append((r, c))
    # Moves are reversible on a grid, so a BFS outward from the goals gives forward distances;
    # holes are terminal, so a path may not pass through one.
    while queue:
        r, c = queue.popleft()
        for _, rr, cc in _neighbours(rows, r, c):
            if dist[rr, cc] == -1 and rows[rr][cc] != "H":
                dist[rr, cc] = dist[r, c] + 1
                queue.append((rr, cc))
    return dist


def optimal_actions(rows: Map) -> np.ndarray:
    """``[n_tiles, 4]`` bool: the actions that start a shortest path to a goal from each tile
    (none on goals, holes and tiles with no path)."""
    dist = goal_distances(rows)
    nrow, ncol = dist.shape
    best = np.zeros((nrow * ncol, 4), dtype=bool)
    for r in range(nrow):
        for c in range(ncol):
            if dist[r, c] <= 0 or rows[r][c] == "H":
                continue
            for a, rr, cc in _neighbours(rows, r, c):
                best[r * ncol + c, a] = dist[rr, cc] == dist[r, c] - 1
    return best


def shortest_path_actions(rows: Map) -> np.ndarray:
    """For every tile index, an action on a shortest path to a goal (the first in action order;
    -1 where none exists)."""
    best = optimal_actions(rows)
    return np.where(best.any(axis=1), best.argmax(axis=1), -1)


def generate_map(
    rng: np.random.Generator,
    min_size: int = 3,
    max_size: int = 5,
    p_start: float = 0.1,
    p_goal: float = 0.1,
    p_hole: float = 0.2,
    min_hops: int = 4,
    max_tries: int = 100_000,
) -> Map:
    """One valid map: width, height uniform in [min_size, max_size]; SPEC's tile probabilities."""
    for _ in range(max_tries):
        nrow, ncol = rng.integers(min_size, max_size + 1, size=2)
        u = rng.random((nrow, ncol, 3))
        tiles = np.where(u[..., 0] < p_start, "S",
                         np.where(u[..., 1] < p_goal, "G", np.where(u[..., 2] < p_hole, "H", "F")))
        rows = tuple("".join(r) for r in tiles)
        text = "".join(rows)
        if "S" not in text or "G" not in text:
            continue
        dist = goal_distances(rows)
        starts = [dist[r, c] for r in range(nrow) for c in range(ncol) if rows[r][c] == "S"]
        if all(d >= min_hops for d in starts):  # also rejects unreachable goals (d == -1)
            return rows
    raise InputError(
        f"no valid map in {max_tries} tries for sizes {min_size}..{max_size}, min_hops={min_hops}: "
        "lower min_hops or p_hole"
    )


def generate_maps(n: int, seed: int | list[int], exclude: frozenset[Map] = frozenset(), **kwargs) -> list[Map]:
    """``n`` distinct maps, none in ``exclude``, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    maps: list[Map] = []
    seen = set(exclude)
    while len(maps) < n:
        m = generate_map(rng, **kwargs)
        if m not in seen:
            seen.add(m)
            maps.append(m)
    return maps


MapSplits = TaskSplits  # training, held-out (same sizes) and out-of-distribution maps


# Evaluation maps are reserved first, so that asking for more training maps never changes them.
RESERVED_EVAL_MAPS = 200
# SPEC "Splits": the out-of-distribution maps are 6..7 x 6..7.
OOD_MIN_SIZE, OOD_MAX_SIZE = 6, 7


def make_splits(
    seed: int,
    n_train: int,
    split_seed: int | None = None,
    min_size: int = 3,
    max_size: int = 5,
    ood_min_size: int = OOD_MIN_SIZE,
    ood_max_size: int = OOD_MAX_SIZE,
    **kwargs,
) -> MapSplits:
    """Deterministic splits. Held-out and OOD maps are drawn from their own seed streams
    (``split_seed``, default ``seed``) and the training maps (``seed``) exclude both, so no
    evaluation map is ever trained on, and runs at different ``seed`` share their evaluation maps."""
    split_seed = seed if split_seed is None else split_seed
    heldout = generate_maps(RESERVED_EVAL_MAPS, [split_seed, 1], min_size=min_size, max_size=max_size, **kwargs)
    ood = generate_maps(RESERVED_EVAL_MAPS, [split_seed, 2], min_size=ood_min_size, max_size=ood_max_size, **kwargs)
    reserved = frozenset(heldout) | frozenset(ood)
    train = generate_maps(n_train, [seed, 0], exclude=reserved, min_size=min_size, max_size=max_size, **kwargs)
    return MapSplits(train=train, heldout=heldout, ood=ood)


def make_env(rows: Map, max_episode_steps: int = 100) -> gym.Env:
    """gymnasium's ``FrozenLake-v1`` on this map, deterministic moves, SPEC's 100-step limit."""
    return gym.make(
        "FrozenLake-v1",
        desc=list(rows),
        is_slippery=False,
        max_episode_steps=max_episode_steps,
        disable_env_checker=True,
    )


def load_map_file(path: str | Path, what: str = "data.eval_map_file") -> list[Map]:
    """A JSON file holding a list of maps, each a list of row strings (gymnasium ``desc``); every
    map must be solvable (a path from each start to a goal)."""
    data = read_json_file(path, what)
    if not isinstance(data, list) or not data:
        raise InputError(f"{what}: {path}: expected a non-empty JSON list of maps (lists of row strings)")
    return [validate_map(m, where=f"{what}: {path}, map {i}") for i, m in enumerate(data)]


def path_steps(rows: Map, path: list[int], where: str) -> tuple[list[int], list[float], bool, bool]:
    """A tile path on ``rows`` as ``(actions, rewards, terminated, truncated)``: each move's action,
    reward 1.0 on reaching a goal, terminated on a goal or hole (which must be the last tile),
    else truncated."""
    nrow, ncol = len(rows), len(rows[0])
    if len(path) < 2:
        raise InputError(f"{where}: path {list(path)} needs at least two tiles")
    bad = [t for t in path if not isinstance(t, int) or not 0 <= t < nrow * ncol]
    if bad:
        raise InputError(f"{where}: tiles {bad} are outside the {nrow}x{ncol} map")
    actions, rewards = [], []
    for t, (a_tile, b_tile) in enumerate(zip(path, path[1:], strict=False)):
        letter = rows[a_tile // ncol][a_tile % ncol]
        if letter in "HG":
            raise InputError(f"{where}: path {list(path)} goes on after tile {a_tile} ({letter!r}, terminal)")
        moves = [a for a, rr, cc in _neighbours(rows, a_tile // ncol, a_tile % ncol) if rr * ncol + cc == b_tile]
        if not moves:
            raise InputError(f"{where}: no single move leads from tile {a_tile} to tile {b_tile} "
                             f"(step {t} of path {list(path)})")
        actions.append(moves[0])
        rewards.append(1.0 if rows[b_tile // ncol][b_tile % ncol] == "G" else 0.0)
    end = rows[path[-1] // ncol][path[-1] % ncol]
    return actions, rewards, end in "HG", end not in "HG"


class FrozenLake(ProblemFamily):
    """The Frozen Lake map family (SPEC "Environment"): maps of ``min_size..max_size`` tiles a
    side, each tile a start (p 0.1), else a goal (p 0.1), else a hole (``p_hole``); valid when every
    start reaches a goal in at least ``min_hops`` moves; gymnasium's ``FrozenLake-v1``, not slippery.

    Args:
        min_size: smallest map side of the in-distribution maps.
        max_size: largest map side of the in-distribution maps.
        p_hole: hole probability of a tile that is neither start nor goal.
        min_hops: shortest start-to-goal distance a valid map must have.
        max_episode_steps: time limit of every episode (SPEC: 100).
    """

    actions = ACTIONS
    reward_values = (1.0,)

    def __init__(self, min_size: int = 3, max_size: int = 5, p_hole: float = 0.2, min_hops: int = 4,
                 max_episode_steps: int = 100):
        self.min_size, self.max_size, self.p_hole = min_size, max_size, p_hole
        self.min_hops, self.max_episode_steps = min_hops, max_episode_steps
        check_range("data.env.max_episode_steps", max_episode_steps, 1, None)
        check_range("data.env.min_size", min_size, 2, None, why="a map is at least 2 x 2 tiles")
        check_range("data.env.max_size", max_size, min_size, None, why="at least data.env.min_size")
        check_range("data.env.p_hole", p_hole, 0, 1, hi_open=True)
        far = 2 * (max_size - 1)
        check_range("data.env.min_hops", min_hops, 0, far,
                    why=f"the farthest tiles of a {max_size} x {max_size} map are {far} moves apart")

    def settings(self) -> dict:
        """What generates the maps and episodes (part of the dataset's key)."""
        return {"max_episode_steps": self.max_episode_steps, "min_size": self.min_size, "max_size": self.max_size,
                "p_hole": self.p_hole, "min_hops": self.min_hops}

    def splits(self, seed: int, n_train: int, split_seed: int | None = None) -> MapSplits:
        return make_splits(seed, n_train, split_seed, min_size=self.min_size, max_size=self.max_size,
                           p_hole=self.p_hole, min_hops=self.min_hops)

    def make_env(self, rows: Map, max_episode_steps: int | None = None) -> gym.Env:
        return make_env(rows, max_episode_steps or self.max_episode_steps)

    def fork_env(self, env: gym.Env) -> gym.Env:
        """gymnasium's ``FrozenLakeEnv.step`` rebinds ``s`` and ``lastaction`` and leaves its tables alone."""
        return fork_rebinding_env(env)

    def n_observations(self, rows: Map) -> int:
        return len(rows) * len(rows[0])

    def largest_observations(self, split: str) -> int:
        """Tiles of the largest map of ``split`` (``train``/``heldout``, or ``ood``)."""
        side = OOD_MAX_SIZE if split == "ood" else self.max_size
        return side * side

    largest_tiles = largest_observations

    def optimal_actions(self, rows: Map) -> np.ndarray:
        return optimal_actions(rows)

    def load_task_file(self, path: str, what: str = "data.eval_map_file") -> list[Map]:
        return load_map_file(path, what)
