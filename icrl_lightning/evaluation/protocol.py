"""The paper's evaluation protocol (SPEC "Evaluation protocol") and the baselines that share it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icrl_lightning.agent import draw_action
from icrl_lightning.behaviour import TabularQLearner
from icrl_lightning.envs.frozen_lake import Map, make_env, shortest_path_actions


def paper_schedule() -> list[float]:
    """Greedy probability per episode: 0.0, 0.1, ..., 0.9 for two episodes each, then 1.0 for 10."""
    return [round(p / 10, 1) for p in range(10) for _ in range(2)] + [1.0] * 10


@dataclass
class EvalProtocol:
    """How the in-context evaluation is run.

    Args:
        schedule: greedy-action probability of each episode of a trial; empty = the paper's
            (0.0 .. 0.9 two episodes each, then 1.0 for ten: 30 episodes).
        seed: seeds environment resets and exploration draws (the same for every agent).
        max_episode_steps: episode time limit (SPEC: 100).
        max_context: context window of the agent in tokens; 0 = the trained ``seq_len``.
        no_context: also evaluate the same model starting every episode from an empty context.
        baselines: also run uniform random, tabular Q-learning from scratch and the BFS oracle.
        last_k: the headline metric is the mean return of the last ``last_k`` episodes.
    """

    schedule: list[float] | None = None
    seed: int = 1234
    max_episode_steps: int = 100
    max_context: int = 0
    no_context: bool = True
    baselines: bool = True
    last_k: int = 10

    def greedy_probs(self) -> list[float]:
        probs = list(self.schedule) if self.schedule else paper_schedule()
        bad = [p for p in probs if not 0.0 <= p <= 1.0]
        if bad:
            raise ValueError(f"evaluation.schedule: probabilities must lie in [0, 1], got {bad}")
        return probs


BASELINES = ("random", "q_learning", "oracle")


def run_baseline(
    name: str, maps: list[Map], schedule: list[float], seed: int, max_episode_steps: int = 100
) -> np.ndarray:
    """Returns ``[maps, episodes]`` of a baseline on the same maps, schedule and draws.

    * ``random``: every action uniform.
    * ``q_learning``: a tabular Q-learner from scratch, greedy with the schedule's probability.
    * ``oracle``: a shortest-path action (BFS on the true map) when greedy: the upper bound.
    """
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r}: choose from {BASELINES}")
    out = np.zeros((len(maps), len(schedule)))
    for i, rows in enumerate(maps):
        rng = np.random.default_rng([seed, i])
        env = make_env(rows, max_episode_steps)
        learner = TabularQLearner(len(rows) * len(rows[0]), rng=rng)
        best = shortest_path_actions(rows)
        for k, p in enumerate(schedule):
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            done, total = False, 0.0
            while not done:
                if name == "random":
                    a = draw_action(rng, 0.0, None)
                elif name == "oracle":
                    a = draw_action(rng, p, lambda: max(best[obs], 0))
                else:
                    a = draw_action(rng, p, lambda: learner.greedy(obs))
                nxt, r, term, trunc, _ = env.step(a)
                if name == "q_learning":
                    learner.update(int(obs), a, float(r), int(nxt), term)
                obs, total, done = nxt, total + r, term or trunc
            out[i, k] = total
        env.close()
    return out
