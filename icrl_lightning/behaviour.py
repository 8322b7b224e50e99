"""Conventional RL learners that generate the offline data (SPEC "Training data").

The tabular Q-learner is also the evaluation baseline that learns from scratch with the same
episode budget and exploration schedule as the in-context agent.
"""

from __future__ import annotations

import numpy as np

from icrl_lightning.envs.frozen_lake import Map, make_env
from icrl_lightning.episodes import Episode


class TabularQLearner:
    """Q-learning on a table of ``n_states x 4``; ties between best actions break at random so
    that an untrained table walks randomly instead of always going left.

    ``q_init`` is every entry's initial value. With 0 (rewards are 0 or 1) a move into a hole keeps
    the value of an untried move, so the greedy learner walks into the same hole again; with an
    optimistic value such as 1 an untried move beats every tried one that did not lead towards a
    goal, so the learner tries new moves instead of walking into the same hole again (with
    ``lr=1``, never again) and finds a goal systematically (optimistic initial values, Sutton &
    Barto 2.6)."""

    def __init__(self, n_states: int, lr: float = 0.5, gamma: float = 0.9, rng: np.random.Generator | None = None,
                 q_init: float = 0.0):
        self.q = np.full((n_states, 4), float(q_init))
        self.lr, self.gamma = lr, gamma
        self.rng = rng if rng is not None else np.random.default_rng()

    def greedy(self, obs: int) -> int:
        row = self.q[obs]
        return int(self.rng.choice(np.flatnonzero(row == row.max())))

    def update(self, obs: int, action: int, reward: float, next_obs: int, terminated: bool) -> None:
        target = reward + (0.0 if terminated else self.gamma * self.q[next_obs].max())
        self.q[obs, action] += self.lr * (target - self.q[obs, action])


def play_episode(env, choose, rng: np.random.Generator, learner: TabularQLearner | None = None) -> dict:
    """Play one episode; ``choose(obs)`` picks the action. Returns the raw record."""
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
    return {"observations": observations, "actions": actions, "rewards": rewards,
            "terminated": bool(terminated), "truncated": bool(truncated)}


def q_learning_run(
    rows: Map,
    map_id: int,
    episodes: int,
    seed: int | list[int],
    epsilon: float = 0.1,
    lr: float = 0.5,
    gamma: float = 0.9,
    max_episode_steps: int = 100,
    q_init: float = 0.0,
    schedule: list[float] | None = None,
    sample_schedule: bool = False,
) -> list[Episode]:
    """Epsilon-greedy Q-learning on one map; every episode it plays is kept.

    Without ``schedule``: one run of ``episodes`` episodes, a random action with probability
    ``epsilon``. With ``schedule`` (greedy probability per episode, as the evaluation protocol):
    consecutive *trials* of ``len(schedule)`` episodes, each with a fresh learner, episode ``k`` of
    a trial greedy with probability ``schedule[k]`` (``epsilon`` is then unused); the last trial
    is cut short when ``episodes`` is not a multiple of the trial length. With ``schedule`` and
    ``sample_schedule``: one run (one learner), each episode greedy with a probability drawn
    uniformly from ``schedule``'s entries, so a learner that has found the goal keeps playing
    both greedy episodes and the random walks of the schedule's first entries.
    """
    rng = np.random.default_rng(seed)
    env = make_env(rows, max_episode_steps)
    n_states = len(rows) * len(rows[0])
    trial = len(schedule) if schedule and not sample_schedule else episodes

    def choose(obs: int) -> int:
        return int(rng.integers(4)) if rng.random() < p_random else learner.greedy(obs)

    out = []
    for k in range(episodes):
        if k % trial == 0:
            learner = TabularQLearner(n_states, lr=lr, gamma=gamma, rng=rng, q_init=q_init)
        if schedule:
            p_random = 1.0 - (schedule[int(rng.integers(len(schedule)))] if sample_schedule else schedule[k % trial])
        else:
            p_random = epsilon
        rec = play_episode(env, choose, rng, learner)
        out.append(Episode(map_id=map_id, map_rows=tuple(rows), learner_episode=k, **rec))
    env.close()
    return out
