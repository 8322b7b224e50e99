"""Bernoulli multi-armed bandits (as in DPT, Lee et al. 2023, and Algorithm Distillation): a task
is ``arms`` arm means; an *episode* is one pull (one observation, the same every time; one action,
the arm; reward 1 with the arm's mean as probability, else 0), so a trial of the evaluation
protocol is a run of pulls and the context is the history of pulls and rewards.

DPT (jon--lee/decision-pretrained-transformer, ``envs/bandit_env.py``) draws each arm's mean
uniformly in [0, 1] (its Bernoulli variant: Beta(1, 1)); here the training and held-out means are
drawn the same way. Out of distribution: near-tied arms, every mean uniform in
``[0.5 - ood_spread, 0.5 + ood_spread]``, harder to tell apart. A task is written as its means,
one string per arm (``"0.731"``), so tasks are hashable and go into the dataset and the report as
they are.

Baselines beside the family-independent ones: ``ucb1`` (Auer et al. 2002: the mean plus
``sqrt(2 ln t / n)``, every arm once first), ``thompson`` (Thompson sampling with a Beta(1, 1)
prior per arm) and ``greedy`` (the best empirical mean, every arm once first); the ``oracle``
pulls the best arm. The report adds each agent's cumulative regret per pull (the best arm's mean
minus the reward, summed over pulls).

``outcome_observation``: the observation after a pull is the pull's outcome, arm and reward in one
token (``1 + 2 * arm + reward``; the observation a pull is chosen at stays 0). In the plain layout
the arm word and the reward token sit at different positions, and a model must first bind the two
before it can count rewards per arm; DPT puts each transition's action and reward into one input
vector for the same reason. The tabular baselines never see the outcome observation (a pull ends
the episode there), so their numbers do not change.
"""

from __future__ import annotations

import math
import zlib

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from icrl_lightning.checks import InputError, check_range
from icrl_lightning.envs.family import ProblemFamily, Task, TaskSplits

ENV_ID = "icrl_lightning/BernoulliBandit-v0"
ARM_WORDS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
RESERVED_EVAL_TASKS = 200


def arm_means(task: Task) -> np.ndarray:
    """The means of a task (``InputError`` unless every entry is a number in [0, 1])."""
    try:
        means = np.array([float(m) for m in task])
    except (TypeError, ValueError):
        raise InputError(f"a bandit task is a list of arm means (numbers in [0, 1]), got {list(task)!r}") from None
    if len(means) < 2 or not ((means >= 0) & (means <= 1)).all():
        raise InputError(f"a bandit task is at least two arm means in [0, 1], got {list(task)!r}")
    return means


def outcome_code(arm: int, reward: float) -> int:
    """The observation after a pull with ``outcome_observation``: ``1 + 2 * arm + reward``."""
    return 1 + 2 * int(arm) + int(reward > 0)


