"""Does a checkpoint use its context? TD error by episode index on single-map sequences.

For each of the first ``--maps`` training maps, 30 of its episodes are drawn at random and
packed whole into one sequence of at most ``--seq-len`` tokens
(``icrl_lightning.diagnostics.single_map_sequences``). The squared double-DQN TD error of every
action is grouped by how many earlier episodes of the same map precede it. A model that learns in
context has a lower error with more context. Beside it, two numbers that need the map: the
cross-entropy of the shortest-path actions under softmax(Q) (``oracle CE``,
``-log P(shortest-path set)``) and how often the greedy action is a shortest-path one.

    python tools/context_td_error.py runs/quickstart/version_0/checkpoints/last.ckpt --data-dir data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from icrl_lightning import diagnostics
from icrl_lightning.checkpoints import load_run
from icrl_lightning.checks import exit_on_input_error
from icrl_lightning.envs.frozen_lake import optimal_actions
from icrl_lightning.qlearning import double_dqn_targets, next_step

BUCKETS = (("episode 0 (no context)", 0, 1), ("episodes 1-2", 1, 3), ("episodes 3-7", 3, 8), ("episodes 8+", 8, 10**9))


def shortest_path_sets(episodes) -> torch.Tensor:
    """``[n_actions, 4]`` bool, in the packed order: the actions that start a shortest path to a
    goal from the tile of each action (none on a tile with no path)."""
    rows = [optimal_actions(e.map_rows)[e.tiles] for e in episodes]
    return torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros((0, 4), dtype=torch.bool)


def oracle_cross_entropy(q: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Per row, ``-log P(set)`` under softmax(Q): ``logsumexp_a Q - logsumexp_{a in set} Q``
    (0 on rows with an empty set, which the caller leaves out)."""
    best = best | ~best.any(-1, keepdim=True)
    return torch.logsumexp(q, -1) - torch.logsumexp(q.masked_fill(~best, float("-inf")), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data-dir", default="data", help="data_dir of the run (its default dataset settings)")
    ap.add_argument("--maps", type=int, default=120)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--split", choices=("train", "heldout"), default="train",
                    help="heldout: fresh Q-learning runs (the dataset's behaviour settings) on the held-out maps, "
                         "to tell reading the context from recognising a memorised training map")
    args = ap.parse_args()
    exit_on_input_error(run, args)


def run(args: argparse.Namespace) -> None:
    module, data = load_run(args.checkpoint, data_dir=args.data_dir)
    td = module.td
    by_map = diagnostics.learner_episodes(data, args.split, maps=args.maps)

    errors: dict[int, list[float]] = {i: [] for i in range(len(BUCKETS))}
    oracle_ce: dict[int, list[float]] = {i: [] for i in range(len(BUCKETS))}
    greedy_ok: dict[int, list[float]] = {i: [] for i in range(len(BUCKETS))}
    for seq in diagnostics.single_map_sequences(by_map, module.serializer, args.seq_len, np.random.default_rng(0),
                                                maps=args.maps):
        if not seq.episodes:
            continue
        b = seq.batch
        q, q_target = diagnostics.q_values(module, b), diagnostics.q_values(module, b, target=True)
        y = double_dqn_targets(b["reward"], b["done"], next_step(q), next_step(q_target), td.gamma, td.reward_scale)
        err = (q.gather(1, b["action"][:, None]).squeeze(1) - y) ** 2
        best = shortest_path_sets(seq.episodes)
        has = best.any(-1)
        ce = oracle_cross_entropy(q, best)
        ok = best.gather(1, q.argmax(-1, keepdim=True)).squeeze(1).float()
        for k, e2, c, g, h in zip(seq.episode_index, err.tolist(), ce.tolist(), ok.tolist(), has.tolist(),
                                  strict=True):
            bucket = next(i for i, (_, lo, hi) in enumerate(BUCKETS) if lo <= k < hi)
            errors[bucket].append(e2)
            if h:  # a tile with a path to a goal
                oracle_ce[bucket].append(c)
                greedy_ok[bucket].append(g)
    for bucket, (name, _, _) in enumerate(BUCKETS):
        print(f"{name:24s} TD MSE {_mean(errors[bucket]):7.2f}  oracle CE {_mean(oracle_ce[bucket]):.3f}  "
              f"greedy on a shortest path {_mean(greedy_ok[bucket]):.3f}  (n={len(errors[bucket])})")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


if __name__ == "__main__":
    main()
