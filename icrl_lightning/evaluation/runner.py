"""Runs the in-context evaluation protocol for the validation loop: one batch of maps per rank
(``run``), then the summaries, metrics and report over every rank's maps (``finish``)."""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from icrl_lightning.agent import InContextAgent
from icrl_lightning.envs.family import ProblemFamily
from icrl_lightning.envs.frozen_lake import FrozenLake
from icrl_lightning.evaluation.protocol import BASELINES, EvalProtocol, run_baseline
from icrl_lightning.evaluation.report import repeated_failures, stitching_paths, summarize, summarize_phases
from icrl_lightning.evaluation.scenarios import context_tokens, make_plan


class Evaluator:
    """Plays the protocol's agents on the tasks (maps) of ``env`` (default Frozen Lake) and turns
    their returns into a report.

    Every agent plays the same plan (maps, schedule, map switch, seeds and exploration draws).
    Baseline returns depend only on the plan, seed and step limit, so they are cached across the
    periodic evaluations of one ``fit``.
    """

    def __init__(self, protocol: EvalProtocol, env: ProblemFamily | None = None):
        self.env = env or FrozenLake()
        self.protocol = protocol.for_family(self.env)
        self._baseline_cache: dict = {}

    def run(self, agent: InContextAgent, batch: list[tuple[int, tuple[str, ...]]]) -> dict:
        """Returns of every agent on this batch of ``(index, rows)`` maps."""
        p = self.protocol
        plan = make_plan(p, batch, self.env.schedule())
        prefill = None
        if plan.context:
            # A layout's trials share one context list: tokenize each distinct context once.
            tokens = {id(c): context_tokens(agent.s, c) for c in plan.context}
            prefill = [tokens[id(c)] for c in plan.context]
        timings: dict = {}
        started = time.perf_counter()
        # Draws are keyed by the map's index in the evaluation set, not its place in this rank's batch,
        # so that one process and several ranks play every map identically.
        trial = agent.play(plan.maps, plan.schedule, p.seed, switch_to=plan.switch_to, prefill=prefill,
                           keys=plan.index)
        timings.update(icrl_s=time.perf_counter() - started, forward_calls=trial.forward_calls,
                       reencodes=trial.reencodes, longest_context=trial.longest_context,
                       drafted=trial.drafted, drafts_kept=trial.drafts_kept)
        out = {"index": plan.index, "maps": plan.maps, "switch_to": plan.switch_to, "icrl": trial.returns,
               "trajectories": trial.trajectories, "actions": trial.actions, "timings": timings}
        if p.no_context:
            started = time.perf_counter()
            out["no_context"] = agent.play(plan.maps, plan.schedule, p.seed, keep_context=False,
                                           switch_to=plan.switch_to, keys=plan.index).returns
            timings["no_context_s"] = time.perf_counter() - started
        if p.baselines:
            started = time.perf_counter()
            for name in self.baseline_names:
                key = (name, tuple(plan.maps), tuple(plan.index), tuple(plan.switch_to or ()), repr(plan.context),
                       tuple(plan.schedule), p.seed, p.max_episode_steps)
                if key not in self._baseline_cache:
                    self._baseline_cache[key] = run_baseline(name, plan.maps, plan.schedule, p.seed,
                                                             p.max_episode_steps, plan.switch_to, plan.context,
                                                             keys=plan.index, env=self.env)
                out[name] = self._baseline_cache[key]
            timings["baselines_s"] = time.perf_counter() - started
        out["plan"] = plan
        return out

    @property
    def baseline_names(self) -> tuple[str, ...]:
        """The protocol's baselines and the problem family's own."""
        return BASELINES + self.env.baselines

    def finish(self, outputs: list[dict], global_step: int) -> tuple[dict[str, float], dict]:
        """(metrics to log, report) over the outputs of ``run`` from every rank."""
        index = np.concatenate([o["index"] for o in outputs])
        # Lightning's DistributedSampler repeats maps to even out ranks: keep each map once.
        _, order = np.unique(index, return_index=True)
        p = self.protocol
        plan = outputs[0]["plan"]
        phase_schedule = plan.schedule
        schedule = phase_schedule * plan.phases
        agents = [a for a in ("icrl", "no_context", *self.baseline_names) if a in outputs[0]]
        returns = {a: np.concatenate([o[a] for o in outputs])[order] for a in agents}
        k = p.last_k
        summaries = {}
        for a, r in returns.items():
            summaries[a] = summarize(r, schedule, k)
            if plan.phases > 1:
                summaries[a]["phases"] = summarize_phases(r, phase_schedule, plan.phases, k)
        phase_maps = [[m for o in outputs for m in o["maps"]]]
        if plan.phases > 1:
            phase_maps.append([m for o in outputs for m in o["switch_to"]])
        best = [[self.env.best_expected_return(maps[i]) for i in order] for maps in phase_maps]
        if all(b is not None for phase in best for b in phase):
            # Regret per pull: the best arm's mean (of the task played in that phase) minus the
            # reward, summed over a trial, mean over tasks (common random numbers: every agent's
            # reward draws come from the same seeds).
            optimum = np.repeat(np.asarray(best).T, len(phase_schedule), axis=1)
            for a, r in returns.items():
                regret = np.cumsum(optimum - r, axis=1).mean(axis=0)
                summaries[a]["cumulative_regret"] = regret.round(4).tolist()
                summaries[a]["regret"] = float(regret[-1])
        icrl = summaries["icrl"]
        metrics = {f"val_curve/return_ep{e:02d}": v for e, v in enumerate(icrl["mean_return"])}
        metrics.update({f"val/{a}_last{k}": s[f"last{k}"] for a, s in summaries.items()})
        metrics.update({f"val/{a}_goal_found_before_greedy": s["goal_found_before_greedy"]
                        for a, s in summaries.items()})
        metrics.update({f"val/{a}_regret": s["regret"] for a, s in summaries.items() if "regret" in s})
        if plan.phases > 1:
            metrics.update({f"val/{a}_map_a_last{k}": s["phases"][0][f"last{k}"] for a, s in summaries.items()})
        if "no_context" in summaries:
            metrics["val/context_gain"] = icrl[f"last{k}"] / max(summaries["no_context"][f"last{k}"], 1e-9)
        flat = {key: [x for o in outputs for x in (o[key] or [])] for key in ("maps", "trajectories", "actions")}
        switch = [m for o in outputs for m in (o["switch_to"] or [])]
        steps = [[len(ep) - 1 for ep in flat["trajectories"][i]] for i in order]
        icrl["mean_episode_steps"] = np.mean(steps, axis=0).round(2).tolist()
        icrl["greedy_repeats_failure"] = repeated_failures(returns["icrl"], [flat["trajectories"][i] for i in order],
                                                           phase_schedule)
        if icrl["greedy_repeats_failure"] is not None:
            metrics["val/icrl_greedy_repeats_failure"] = icrl["greedy_repeats_failure"]
        if icrl["greedy_after_failure"] is not None:
            metrics["val/icrl_greedy_after_failure"] = icrl["greedy_after_failure"]
        timings = [o["timings"] for o in outputs]
        contexts = [c for o in outputs for c in (o["plan"].context or [])]
        context_steps = [[e.steps() for e in contexts[i]] for i in order] if plan.context else None
        if context_steps:
            icrl["stitching"] = stitching_paths(returns["icrl"], [flat["trajectories"][i] for i in order],
                                                context_steps)
            metrics.update({f"val/icrl_{k}": v for k, v in icrl["stitching"].items() if v is not None})
        report = {
            "scenario": p.scenario,
            "n_maps": len(order), "n_episodes": len(schedule), "last_k": k, "schedule": schedule,
            "phases": plan.phases, "phase_length": len(phase_schedule),
            "global_step": global_step, "protocol": asdict(p),
            "maps": [list(flat["maps"][i]) for i in order],
            "switch_to": [list(switch[i]) for i in order] if switch else None,
            "context": context_steps,
            "agents": summaries,
            "trajectories": [flat["trajectories"][i] for i in order],
            "actions": [flat["actions"][i] for i in order],
            "timings": {"per_rank": timings,
                        "icrl_s": max(t["icrl_s"] for t in timings),
                        "total_s": max(sum(v for key, v in t.items() if key.endswith("_s")) for t in timings)},
        }
        return metrics, report