class BernoulliBanditEnv(gym.Env):
    """One pull per episode: observation 0, action = arm, reward ~ Bernoulli(mean of the arm),
    terminated. The observation after the pull is 0, or with ``outcome_observation`` the pull's
    ``outcome_code``. The reward draw comes from the environment's own generator, seeded by
    ``reset``."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task, outcome_observation: bool = False):
        self.means = arm_means(tuple(task))
        self.outcome_observation = outcome_observation
        self.observation_space = spaces.Discrete(1 + 2 * len(self.means) if outcome_observation else 1)
        self.action_space = spaces.Discrete(len(self.means))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return 0, {}

    def step(self, action: int):
        reward = float(self.np_random.random() < self.means[int(action)])
        return (outcome_code(action, reward) if self.outcome_observation else 0), reward, True, False, {}


gym.register(id=ENV_ID, entry_point=BernoulliBanditEnv, disable_env_checker=True)


def _task(means: np.ndarray) -> Task:
    return tuple(f"{m:.3f}" for m in means)


class _EmpiricalArms:
    """Pull counts and reward sums per arm; ``untried`` arms first (lowest index)."""

    def __init__(self, arms: int):
        self.n = np.zeros(arms)
        self.s = np.zeros(arms)

    def update(self, obs: int, action: int, reward: float, next_obs: int, terminated: bool) -> None:
        self.n[action] += 1
        self.s[action] += reward

    def untried(self) -> int | None:
        zero = np.flatnonzero(self.n == 0)
        return int(zero[0]) if len(zero) else None


class Greedy(_EmpiricalArms):
    """Every arm once, then the best empirical mean (ties: the lowest index)."""

    def greedy(self, obs: int) -> int:
        first = self.untried()
        return first if first is not None else int(np.argmax(self.s / self.n))


class UCB1(_EmpiricalArms):
    """Every arm once, then ``argmax mean + sqrt(2 ln t / n)`` (Auer, Cesa-Bianchi and Fischer 2002)."""

    def greedy(self, obs: int) -> int:
        first = self.untried()
        if first is not None:
            return first
        t = self.n.sum()
        return int(np.argmax(self.s / self.n + np.sqrt(2 * math.log(t) / self.n)))


class Thompson(_EmpiricalArms):
    """Thompson sampling with a Beta(1, 1) prior per arm: pull the arm whose posterior draw is highest."""

    def __init__(self, arms: int, rng: np.random.Generator):
        super().__init__(arms)
        self.rng = rng

    def greedy(self, obs: int) -> int:
        return int(np.argmax(self.rng.beta(1 + self.s, 1 + self.n - self.s)))


class BernoulliBandit(ProblemFamily):
    """Bernoulli bandits of ``arms`` arms; one pull per episode (see the module docstring).

    Args:
        arms: arms per task (DPT: 5); the action words are ``A``, ``B``, ...
        ood_spread: the out-of-distribution tasks' means lie in ``0.5 +- ood_spread``.
        outcome_observation: the observation after a pull is its outcome, arm and reward in one
            token (see the module docstring); ``false`` (default) = DPT's and AD's layout of one
            fixed observation. Needs ``model.backbone.max_tiles`` >= ``1 + 2 * arms``.
    """

    reward_values = (1.0,)
    max_episode_steps = 1
    rewards_per_episode = 1
    baselines = ("ucb1", "thompson", "greedy")

    def __init__(self, arms: int = 5, ood_spread: float = 0.1, outcome_observation: bool = False):
        check_range("data.env.arms", arms, 2, len(ARM_WORDS))
        check_range("data.env.ood_spread", ood_spread, 0, 0.5, lo_open=True)
        self.arms, self.ood_spread, self.outcome_observation = arms, ood_spread, bool(outcome_observation)
        self.actions = ARM_WORDS[:arms]

    def settings(self) -> dict:
        out = {"family": "bernoulli_bandit", "arms": self.arms, "ood_spread": self.ood_spread}
        if self.outcome_observation:  # only when on, so the datasets of before keep their settings
            out["outcome_observation"] = True
        return out

    def _draw(self, n: int, seed, lo: float, hi: float, exclude: frozenset = frozenset()) -> list[Task]:
        rng, out, seen = np.random.default_rng(seed), [], set(exclude)
        while len(out) < n:
            t = _task(rng.uniform(lo, hi, self.arms))
            if t not in seen:
                seen.add(t)
                out.append(t)
        return out

    def splits(self, seed: int, n_train: int, split_seed: int | None = None) -> TaskSplits:
        """Held-out (means uniform in [0, 1]) and OOD (near-tied) tasks from ``split_seed``, 200 of
        each reserved first; the ``n_train`` training tasks from ``seed`` exclude both."""
        split_seed = seed if split_seed is None else split_seed
        heldout = self._draw(RESERVED_EVAL_TASKS, [split_seed, 1], 0.0, 1.0)
        ood = self._draw(RESERVED_EVAL_TASKS, [split_seed, 2], 0.5 - self.ood_spread, 0.5 + self.ood_spread)
        train = self._draw(n_train, [seed, 0], 0.0, 1.0, exclude=frozenset(heldout) | frozenset(ood))
        return TaskSplits(train=train, heldout=heldout, ood=ood)

    def make_env(self, task: Task, max_episode_steps: int | None = None) -> gym.Env:
        # No time limit wrapper: a pull ends the episode by itself (terminated, never truncated).
        return gym.make(ENV_ID, task=tuple(task), outcome_observation=self.outcome_observation)

    def n_observations(self, task: Task) -> int:
        return 1 + 2 * self.arms if self.outcome_observation else 1

    def largest_observations(self, split: str) -> int:
        return 1 + 2 * self.arms if self.outcome_observation else 1

    def optimal_actions(self, task: Task) -> np.ndarray:
        """The best arm, the same at every observation (a pull is always chosen at observation 0)."""
        means = arm_means(tuple(task))
        return np.repeat((means == means.max())[None, :], self.n_observations(task), axis=0)

    def schedule(self) -> list[float]:
        """100 pulls, every one the agent's own choice (no forced exploration: the learner must
        explore in context, as UCB1 and Thompson sampling do)."""
        return [1.0] * 100

    def best_expected_return(self, task: Task) -> float:
        return float(arm_means(tuple(task)).max())

    def baseline_learner(self, name: str, task: Task, rng: np.random.Generator):
        """The learner of a bandit baseline (``greedy(obs)`` picks, ``update(...)`` learns)."""
        if name == "ucb1":
            return UCB1(self.arms)
        if name == "thompson":
            # Its own posterior draws (seeded by the task), so the trial's generator gives the same
            # reward draws as to every other agent.
            return Thompson(self.arms, np.random.default_rng([zlib.crc32(",".join(task).encode()), 7]))
        if name == "greedy":
            return Greedy(self.arms)
        raise ValueError(f"baseline {name!r}: the bandit family has {self.baselines}")
