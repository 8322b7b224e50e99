"""Runs the in-context evaluation protocol for the validation loop: one batch of maps per rank
(``run``), then the summaries, metrics and report over every rank's maps (``finish``)."""

from __future__ import annotations

import time

import numpy as np

from icrl_lightning.agent import InContextAgent
from icrl_lightning.evaluation.protocol import BASELINES, EvalProtocol, run_baseline
from icrl_lightning.evaluation.report import summarize


class Evaluator:
    """Plays the protocol's agents on maps and turns their returns into a report.

    Baseline returns depend only on the maps, schedule, seed and step limit, so they are cached
    across the periodic evaluations of one ``fit``.
    """

    def __init__(self, protocol: EvalProtocol):
        self.protocol = protocol
        self._baseline_cache: dict = {}

    def run(self, agent: InContextAgent, batch: list[tuple[int, tuple[str, ...]]]) -> dict:
        """Returns of every agent on this batch of ``(index, rows)`` maps."""
        p = self.protocol
        schedule = p.greedy_probs()
        index = [i for i, _ in batch]
        maps = [m for _, m in batch]
        started = time.perf_counter()
        trial = agent.play(maps, schedule, p.seed)
        out = {"index": index, "maps": maps, "icrl": trial.returns, "trajectories": trial.trajectories,
               "timings": {"icrl_s": time.perf_counter() - started, "forward_calls": trial.forward_calls}}
        if p.no_context:
            started = time.perf_counter()
            out["no_context"] = agent.play(maps, schedule, p.seed, keep_context=False).returns
            out["timings"]["no_context_s"] = time.perf_counter() - started
        if p.baselines:
            for name in BASELINES:
                key = (name, tuple(maps), tuple(schedule), p.seed, p.max_episode_steps)
                if key not in self._baseline_cache:
                    self._baseline_cache[key] = run_baseline(name, maps, schedule, p.seed, p.max_episode_steps)
                out[name] = self._baseline_cache[key]
        return out

    def finish(self, outputs: list[dict], global_step: int) -> tuple[dict[str, float], dict]:
        """(metrics to log, report) over the outputs of ``run`` from every rank."""
        index = np.concatenate([o["index"] for o in outputs])
        # Lightning's DistributedSampler repeats maps to even out ranks: keep each map once.
        _, order = np.unique(index, return_index=True)
        p = self.protocol
        schedule = p.greedy_probs()
        agents = [a for a in ("icrl", "no_context", *BASELINES) if a in outputs[0]]
        returns = {a: np.concatenate([o[a] for o in outputs])[order] for a in agents}
        summaries = {a: summarize(r, schedule, p.last_k) for a, r in returns.items()}
        k = p.last_k
        icrl = summaries["icrl"]
        metrics = {f"val_curve/return_ep{e:02d}": v for e, v in enumerate(icrl["mean_return"])}
        metrics.update({f"val/{a}_last{k}": s[f"last{k}"] for a, s in summaries.items()})
        if "no_context" in summaries:
            metrics["val/context_gain"] = icrl[f"last{k}"] / max(summaries["no_context"][f"last{k}"], 1e-9)
        maps = [m for o in outputs for m in o["maps"]]
        trajectories = [t for o in outputs for t in o["trajectories"]]
        report = {
            "n_maps": len(order), "n_episodes": len(schedule), "last_k": k, "schedule": schedule,
            "global_step": global_step, "protocol": vars(p),
            "maps": [list(maps[i]) for i in order],
            "agents": summaries,
            "trajectories": [trajectories[i] for i in order],
            "timings": [o["timings"] for o in outputs],
        }
        return metrics, report
