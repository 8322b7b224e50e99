"""Dark Key-to-Door (Algorithm Distillation, Laskin et al. 2022; AD-eps, Zisman et al. 2024): Dark
Room with two hidden cells, a key and a door. The first step onto the key picks it up (reward 1);
every step on the door while holding the key gives reward 1; the episode runs to a fixed horizon (no
termination), so a good policy walks to the key, then to the door, and stays there.

As AD-eps's ``DarkKeyToDoor`` (corl-team/ad-eps, ``dark_room/envs/dark_key_to_door.py``: 9 x 9
cells, rewards as above, ``terminate_after_unlock`` off) with three differences, each so that the
family fits the tabular baselines and the oracle of the interface: the agent starts in the centre
(AD-eps: a uniformly random cell each episode); the observation is the cell *and* whether the key is
held (``cell + size**2`` once it is; AD-eps: the cell only), so an optimal action is a function of
the observation; and key and door are distinct cells. Actions as in ``dark_room`` (left, down,
right, up, stay). Horizon 50 (Algorithm Distillation's Key-to-Door episodes).

A task is written as ``size`` row strings of ``F`` with one ``K`` (the key) and one ``D`` (the
door). Splits: every ordered (key, door) pair of the room, permuted by the split seed; the first
``heldout_tasks`` are held out and the training tasks are drawn from the rest; out of distribution:
pairs of a larger room.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from icrl_lightning.checks import InputError, check_range
from icrl_lightning.envs.dark_room import ACTIONS, mark_toward, move
from icrl_lightning.envs.family import ProblemFamily, Task, TaskSplits, fork_rebinding_env

ENV_ID = "icrl_lightning/DarkKeyToDoor-v0"
RESERVED_OOD_TASKS = 200


def key_door_task(size: int, key: int, door: int) -> Task:
    """The task of the ``size`` x ``size`` room with its key at cell ``key`` and its door at ``door``."""
    return tuple("".join("K" if r * size + c == key else "D" if r * size + c == door else "F" for c in range(size))
                 for r in range(size))


def task_cells(task: Task) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """``(size, key (row, col), door (row, col))`` of a task (``InputError`` unless it is a square
    room of ``F`` with exactly one ``K`` and one ``D``)."""
    size = len(task)
    text = "".join(task)
    if (size < 2 or any(len(r) != size for r in task) or set(text) - {"F", "K", "D"}
            or text.count("K") != 1 or text.count("D") != 1):
        raise InputError("a Dark Key-to-Door task is a square of 'F' rows with one 'K' (the key) and one 'D' "
                         f"(the door), got {list(task)!r}")
    k, d = text.index("K"), text.index("D")
    return size, divmod(k, size), divmod(d, size)


class DarkKeyToDoorEnv(gym.Env):
    """gymnasium environment of one Dark Key-to-Door task (see the module docstring); the time
    limit is gymnasium's ``TimeLimit`` wrapper."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task):
        self.size, self.key, self.door = task_cells(tuple(task))
        self.start = (self.size // 2, self.size // 2)
        self.observation_space = spaces.Discrete(2 * self.size * self.size)
        self.action_space = spaces.Discrete(len(ACTIONS))
        self.pos, self.has_key = self.start, False

    def _obs(self) -> int:
        return self.pos[0] * self.size + self.pos[1] + (self.size * self.size if self.has_key else 0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.pos, self.has_key = self.start, False
        return self._obs(), {}

    def step(self, action: int):
        self.pos = move(self.pos, action, self.size)
        reward = 0.0
        if self.pos == self.key and not self.has_key:
            self.has_key, reward = True, 1.0
        elif self.pos == self.door and self.has_key:
            reward = 1.0
        return self._obs(), reward, False, False, {}


gym.register(id=ENV_ID, entry_point=DarkKeyToDoorEnv, disable_env_checker=True)


class DarkKeyToDoor(ProblemFamily):
    """The Dark Key-to-Door family: (key, door) cell pairs of a ``size`` x ``size`` room.

    Args:
        size: the room's side in cells (AD / AD-eps: 9).
        heldout_tasks: how many (key, door) pairs are held out for evaluation (never trained on).
        ood_size: side of the out-of-distribution room (200 of its pairs are the OOD tasks;
            observations run up to ``2 * ood_size ** 2 - 1``, so ``model.backbone.max_tiles`` must
            cover them).
        horizon: every episode's length (Algorithm Distillation: 50); episodes never end earlier.
    """

    actions = ACTIONS
    reward_values = (1.0,)
    rewards_per_episode = None  # the key, then every step on the door

    def __init__(self, size: int = 9, heldout_tasks: int = 200, ood_size: int = 11, horizon: int = 50):
        check_range("data.env.size", size, 2, None, why="a room is at least 2 x 2 cells")
        pairs = size * size * (size * size - 1)
        check_range("data.env.heldout_tasks", heldout_tasks, 1, pairs - 1,
                    why=f"the {size} x {size} room has {pairs} (key, door) pairs and at least one trains")
        check_range("data.env.ood_size", ood_size, size + 1, None, why="larger than data.env.size")
        check_range("data.env.horizon", horizon, 1, None)
        self.size, self.heldout_tasks, self.ood_size, self.horizon = size, heldout_tasks, ood_size, horizon

    @property
    def max_episode_steps(self) -> int:
        return self.horizon

    def settings(self) -> dict:
        return {"family": "dark_key_to_door", "size": self.size, "heldout_tasks": self.heldout_tasks,
                "ood_size": self.ood_size, "horizon": self.horizon}

    @staticmethod
    def _pairs(size: int, rng: np.random.Generator) -> np.ndarray:
        cells = size * size
        pairs = np.array([(k, d) for k in range(cells) for d in range(cells) if k != d])
        return pairs[rng.permutation(len(pairs))]

    def splits(self, seed: int, n_train: int, split_seed: int | None = None) -> TaskSplits:
        """Every (key, door) pair permuted by ``split_seed`` (default ``seed``): the first
        ``heldout_tasks`` held out, the ``n_train`` training tasks the first of the rest in an order
        drawn from ``seed``. OOD: 200 pairs of the larger room. The splits share no task (different
        pairs, or a different room size)."""
        split_seed = seed if split_seed is None else split_seed
        pairs = self._pairs(self.size, np.random.default_rng([split_seed, 1]))
        check_range("data.num_train_maps", n_train, 0, len(pairs) - self.heldout_tasks,
                    why=f"the room has {len(pairs)} (key, door) pairs, data.env.heldout_tasks="
                        f"{self.heldout_tasks} of them held out")
        heldout, rest = pairs[: self.heldout_tasks], pairs[self.heldout_tasks:]
        train = rest[np.random.default_rng([seed, 0]).permutation(len(rest))[:n_train]]
        ood = self._pairs(self.ood_size, np.random.default_rng([split_seed, 2]))[:RESERVED_OOD_TASKS]
        return TaskSplits(train=[key_door_task(self.size, int(k), int(d)) for k, d in train],
                          heldout=[key_door_task(self.size, int(k), int(d)) for k, d in heldout],
                          ood=[key_door_task(self.ood_size, int(k), int(d)) for k, d in ood])

    def make_env(self, task: Task, max_episode_steps: int | None = None) -> gym.Env:
        return gym.make(ENV_ID, task=tuple(task), max_episode_steps=max_episode_steps or self.max_episode_steps)

    def fork_env(self, env: gym.Env) -> gym.Env:
        """The environment's ``step`` rebinds ``pos`` and ``has_key`` only."""
        return fork_rebinding_env(env)

    def n_observations(self, task: Task) -> int:
        return 2 * len(task) * len(task)

    def largest_observations(self, split: str) -> int:
        side = self.ood_size if split == "ood" else self.size
        return 2 * side * side

    def optimal_actions(self, task: Task) -> np.ndarray:
        """Without the key, the moves that shorten the (Manhattan) way to the key (on it: stay, which
        picks it up); with the key, those toward the door (on it: stay)."""
        size, key, door = task_cells(tuple(task))
        best = np.zeros((2 * size * size, len(ACTIONS)), dtype=bool)
        for r in range(size):
            for c in range(size):
                mark_toward(best[r * size + c], r, c, key)
                mark_toward(best[size * size + r * size + c], r, c, door)
        return best
