"""Dark Room (Algorithm Distillation, Laskin et al. 2022; AD-eps, Zisman et al. 2024): an empty
square room; the agent sees only its own cell and starts in the centre; the task is a hidden goal
cell; every step that ends on the goal gives reward 1 and the episode goes on to a fixed horizon
(no termination), so a good policy walks to the goal and stays there.

As in AD-eps's ``DarkRoom-v0`` (corl-team/ad-eps, ``dark_room/envs/darkroom.py``): 9 x 9 cells,
observation ``row * size + col``, start ``(4, 4)``, horizon 20, the 81 goal cells permuted by a
seed and split 65 for training / 16 held out. Actions here keep Frozen Lake's order of the four
moves and add the no-op last: 0 left, 1 down, 2 right, 3 up, 4 stay (AD-eps numbers them 0 noop,
1 up, 2 right, 3 down, 4 left). Out of distribution: every goal cell of a larger room
(``ood_size``), same start rule (the centre) and horizon.

A task is written like a Frozen Lake map: ``size`` row strings of ``F`` with one ``G`` (the goal);
the start is always the centre cell and is not marked (the goal may be the centre itself).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from icrl_lightning.checks import InputError, check_range
from icrl_lightning.envs.family import ProblemFamily, Task, TaskSplits, fork_rebinding_env

ACTIONS = ("left", "down", "right", "up", "stay")
_MOVES = ((0, -1), (1, 0), (0, 1), (-1, 0), (0, 0))
ENV_ID = "icrl_lightning/DarkRoom-v0"


def move(pos: tuple[int, int], action: int, size: int) -> tuple[int, int]:
    """The cell ``action`` leads to from ``pos`` in a ``size`` x ``size`` room (walls clip)."""
    dr, dc = _MOVES[int(action)]
    return min(max(pos[0] + dr, 0), size - 1), min(max(pos[1] + dc, 0), size - 1)


def mark_toward(best: np.ndarray, r: int, c: int, target: tuple[int, int]) -> None:
    """Mark in ``best`` (one observation's row of actions) the moves from ``(r, c)`` that shorten
    the (Manhattan) way to ``target``, or ``stay`` on it."""
    tr, tc = target
    if (r, c) == (tr, tc):
        best[4] = True
        return
    best[0], best[2] = c > tc, c < tc
    best[1], best[3] = r < tr, r > tr


def room_task(size: int, goal: int) -> Task:
    """The task of the ``size`` x ``size`` room with its goal at cell ``goal`` (``row * size + col``)."""
    return tuple("".join("G" if r * size + c == goal else "F" for c in range(size)) for r in range(size))


def task_goal(task: Task) -> tuple[int, int, int]:
    """``(size, goal row, goal col)`` of a task (``InputError`` unless it is a square room of ``F``
    with exactly one ``G``)."""
    size = len(task)
    text = "".join(task)
    if size < 1 or any(len(r) != size for r in task) or set(text) - {"F", "G"} or text.count("G") != 1:
        raise InputError(f"a Dark Room task is a square of 'F' rows with one 'G' (the goal), got {list(task)!r}")
    g = text.index("G")
    return size, g // size, g % size


class DarkRoomEnv(gym.Env):
    """gymnasium environment of one Dark Room task (see the module docstring); the time limit is
    gymnasium's ``TimeLimit`` wrapper (``gymnasium.make(ENV_ID, task=..., max_episode_steps=...)``)."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task):
        self.size, gr, gc = task_goal(tuple(task))
        self.goal = (gr, gc)
        self.start = (self.size // 2, self.size // 2)
        self.observation_space = spaces.Discrete(self.size * self.size)
        self.action_space = spaces.Discrete(len(ACTIONS))
        self.pos = self.start

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.pos = self.start
        return self.pos[0] * self.size + self.pos[1], {}

    def step(self, action: int):
        self.pos = r, c = move(self.pos, action, self.size)
        reward = 1.0 if self.pos == self.goal else 0.0
        return r * self.size + c, reward, False, False, {}


gym.register(id=ENV_ID, entry_point=DarkRoomEnv, disable_env_checker=True)


class DarkRoom(ProblemFamily):
    """The Dark Room family: goal cells of a ``size`` x ``size`` room (AD-eps's ``DarkRoom-v0``).

    Args:
        size: the room's side in cells (AD / AD-eps: 9).
        train_goals: how many of the room's ``size * size`` goal cells are training tasks; the rest
            are the held-out tasks (AD-eps: 65 of 81, so 16 held out).
        ood_size: side of the out-of-distribution room (every one of its goal cells is an OOD task;
            tile ids run up to ``ood_size ** 2 - 1``, so ``model.backbone.max_tiles`` must cover them).
        horizon: every episode's length (AD-eps: 20); episodes never end earlier. (Named apart
            from Frozen Lake's ``max_episode_steps``, so that choosing this class on the command
            line does not carry Frozen Lake's value over.)
    """

    actions = ACTIONS
    reward_values = (1.0,)
    rewards_per_episode = None  # every step on the goal is rewarded

    def __init__(self, size: int = 9, train_goals: int = 65, ood_size: int = 11, horizon: int = 20):
        check_range("data.env.size", size, 2, None, why="a room is at least 2 x 2 cells")
        check_range("data.env.train_goals", train_goals, 1, size * size - 1,
                    why=f"the {size} x {size} room has {size * size} goal cells and at least one is held out")
        check_range("data.env.ood_size", ood_size, size + 1, None, why="larger than data.env.size")
        check_range("data.env.horizon", horizon, 1, None)
        self.size, self.train_goals, self.ood_size, self.horizon = size, train_goals, ood_size, horizon

    @property
    def max_episode_steps(self) -> int:
        return self.horizon

    def settings(self) -> dict:
        return {"family": "dark_room", "size": self.size, "train_goals": self.train_goals,
                "ood_size": self.ood_size, "horizon": self.horizon}

    def splits(self, seed: int, n_train: int, split_seed: int | None = None) -> TaskSplits:
        """The room's goal cells permuted by ``split_seed`` (default ``seed``): the first
        ``train_goals`` are the training goals, the rest held out; the ``n_train`` training tasks
        are the first of the training goals in an order drawn from ``seed``. OOD: every goal of the
        larger room, permuted by ``split_seed``. The splits share no task (different cells, or a
        different room size)."""
        split_seed = seed if split_seed is None else split_seed
        check_range("data.num_train_maps", n_train, 0, self.train_goals,
                    why=f"the Dark Room has data.env.train_goals={self.train_goals} training goals")
        cells = np.random.default_rng([split_seed, 1]).permutation(self.size * self.size)
        train_cells, heldout_cells = cells[: self.train_goals], cells[self.train_goals:]
        order = np.random.default_rng([seed, 0]).permutation(train_cells)[:n_train]
        ood_cells = np.random.default_rng([split_seed, 2]).permutation(self.ood_size * self.ood_size)
        return TaskSplits(train=[room_task(self.size, int(g)) for g in order],
                          heldout=[room_task(self.size, int(g)) for g in heldout_cells],
                          ood=[room_task(self.ood_size, int(g)) for g in ood_cells])

    def make_env(self, task: Task, max_episode_steps: int | None = None) -> gym.Env:
        return gym.make(ENV_ID, task=tuple(task), max_episode_steps=max_episode_steps or self.max_episode_steps)

    def fork_env(self, env: gym.Env) -> gym.Env:
        """The environment's ``step`` rebinds ``pos`` only."""
        return fork_rebinding_env(env)

    def n_observations(self, task: Task) -> int:
        return len(task) * len(task)

    def largest_observations(self, split: str) -> int:
        side = self.ood_size if split == "ood" else self.size
        return side * side

    def optimal_actions(self, task: Task) -> np.ndarray:
        """From each cell the moves that shorten the (Manhattan) way to the goal; on the goal, stay."""
        size, gr, gc = task_goal(tuple(task))
        best = np.zeros((size * size, len(ACTIONS)), dtype=bool)
        for r in range(size):
            for c in range(size):
                mark_toward(best[r * size + c], r, c, (gr, gc))
        return best
