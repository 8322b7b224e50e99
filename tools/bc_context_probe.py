"""How fast can a backbone learn to use its context at all? A supervised yardstick for the DQN runs.

Trains a fresh tiny Llama (the quickstart's sizes unless told otherwise) on the quickstart's replay
stream with behaviour cloning instead of double DQN: cross-entropy of the behaviour learner's
action over the four action logits at every action position. Then, on single-map sequences of 30
random episodes of a training map (``icrl_lightning.diagnostics.single_map_sequences``, as
``tools/context_td_error.py`` builds them), it reports the cross-entropy grouped by how many
earlier episodes of the same map precede the action. A model
that reads its context predicts the behaviour far better after a few episodes than at episode 0
(the behaviour mostly repeats the path it has converged to); uniform is ln 4 = 1.386 and the
behaviour's own epsilon-greedy noise (epsilon 0.1) leaves about 0.35 once it has converged.

    python tools/bc_context_probe.py --steps 300            # about 6 minutes on one CPU core
    # a quick run on a small dataset
    python tools/bc_context_probe.py --steps 20 --num-train-maps 8 --episodes-per-map 30 --hidden-size 32 \\
        --num-layers 1 --maps 8 --data-dir /tmp/bc_data
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from icrl_lightning import diagnostics
from icrl_lightning.backbones import TinyLlama
from icrl_lightning.checks import exit_on_input_error
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.module import ICRLModule

BUCKETS = ((0, 1), (1, 3), (3, 8), (8, 10**9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (no warm-up)")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--data-dir", default="data", help="data_dir (the quickstart's dataset is built if absent)")
    ap.add_argument("--num-train-maps", type=int, default=250, help="data.num_train_maps (the quickstart's: 250)")
    ap.add_argument("--episodes-per-map", type=int, default=200, help="data.episodes_per_map (the quickstart's: 200)")
    ap.add_argument("--maps", type=int, default=120, help="training maps in the context measurement")
    args = ap.parse_args()
    exit_on_input_error(run, args)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    backbone = TinyLlama(format="compact", hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=4,
                         intermediate_size=4 * args.hidden_size, max_position_embeddings=max(2048, args.seq_len))
    module = ICRLModule(backbone=backbone, seq_len=args.seq_len)
    data = ReplayDataModule(data_dir=args.data_dir, seq_len=args.seq_len, batch_size=args.batch_size,
                            num_train_maps=args.num_train_maps, episodes_per_map=args.episodes_per_map)
    data.set_serializer(module.serializer, module.batch_fields)
    data.prepare_data()
    loader = DataLoader(data.train_stream(args.steps * args.batch_size), batch_size=args.batch_size)
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=0.01)
    started, losses = time.perf_counter(), []
    for step, batch in enumerate(loader):
        if step >= args.steps:
            break
        mask = batch["q_mask"]
        loss = torch.nn.functional.cross_entropy(module.q_values(batch["input_ids"], mask), batch["action"][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: train CE {np.mean(losses[-50:]):.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)

    module.eval()
    by_map = diagnostics.learner_episodes(data, "train", maps=args.maps)
    ce: dict[int, list[float]] = {b: [] for b in range(len(BUCKETS))}
    for seq in diagnostics.single_map_sequences(by_map, module.serializer, args.seq_len, np.random.default_rng(1),
                                                maps=args.maps):
        if not seq.episodes:
            continue
        q = diagnostics.q_values(module, seq.batch)
        errs = torch.nn.functional.cross_entropy(q, seq.batch["action"], reduction="none")
        for k, c in zip(seq.episode_index, errs.tolist(), strict=True):
            ce[next(b for b, (lo, hi) in enumerate(BUCKETS) if lo <= k < hi)].append(c)
    for b, (lo, hi) in enumerate(BUCKETS):
        name = "episode 0 (no context)" if lo == 0 else f"episodes {lo}-{hi - 1}" if hi < 10**9 else f"episodes {lo}+"
        mean = f"{np.mean(ce[b]):.3f}" if ce[b] else "  -  "
        print(f"{name:24s} CE {mean}  (n={len(ce[b])})")


if __name__ == "__main__":
    main()
