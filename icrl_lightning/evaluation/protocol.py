"""The paper's evaluation protocol (SPEC "Evaluation protocol") and the baselines that share it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from icrl_lightning.agent import draw_action
from icrl_lightning.behaviour import TabularQLearner
from icrl_lightning.checks import InputError, check_choice, check_range
from icrl_lightning.envs.family import ProblemFamily, Task, paper_schedule
from icrl_lightning.envs.frozen_lake import FrozenLake
from icrl_lightning.envs.stitching import load_stitching_layouts
from icrl_lightning.episodes import Episode

SCENARIOS = ("standard", "nonstationary", "stitching")
__all__ = ["BASELINES", "SCENARIOS", "EvalProtocol", "paper_schedule", "run_baseline"]


@dataclass
class EvalProtocol:
    """How the in-context evaluation is run.

    Args:
        scenario: ``standard``: one trial per evaluation map (in-distribution held-out, OOD or the
            user's maps, as the data module serves them). ``nonstationary``: the schedule is
            played on map A, then, context kept and without warning, again on map B = the next
            evaluation map of the batch (the last map's B is the first); needs two maps or more.
            ``stitching``: ``stitching_trials`` trials on each layout of ``stitching_file``, each
            starting from a context prefilled with that layout's episodes; the data module's
            maps are not played.
        schedule: greedy-action probability of each episode of a trial; empty = the problem
            family's (Frozen Lake and Dark Room: the paper's, 0.0 .. 0.9 two episodes each, then
            1.0 for ten: 30 episodes; bandits: 100 greedy pulls); for ``stitching`` empty = one
            fully greedy episode.
        seed: seeds environment resets and exploration draws (the same for every agent).
        max_episode_steps: episode time limit; 0 (default) = the problem family's (Frozen Lake:
            SPEC's 100; Dark Room: its horizon; bandits: one pull).
        max_context: context window of the agent in tokens; 0 = the trained ``seq_len``. A longer
            context drops its oldest whole episodes.
        no_context: also evaluate the same model starting every episode from an empty context.
        baselines: also run uniform random, tabular Q-learning from scratch (zero and optimistic
            values), the oracle and the problem family's own baselines (bandits: UCB1, Thompson
            sampling, greedy).
        last_k: the headline metric is the mean return of the last ``last_k`` episodes.
        stitching_file: the ``stitching`` scenario's layouts, a JSON file holding one layout
            ``{"map": [rows], "context": [[tile, ...], ...]}`` (tile paths, ``row * ncols + col``;
            rewards and endings follow from the map) or a list of them. ``data/stitching.json``
            holds SPEC's: ``HHFF/FFFF/SFFH/HFFF/HFFF/HFGF`` with 2-6-10-14-18-22 (reaches the goal)
            and 8-9-10-11 (ends in a hole); ``data/stitching_layouts.json`` 70 layouts built the
            same way on held-out maps no run is scored on (``tools/make_stitching_layouts.py``).
        stitching_trials: trials of the ``stitching`` scenario on each layout (SPEC: 5 on its one
            layout; greedy from a single start, every trial of a layout plays alike).
        draft_budget: speed only. After each action the agent drafts a map's next moves (its
            random ones, and greedy ones that repeat what it did before from the same observation)
            and checks them against the model in the next call, keeping those the model would have
            chosen; this is the most tokens (maps x width) such a call may hold. 0 plays one step
            per call. The actions are those of one step per call (in float32; under bf16 autocast a
            near tie between two Q-values can round either way, as with any change of batch shape).
            A GPU, where a wide call costs about what a narrow one does, may take more.
    """

    scenario: str = "standard"
    schedule: list[float] | None = None
    seed: int = 1234
    max_episode_steps: int = 0
    max_context: int = 0
    no_context: bool = True
    baselines: bool = True
    last_k: int = 10
    stitching_file: str | None = None
    stitching_trials: int = 5
    draft_budget: int = 256

    def check(self) -> None:
        check_choice("model.evaluation.scenario", self.scenario, SCENARIOS)
        check_range("model.evaluation.stitching_trials", self.stitching_trials, 1, None)
        check_range("model.evaluation.last_k", self.last_k, 1, None)
        check_range("model.evaluation.max_context", self.max_context, 0, None)
        check_range("model.evaluation.draft_budget", self.draft_budget, 0, None, why="0 = one step per call")
        check_range("model.evaluation.max_episode_steps", self.max_episode_steps, 0, None,
                    why="0 = the problem family's time limit")
        if self.scenario == "stitching":
            if not self.stitching_file:
                raise InputError("model.evaluation.scenario=stitching needs model.evaluation.stitching_file "
                                 "(data/stitching.json holds the paper's map and context)")
            load_stitching_layouts(self.stitching_file)
        self.greedy_probs()

    def for_family(self, env: ProblemFamily) -> EvalProtocol:
        """This protocol with ``max_episode_steps`` 0 resolved to ``env``'s time limit."""
        if self.max_episode_steps:
            return self
        return dataclasses.replace(self, max_episode_steps=env.max_episode_steps)

    def greedy_probs(self, default: list[float] | None = None) -> list[float]:
        """The schedule of one phase (a non-stationary trial plays it twice); ``default``: the
        problem family's (``ProblemFamily.schedule``; the paper's when not given)."""
        if self.schedule:
            probs = list(self.schedule)
        else:
            probs = [1.0] if self.scenario == "stitching" else list(default or paper_schedule())
        bad = [p for p in probs if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0]
        if bad:
            raise InputError(f"model.evaluation.schedule: probabilities must lie in [0, 1], got {bad}")
        return probs


