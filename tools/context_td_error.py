"""Does a checkpoint use its context? TD error by episode index on single-map sequences.

For each of the first ``--maps`` training maps, 30 of its episodes are drawn at random and
packed whole into one sequence of at most ``--seq-len`` tokens. The squared double-DQN TD error
of every action is grouped by how many earlier episodes of the same map precede it. A model
that learns in context has a lower error with more context. Beside it, two numbers that need
the map: the cross-entropy of the shortest-path actions under softmax(Q) (``oracle CE``,
``-log P(shortest-path set)``) and how often the greedy action is a shortest-path one.

    python tools/context_td_error.py runs/quickstart/version_0/checkpoints/last.ckpt --data-dir data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from icrl_lightning.backbones import TinyLlama
from icrl_lightning.data import ReplayDataModule, with_optimal
from icrl_lightning.envs.frozen_lake import make_splits, optimal_actions
from icrl_lightning.module import ICRLModule
from icrl_lightning.qlearning import conservative_gap, double_dqn_targets, next_step

BUCKETS = (("episode 0 (no context)", 0, 1), ("episodes 1-2", 1, 3), ("episodes 3-7", 3, 8), ("episodes 8+", 8, 10**9))


def single_map_sequences(by_map: dict[int, list], serializer, n_maps: int, seq_len: int, rng: np.random.Generator):
    """For each of the first ``n_maps`` maps: 30 of its episodes drawn at random, packed whole into
    one sequence of at most ``seq_len`` tokens. Yields ``(input_ids [1, T], action-position mask
    [1, T], actions, rewards, episode-end flags, episode index of each action, shortest-path
    actions [n, 4] bool, the packed episodes)``."""
    for map_id in sorted(by_map)[:n_maps]:
        episodes = by_map[map_id]
        ids: list[int] = []
        q_pos, action, reward, done, index, optimal, packed = [], [], [], [], [], [], []
        best = optimal_actions(episodes[0].map_rows)
        for k, i in enumerate(rng.choice(len(episodes), size=min(30, len(episodes)), replace=False)):
            e = episodes[i]
            enc = with_optimal(serializer.episode(e.observations, e.actions, e.rewards, e.terminated, e.truncated),
                               e.observations, best)
            if len(ids) + len(enc) > seq_len or not len(enc.q_pos):
                break
            q_pos += (enc.q_pos + len(ids)).tolist()
            action += enc.actions.tolist()
            reward += enc.rewards.tolist()
            done += [False] * (len(enc.actions) - 1) + [True]
            index += [k] * len(enc.actions)
            optimal += enc.optimal.tolist()
            ids += enc.ids.tolist()
            packed.append(e)
        x = torch.tensor([ids])
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[0, q_pos] = True
        yield x, mask, action, reward, done, index, torch.tensor(optimal, dtype=torch.bool).reshape(-1, 4), packed


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

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    spec = hp["backbone"]
    backbone = TinyLlama(**spec.get("init_args", spec)) if isinstance(spec, dict) else spec
    module = ICRLModule(backbone=backbone, gamma=hp["gamma"], reward_scale=hp["reward_scale"], seq_len=hp["seq_len"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    saved = ckpt.get("datamodule_hyper_parameters", {})
    settings = {k: v for k, v in saved.items() if not k.startswith("_")} | {"data_dir": args.data_dir}
    data = ReplayDataModule(**settings)
    by_map: dict[int, list] = {}
    if args.split == "train":
        for e in data.load_episodes():
            by_map.setdefault(e.map_id, []).append(e)
    else:
        h = data.hparams
        for i, rows in enumerate(make_splits(h.split_seed, 0, **data._split_kwargs()).heldout[: args.maps]):
            by_map[i] = data.behaviour_run(rows, i, seed=[h.seed, 4, i])

    errors: dict[int, list[float]] = {i: [] for i in range(len(BUCKETS))}
    oracle_ce: dict[int, list[float]] = {i: [] for i in range(len(BUCKETS))}
    greedy_ok: dict[int, list[float]] = {i: [] for i in range(len(BUCKETS))}
    with torch.no_grad():
        for x, mask, action, reward, done, index, best, _ in single_map_sequences(
                by_map, module.serializer, args.maps, args.seq_len, np.random.default_rng(0)):
            q, q_target = module._q_values(x, mask), module._q_values(x, mask, target=True)
            y = double_dqn_targets(torch.tensor(reward), torch.tensor(done), next_step(q), next_step(q_target),
                                   hp["gamma"], hp["reward_scale"])
            err = (q.gather(1, torch.tensor(action)[:, None]).squeeze(1) - y) ** 2
            has = best.any(-1)
            ce = conservative_gap(q, torch.tensor(action), best)
            ok = best.gather(1, q.argmax(-1, keepdim=True)).squeeze(1).float()
            for k, e2, c, g, h in zip(index, err.tolist(), ce.tolist(), ok.tolist(), has.tolist(), strict=True):
                b = next(b for b, (_, lo, hi) in enumerate(BUCKETS) if lo <= k < hi)
                errors[b].append(e2)
                if h:  # a tile with a path to a goal
                    oracle_ce[b].append(c)
                    greedy_ok[b].append(g)
    for b, (name, _, _) in enumerate(BUCKETS):
        print(f"{name:24s} TD MSE {np.mean(errors[b]):7.2f}  oracle CE {np.mean(oracle_ce[b]):.3f}  "
              f"greedy on a shortest path {np.mean(greedy_ok[b]):.3f}  (n={len(errors[b])})")


if __name__ == "__main__":
    main()
