"""Behaviour learners under study."""

from __future__ import annotations

import numpy as np

from icrl_lightning.behaviour import Behaviour, play_episode
from icrl_lightning.checks import check_range
from icrl_lightning.envs.family import ProblemFamily, Task
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
