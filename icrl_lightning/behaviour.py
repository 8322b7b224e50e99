"""Conventional RL learners that generate the offline data (SPEC "Training data").

The tabular Q-learner is also the evaluation baseline that learns from scratch with the same
episode budget and exploration schedule as the in-context agent.
"""

from __future__ import annotations

import numpy as np

from icrl_lightning.checks import check_range
from icrl_lightning.envs.family import ProblemFamily, Task
from icrl_lightning.envs.frozen_lake import FrozenLake
from icrl_lightning.episodes import Episode


class TabularQLearner:
    """Q-learning on a table of ``n_states x n_actions``; ties between best actions break at random so
    that an untrained table walks randomly instead of always going left.

    ``q_init`` is every entry's initial value. With 0 (rewards are 0 or 1) a move into a hole keeps
    the value of an untried move, so the greedy learner walks into the same hole again; with an
    optimistic value such as 1 an untried move beats every tried one that did not lead towards a
    goal, so the learner tries new moves instead (with ``lr=1``, never the same hole again) and
    finds a goal systematically (optimistic initial values, Sutton & Barto 2.6)."""

    def __init__(self, n_states: int, lr: float = 0.5, gamma: float = 0.9, rng: np.random.Generator | None = None,
                 q_init: float = 0.0, n_actions: int = 4):
        self.q = np.full((n_states, n_actions), float(q_init))
        self.lr, self.gamma = lr, gamma
        self.rng = rng if rng is not None else np.random.default_rng()

    def greedy(self, obs: int) -> int:
        row = self.q[obs]
        return int(self.rng.choice(np.flatnonzero(row == row.max())))

    def update(self, obs: int, action: int, reward: float, next_obs: int, terminated: bool) -> None:
        target = reward + (0.0 if terminated else self.gamma * self.q[next_obs].max())
        self.q[obs, action] += self.lr * (target - self.q[obs, action])


def play_episode(env, choose, rng: np.random.Generator, learner: TabularQLearner | None = None,
                 **fields) -> Episode:
    """Play one episode; ``choose(obs)`` picks the action, ``learner`` (if any) learns from every
    step. ``fields`` (``map_id``, ``map_rows``, ``learner_episode``) go into the record."""
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    observations, actions, rewards = [int(obs)], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        action = choose(int(obs))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        if learner is not None:
            learner.update(int(obs), action, float(reward), int(next_obs), terminated)
        observations.append(int(next_obs))
        actions.append(int(action))
        rewards.append(float(reward))
        obs = next_obs
    return Episode(observations, actions, rewards, bool(terminated), bool(truncated), **fields)


def q_learning_run(
    rows: Task,
    map_id: int,
    episodes: int,
    seed: int | list[int],
    epsilon: float = 0.1,
    lr: float = 0.5,
    gamma: float = 0.9,
    max_episode_steps: int = 100,
    q_init: float = 0.0,
    history: int | None = None,
    env: ProblemFamily | None = None,
) -> list[Episode]:
    """Epsilon-greedy Q-learning on one task (a random action with probability ``epsilon``) for
    ``episodes`` episodes, every episode kept in the order played: one run, or with ``history``
    consecutive runs of that many episodes, each from a fresh table (the last one cut short when
    ``episodes`` is not a multiple). ``env``: the task's family (default Frozen Lake)."""
    family = env or FrozenLake()
    rng = np.random.default_rng(seed)
    game = family.make_env(rows, max_episode_steps)
    n_states, n_actions = family.n_observations(rows), family.n_actions
    every = history or episodes

    def choose(obs: int) -> int:
        return int(rng.integers(n_actions)) if rng.random() < epsilon else learner.greedy(obs)

    out = []
    for k in range(episodes):
        if k % every == 0:
            learner = TabularQLearner(n_states, lr=lr, gamma=gamma, rng=rng, q_init=q_init, n_actions=n_actions)
        out.append(play_episode(game, choose, rng, learner, map_id=map_id, map_rows=tuple(rows), learner_episode=k))
    game.close()
    return out


class Behaviour:
    """What plays the offline data: ``run`` gives one training task's episodes on its family
    ``env``, in the order played; ``settings`` names everything that decides them (it keys the dataset on disk, so a
    changed setting builds a new dataset). Choose one with ``data.behaviour`` (a class path).
    A subclass stores each ``__init__`` argument as an attribute of the same name (checkpoints
    save them). ``history_length``: when the episodes are independent learning histories of that
    many episodes (a fresh learner each), learning-order sets are whole histories."""

    history_length: int | None = None

    def settings(self) -> dict:
        raise NotImplementedError

    def run(self, env: ProblemFamily, task: Task, map_id: int, episodes: int, seed: list[int]) -> list[Episode]:
        """``episodes`` episodes on ``task`` (a member of ``env``, with its time limit), drawn from
        ``default_rng(seed)``; ``map_id`` goes into every record."""
        raise NotImplementedError


class QLearning(Behaviour):
    """The behaviour learner of the offline data: one tabular Q-learning run per training map,
    every episode kept (SPEC "Training data").

    Args:
        epsilon: exploration rate (a uniformly random action with this probability).
        lr: step size.
        gamma: discount.
        q_init: every table entry's initial value. 0 (default) never learns from a hole (its reward
            is 0, like an untried move), so it walks into the same hole again; an optimistic 1.0
            prefers untried moves to a move that ended in a hole and so explores systematically.
        history: ``null`` (default): one run per map. A number: a fresh table every that many
            episodes, so the map's episodes are independent learning histories from scratch, as
            the evaluation's trials are (with ``data.set_order: learning`` a set is one whole
            history, as Algorithm Distillation trains).
    """

    def __init__(self, epsilon: float = 0.1, lr: float = 0.5, gamma: float = 0.9, q_init: float = 0.0,
                 history: int | None = None):
        check_range("data.behaviour.epsilon", epsilon, 0, 1)
        check_range("data.behaviour.lr", lr, 0, 1, lo_open=True)
        check_range("data.behaviour.gamma", gamma, 0, 1)
        check_range("data.behaviour.q_init", q_init, 0, None,
                    why="0 = untried moves look like holes, 1 = optimistic (rewards are 0 or 1)")
        if history is not None:
            check_range("data.behaviour.history", history, 1, None)
        self.epsilon, self.lr, self.gamma, self.q_init, self.history = epsilon, lr, gamma, q_init, history

    @property
    def history_length(self) -> int | None:
        return self.history

    def settings(self) -> dict:
        """What generates the data (part of the dataset's key; the names of the first version)."""
        out = {"learner": "tabular_q", "behaviour_epsilon": self.epsilon, "behaviour_lr": self.lr,
               "behaviour_gamma": self.gamma}
        if self.q_init != 0.0:  # added later: only a non-default value enters the key
            out["behaviour_q_init"] = self.q_init
        if self.history is not None:
            out["behaviour_history"] = self.history
        return out

    def run(self, env: ProblemFamily, task: Task, map_id: int, episodes: int, seed: list[int]) -> list[Episode]:
        return q_learning_run(task, map_id, episodes, seed=seed, epsilon=self.epsilon, lr=self.lr, gamma=self.gamma,
                              max_episode_steps=env.max_episode_steps, q_init=self.q_init, history=self.history,
                              env=env)

    def __repr__(self) -> str:
        return (f"QLearning(epsilon={self.epsilon}, lr={self.lr}, gamma={self.gamma}, q_init={self.q_init}, "
                f"history={self.history})")