BASELINES = ("random", "q_learning", "q_optimistic", "oracle")
Q_LEARNERS = ("q_learning", "q_optimistic")


def run_baseline(
    name: str,
    maps: list[Task],
    schedule: list[float],
    seed: int,
    max_episode_steps: int = 100,
    switch_to: list[Task] | None = None,
    context: list[list[Episode]] | None = None,
    context_sweeps: int = 100,
    keys: list[int] | None = None,
    env: ProblemFamily | None = None,
) -> np.ndarray:
    """Returns ``[maps, episodes]`` of a baseline on the same tasks (maps), schedule and draws as
    the agent; ``env`` is their problem family (default Frozen Lake).

    * ``random``: every action uniform.
    * ``q_learning``: a tabular Q-learner from scratch, greedy with the schedule's probability.
    * ``q_optimistic``: the same with every table entry starting at 1.0 (the largest return):
      untried moves look best, so it explores systematically and does not walk into the same
      hole again. A far stronger tabular yardstick on these small maps.
    * the family's own (``ProblemFamily.baselines``, e.g. the bandits' ``ucb1``): its learner's
      choice when greedy, learning from every step; a fresh learner on each phase's task.
    * ``oracle``: the family's optimal action (Frozen Lake: a shortest-path move by BFS on the
      true map) when greedy: the upper bound.

    ``switch_to`` (non-stationary): after ``len(schedule)`` episodes map ``i`` becomes
    ``switch_to[i]`` and the schedule restarts; the Q-learner keeps its table (it is not told
    either), the oracle plans on the new map. ``context`` (stitching): per map, episodes the Q-learner
    first learns from, replayed ``context_sweeps`` times (the tabular counterpart of reading
    them in context); the other baselines ignore them. ``keys``: map ``i`` draws from
    ``default_rng([seed, keys[i]])`` instead of ``[seed, i]`` (as ``InContextAgent.play``).
    """
    family = env or FrozenLake()
    if name not in BASELINES + family.baselines:
        raise ValueError(f"baseline {name!r}: choose from {BASELINES + family.baselines}")
    if switch_to is not None and len(switch_to) != len(maps):
        raise ValueError(f"switch_to has {len(switch_to)} maps for {len(maps)} maps")
    if context is not None and len(context) != len(maps):
        raise ValueError(f"context has {len(context)} entries for {len(maps)} maps")
    n_actions = family.n_actions
    phases = [maps] if switch_to is None else [maps, switch_to]
    n_eps = len(schedule)
    out = np.zeros((len(maps), n_eps * len(phases)))
    for i in range(len(maps)):
        rng = np.random.default_rng([seed, i if keys is None else keys[i]])
        n_states = max(family.n_observations(p[i]) for p in phases)
        learner = TabularQLearner(n_states, rng=rng, q_init=1.0 if name == "q_optimistic" else 0.0,
                                  n_actions=n_actions)
        if name in Q_LEARNERS:
            for _ in range(context_sweeps if context else 0):
                for e in context[i]:
                    for t, a in enumerate(e.actions):
                        last = t == len(e.actions) - 1
                        learner.update(e.observations[t], a, e.rewards[t], e.observations[t + 1],
                                       last and e.terminated)
        for phase, phase_maps in enumerate(phases):
            task = phase_maps[i]
            if name in family.baselines:
                learner = family.baseline_learner(name, task, rng)
            game = family.make_env(task, max_episode_steps)
            best = family.oracle_actions(task)
            for k, p in enumerate(schedule):
                obs, _ = game.reset(seed=int(rng.integers(2**31)))
                done, total = False, 0.0
                while not done:
                    if name == "random":
                        a = draw_action(rng, 0.0, None, n_actions)
                    elif name == "oracle":
                        a = draw_action(rng, p, lambda: best[obs], n_actions)
                    else:
                        a = draw_action(rng, p, lambda: learner.greedy(obs), n_actions)
                    nxt, r, term, trunc, _ = game.step(a)
                    if name in Q_LEARNERS or name in family.baselines:
                        learner.update(int(obs), a, float(r), int(nxt), term)
                    obs, total, done = nxt, total + r, term or trunc
                out[i, phase * n_eps + k] = total
            game.close()
    return out
