"""The problem-family interface: what the framework needs from a family of tasks (SPEC's
"parametric game"), so that the data side, the serializer, the agent and the evaluation never name
a game. Choosing a family is one config key, ``data.env`` (a class path; the model's copy is linked
to it); adding one is a subclass of ``ProblemFamily`` in a new file under ``icrl_lightning/envs/``
plus a YAML.

A *task* is one member of the family (a Frozen Lake map, a Dark Room goal), written as a tuple of
strings: hashable, JSON-able, and stored as it is in the dataset's shards and manifest and in the
evaluation report. Observations and actions are small integers (gymnasium ``Discrete`` spaces):
the serializer writes observation ``i`` as tile token ``i`` and action ``a`` as
``ProblemFamily.actions[a]``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from icrl_lightning.checks import InputError

Task = tuple[str, ...]


def copy_generator(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator in ``rng``'s state (a third of ``copy.deepcopy``'s cost)."""
    twin = np.random.Generator(type(rng.bit_generator)())
    twin.bit_generator.state = rng.bit_generator.state
    return twin


def fork_rebinding_env(env: gym.Env) -> gym.Env:
    """``ProblemFamily.fork_env`` for an environment whose ``step`` rebinds its state attributes and
    changes nothing in place (Frozen Lake's ``s``, Dark Room's ``pos``): shallow copies of each
    wrapper and of the environment, with its own copy of the random generator. A fraction of a deep
    copy's cost, which also copies constant tables (Frozen Lake's transitions)."""
    twin = copy.copy(env)
    if isinstance(env, gym.Wrapper):
        twin.env = fork_rebinding_env(env.env)
    elif env._np_random is not None:
        twin._np_random = copy_generator(env._np_random)
    return twin


def paper_schedule() -> list[float]:
    """The evaluation protocol's greedy probability per episode (SPEC): 0.0, 0.1, ..., 0.9 for two
    episodes each, then 1.0 for 10."""
    return [round(p / 10, 1) for p in range(10) for _ in range(2)] + [1.0] * 10


@dataclass(frozen=True)
class TaskSplits:
    """Training, held-out (same distribution) and out-of-distribution tasks, disjoint by construction."""

    train: list[Task]
    heldout: list[Task]
    ood: list[Task]


class ProblemFamily:
    """A family of tasks. A subclass stores each ``__init__`` argument as an attribute of the same
    name (checkpoints and datasets save them) and sets:

    * ``actions``: the action words, in the environment's action order (each one token of the
      serializer's format);
    * ``reward_values``: the nonzero rewards an episode can give (the serializer's vocabulary);
    * ``max_episode_steps``: every episode's time limit;
    * ``rewards_per_episode``: the most nonzero rewards one episode can hold (``None``: one at every
      step), which bounds an episode's length in tokens;

    and implements ``settings``, ``splits``, ``make_env``, ``n_observations``,
    ``largest_observations`` and ``optimal_actions``. The evaluation's baselines (uniform random,
    tabular Q-learning from zero and optimistic values, the oracle) and the default behaviour
    learner (tabular Q-learning) are built from these alone. A family may add its own baselines
    (``baselines`` names them, ``baseline_learner`` builds each), its own default evaluation
    schedule (``schedule``) and the best expected return of a task (``best_expected_return``: the
    report then shows each agent's cumulative regret)."""

    actions: tuple[str, ...] = ()
    reward_values: tuple[float, ...] = (1.0,)
    max_episode_steps: int = 100
    rewards_per_episode: int | None = 1
    baselines: tuple[str, ...] = ()

    @property
    def n_actions(self) -> int:
        return len(self.actions)

    def settings(self) -> dict:
        """Everything that decides the family's tasks and episodes (part of the dataset's key)."""
        raise NotImplementedError

    def splits(self, seed: int, n_train: int, split_seed: int | None = None) -> TaskSplits:
        """Deterministic splits: ``n_train`` training tasks from ``seed``; the held-out and OOD tasks
        from ``split_seed`` (default ``seed``), never among the training tasks."""
        raise NotImplementedError

    def make_env(self, task: Task, max_episode_steps: int | None = None) -> gym.Env:
        """A gymnasium environment playing ``task`` (time limit: ``max_episode_steps``, default the
        family's)."""
        raise NotImplementedError

    def n_observations(self, task: Task) -> int:
        """Observations of ``task`` (observation ids are ``0 .. n - 1``): a tabular learner's table size."""
        raise NotImplementedError

    def largest_observations(self, split: str) -> int:
        """The most observations a task of ``split`` (``train``, ``heldout`` or ``ood``) can have."""
        raise NotImplementedError

    def optimal_actions(self, task: Task) -> np.ndarray:
        """``[n_observations, n_actions]`` bool: the actions an optimal policy may take from each
        observation (a row with none: no action helps there). The oracle takes the first."""
        raise NotImplementedError

    def oracle_actions(self, task: Task) -> np.ndarray:
        """Per observation, the oracle's action: the first optimal one (0 where none is)."""
        best = self.optimal_actions(task)
        return np.where(best.any(axis=1), best.argmax(axis=1), 0)

    def fork_env(self, env: gym.Env) -> gym.Env:
        """An independent copy of a running environment of this family (its state and random
        generator): the in-context agent steps the copy to draft moves it then checks against the
        model. Default ``copy.deepcopy``; a family whose environments hold large constant tables
        may share them."""
        return copy.deepcopy(env)

    def schedule(self) -> list[float]:
        """The evaluation's default greedy probability per episode of a trial (SPEC's protocol)."""
        return paper_schedule()

    def best_expected_return(self, task: Task) -> float | None:
        """The expected return of an optimal episode on ``task`` when the report should show regret
        against it (bandits); ``None`` (default): no regret."""
        return None

    def baseline_learner(self, name: str, task: Task, rng: np.random.Generator):
        """The learner of the family's own baseline ``name`` (one of ``baselines``): an object with
        ``greedy(obs) -> action`` and ``update(obs, action, reward, next_obs, terminated)``."""
        raise ValueError(f"baseline {name!r}: the {type(self).__name__} family has none of its own")

    def load_task_file(self, path: str, what: str = "data.eval_map_file") -> list[Task]:
        """The user's own evaluation tasks from a file (a family without a file format refuses)."""
        raise InputError(f"{what}: the {type(self).__name__} family reads no task files")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"
