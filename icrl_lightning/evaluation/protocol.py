"""The paper's evaluation protocol (SPEC "Evaluation protocol") and the baselines that share it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icrl_lightning.agent import draw_action
from icrl_lightning.behaviour import TabularQLearner
from icrl_lightning.envs.frozen_lake import Map, make_env, shortest_path_actions

SCENARIOS = ("standard", "nonstationary", "stitching")


def paper_schedule() -> list[float]:
    """Greedy probability per episode: 0.0, 0.1, ..., 0.9 for two episodes each, then 1.0 for 10."""
    return [round(p / 10, 1) for p in range(10) for _ in range(2)] + [1.0] * 10


@dataclass
class EvalProtocol:
    """How the in-context evaluation is run.

    Args:
        scenario: ``standard``: one trial per evaluation map (in-distribution held-out, OOD or the
            user's maps, as the data module serves them). ``nonstationary``: the schedule is
            played on map A, then, context kept and without warning, again on map B = the next
            evaluation map of the batch (the last map's B is the first); needs two maps or more.
            ``stitching``: ``stitching_trials`` trials on ``stitching_map``, each starting from a
            context prefilled with the ``stitching_context`` episodes; the data module's maps
            are not played.
        schedule: greedy-action probability of each episode of a trial; empty = the paper's
            (0.0 .. 0.9 two episodes each, then 1.0 for ten: 30 episodes); for ``stitching``
            empty = one fully greedy episode.
        seed: seeds environment resets and exploration draws (the same for every agent).
        max_episode_steps: episode time limit (SPEC: 100).
        max_context: context window of the agent in tokens; 0 = the trained ``seq_len``. A longer
            context drops its oldest whole episodes.
        no_context: also evaluate the same model starting every episode from an empty context.
        baselines: also run uniform random, tabular Q-learning from scratch and the BFS oracle.
        last_k: the headline metric is the mean return of the last ``last_k`` episodes.
        stitching_map: map of the ``stitching`` scenario (rows); empty = SPEC's
            ``HHFF/FFFF/SFFH/HFFF/HFFF/HFGF``.
        stitching_context: the prefilled episodes as tile paths (each a list of tile indices
            ``row * ncols + col``; rewards and endings follow from the map); empty = SPEC's two:
            2-6-10-14-18-22 (reaches the goal) and 8-9-10-11 (ends in a hole).
        stitching_trials: trials of the ``stitching`` scenario (SPEC: 5).
    """

    scenario: str = "standard"
    schedule: list[float] | None = None
    seed: int = 1234
    max_episode_steps: int = 100
    max_context: int = 0
    no_context: bool = True
    baselines: bool = True
    last_k: int = 10
    stitching_map: list[str] | None = None
    stitching_context: list[list[int]] | None = None
    stitching_trials: int = 5

    def __post_init__(self):
        if self.scenario not in SCENARIOS:
            raise ValueError(f"model.evaluation.scenario={self.scenario!r}: choose one of {SCENARIOS}")
        if self.stitching_trials < 1:
            raise ValueError(f"model.evaluation.stitching_trials={self.stitching_trials}: must be >= 1")
        if self.last_k < 1:
            raise ValueError(f"model.evaluation.last_k={self.last_k}: must be >= 1")

    def greedy_probs(self) -> list[float]:
        """The schedule of one phase (a non-stationary trial plays it twice)."""
        if self.schedule:
            probs = list(self.schedule)
        else:
            probs = [1.0] if self.scenario == "stitching" else paper_schedule()
        bad = [p for p in probs if not 0.0 <= p <= 1.0]
        if bad:
            raise ValueError(f"model.evaluation.schedule: probabilities must lie in [0, 1], got {bad}")
        return probs


BASELINES = ("random", "q_learning", "q_optimistic", "oracle")
Q_LEARNERS = ("q_learning", "q_optimistic")


@dataclass
class ContextEpisode:
    """A whole episode given as context (behaviour stitching): ``observations`` has one more entry
    than ``actions``."""

    observations: list[int]
    actions: list[int]
    rewards: list[float]
    terminated: bool
    truncated: bool = False


def run_baseline(
    name: str,
    maps: list[Map],
    schedule: list[float],
    seed: int,
    max_episode_steps: int = 100,
    switch_to: list[Map] | None = None,
    context: list[ContextEpisode] | None = None,
    context_sweeps: int = 100,
    keys: list[int] | None = None,
) -> np.ndarray:
    """Returns ``[maps, episodes]`` of a baseline on the same maps, schedule and draws as the agent.

    * ``random``: every action uniform.
    * ``q_learning``: a tabular Q-learner from scratch, greedy with the schedule's probability.
    * ``q_optimistic``: the same with every table entry starting at 1.0 (the largest return):
      untried moves look best, so it explores systematically and does not walk into the same
      hole again. A far stronger tabular yardstick on these small maps.
    * ``oracle``: a shortest-path action (BFS on the true map) when greedy: the upper bound.

    ``switch_to`` (non-stationary): after ``len(schedule)`` episodes map ``i`` becomes
    ``switch_to[i]`` and the schedule restarts; the Q-learner keeps its table (it is not told
    either), the oracle plans on the new map. ``context`` (stitching): the Q-learner first learns
    from these episodes, replayed ``context_sweeps`` times (the tabular counterpart of reading
    them in context); the other baselines ignore them. ``keys``: map ``i`` draws from
    ``default_rng([seed, keys[i]])`` instead of ``[seed, i]`` (as ``InContextAgent.play``).
    """
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r}: choose from {BASELINES}")
    if switch_to is not None and len(switch_to) != len(maps):
        raise ValueError(f"switch_to has {len(switch_to)} maps for {len(maps)} maps")
    phases = [maps] if switch_to is None else [maps, switch_to]
    n_eps = len(schedule)
    out = np.zeros((len(maps), n_eps * len(phases)))
    for i in range(len(maps)):
        rng = np.random.default_rng([seed, i if keys is None else keys[i]])
        n_states = max(len(p[i]) * len(p[i][0]) for p in phases)
        learner = TabularQLearner(n_states, rng=rng, q_init=1.0 if name == "q_optimistic" else 0.0)
        if name in Q_LEARNERS:
            for _ in range(context_sweeps if context else 0):
                for e in context:
                    for t, a in enumerate(e.actions):
                        last = t == len(e.actions) - 1
                        learner.update(e.observations[t], a, e.rewards[t], e.observations[t + 1],
                                       last and e.terminated)
        for phase, phase_maps in enumerate(phases):
            rows = phase_maps[i]
            env = make_env(rows, max_episode_steps)
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
                    if name in Q_LEARNERS:
                        learner.update(int(obs), a, float(r), int(nxt), term)
                    obs, total, done = nxt, total + r, term or trunc
                out[i, phase * n_eps + k] = total
            env.close()
    return out
