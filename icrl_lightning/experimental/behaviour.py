"""Behaviour learners under study."""

from __future__ import annotations

import numpy as np

from icrl_lightning.behaviour import Behaviour, QLearning, TabularQLearner, play_episode
from icrl_lightning.checks import InputError, check_range
from icrl_lightning.envs.family import ProblemFamily, Task
from icrl_lightning.envs.frozen_lake import FrozenLake
from icrl_lightning.episodes import Episode


class NoisyDemonstrations(Behaviour):
    """Noise-annealed demonstrations (AD-eps, Zisman et al. 2024): synthetic learning histories of
    ``history`` episodes in which the BFS oracle's action is replaced by a uniformly random one with
    a probability falling linearly from 1 at the history's first episode to ``1 - max_perf`` at 90 %
    of it (the authors' schedule, per episode here instead of per step). No learner is trained: the
    history looks like learning, from random exploration to the shortest path. Use with
    ``data.set_order: learning`` (a set is one whole history).

    Args:
        history: episodes per history (a context's worth; the evaluation's trials are 30).
        max_perf: how good the history ends: the final noise is ``1 - max_perf``.
    """

    def __init__(self, history: int = 30, max_perf: float = 1.0):
        check_range("data.behaviour.history", history, 2, None)
        check_range("data.behaviour.max_perf", max_perf, 0, 1)
        self.history, self.max_perf = history, max_perf

    @property
    def history_length(self) -> int:
        return self.history

    def settings(self) -> dict:
        return {"learner": "noisy_oracle", "history": self.history, "max_perf": self.max_perf}

    def noise(self, j: int) -> float:
        """Probability of a random action in episode ``j`` of a history."""
        return max(1.0 - self.max_perf, 1.0 - j / (0.9 * (self.history - 1)))

    def run(self, env: ProblemFamily, task: Task, map_id: int, episodes: int, seed: list[int]) -> list[Episode]:
        rng = np.random.default_rng(seed)
        game = env.make_env(task)
        best = env.optimal_actions(task)  # [observations, actions]: the actions an optimal policy takes
        n_actions = env.n_actions

        def choose(obs: int) -> int:
            if rng.random() < eps or not best[obs].any():
                return int(rng.integers(n_actions))
            return int(rng.choice(np.flatnonzero(best[obs])))

        out = []
        for k in range(episodes):
            eps = self.noise(k % self.history)
            out.append(play_episode(game, choose, rng, map_id=map_id, map_rows=tuple(task), learner_episode=k))
        game.close()
        return out


def with_start(rows: Task, cell: int) -> Task:
    """Frozen Lake map ``rows`` with its start tile(s) made frozen and a single start at ``cell``."""
    width = len(rows[0])
    text = [ch if ch != "S" else "F" for ch in "".join(rows)]
    text[cell] = "S"
    return tuple("".join(text[r * width:(r + 1) * width]) for r in range(len(rows)))


class RandomStarts(QLearning):
    """Frozen Lake's Q-learning (``icrl_lightning.behaviour.QLearning``, one run per map) in which
    a share of the episodes start on a uniformly drawn frozen or start tile instead of the map's
    start(s): a training context then holds paths that begin elsewhere than the episode the model
    acts in, as the stitching scenarios' contexts do (their successful episode starts off the
    trial's way). The table is the map's, so what one start teaches the learner carries to the
    others. Each record's ``map_rows`` is the map as played (its start moved).

    Args:
        start_share: probability that an episode starts on a random tile.
        epsilon, lr, gamma: as ``QLearning``.
    """

    def __init__(self, start_share: float = 0.3, epsilon: float = 0.1, lr: float = 0.5, gamma: float = 0.9):
        super().__init__(epsilon=epsilon, lr=lr, gamma=gamma)
        check_range("data.behaviour.start_share", start_share, 0, 1)
        self.start_share = start_share

    def settings(self) -> dict:
        return {**super().settings(), "learner": "tabular_q_random_starts", "start_share": self.start_share}

    def run(self, env: ProblemFamily, task: Task, map_id: int, episodes: int, seed: list[int]) -> list[Episode]:
        if not isinstance(env, FrozenLake):
            raise InputError(f"data.behaviour RandomStarts moves Frozen Lake's start tile; data.env is "
                             f"{type(env).__name__}")
        rng = np.random.default_rng(seed)
        text = "".join(task)
        cells = [i for i, ch in enumerate(text) if ch in "SF"]
        games: dict[Task, object] = {}
        learner = TabularQLearner(env.n_observations(task), lr=self.lr, gamma=self.gamma, rng=rng,
                                  n_actions=env.n_actions)

        def choose(obs: int) -> int:
            return int(rng.integers(env.n_actions)) if rng.random() < self.epsilon else learner.greedy(obs)

        out = []
        for k in range(episodes):
            rows = with_start(task, int(rng.choice(cells))) if rng.random() < self.start_share else tuple(task)
            if rows not in games:
                games[rows] = env.make_env(rows)
            out.append(play_episode(games[rows], choose, rng, learner, map_id=map_id, map_rows=rows,
                                    learner_episode=k))
        for game in games.values():
            game.close()
        return out

    def __repr__(self) -> str:
        return (f"RandomStarts(start_share={self.start_share}, epsilon={self.epsilon}, lr={self.lr}, "
                f"gamma={self.gamma})")
