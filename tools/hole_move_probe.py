"""Does a checkpoint learn from a hole in its context?

For every move into a hole (the last move of an episode that ends on an ``H`` tile) it compares the
move's Q-value with the best other move's, split by whether the context already shows the same move
(same tile, same action) ending in a hole, and by how many times. Two kinds of context:

  learner   contexts like the training data: 30 episodes of a tabular Q-learning run on one map,
            drawn at random and packed whole into ``--seq-len`` tokens (``learner, train``: the
            dataset's runs; ``learner, heldout``: fresh runs on held-out maps)
  own       the model's own trials of the paper protocol on the evaluation maps: every greedy-phase
            decision on a tile where a move already ended in a hole in this trial (taken or not),
            i.e. the contexts the evaluation really acts from

"argmax" is the share where that move is the greedy choice. A model that learns from a hole in
context gives a low Q and a low argmax share once the move is "seen".

    python tools/hole_move_probe.py runs/quickstart/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from icrl_lightning import diagnostics
from icrl_lightning.agent import InContextAgent
from icrl_lightning.checkpoints import checkpoint_eval_maps, load_run
from icrl_lightning.checks import exit_on_input_error
from icrl_lightning.envs.frozen_lake import paper_schedule


def ends_in_hole(rows, observations, actions) -> bool:
    w = len(rows[0])
    last = observations[-1]
    return bool(actions) and rows[last // w][last % w] == "H"


def learner_contexts(module, by_map, n_maps: int, seq_len: int, rng) -> dict:
    """{times seen before (capped at 3): [(Q of the hole move, best other Q)]} over learner contexts
    (packed by ``icrl_lightning.diagnostics.single_map_sequences``, as ``context_td_error.py`` packs them)."""
    out = defaultdict(list)
    for seq in diagnostics.single_map_sequences(by_map, module.serializer, seq_len, rng, maps=n_maps):
        if not seq.episodes:
            continue
        rows, seen = seq.episodes[0].map_rows, defaultdict(int)
        last_q = diagnostics.q_values(module, seq.batch).numpy()[np.flatnonzero(seq.batch["done"])]  # last moves
        for e, q in zip(seq.episodes, last_q, strict=True):
            if e.terminated and ends_in_hole(rows, e.observations, e.actions):
                key, a = (e.observations[-2], e.actions[-1]), e.actions[-1]
                out[min(seen[key], 3)].append((q[a], np.delete(q, a).max()))
                seen[key] += 1
    return out


def own_contexts(module, maps, seq_len: int, seed: int) -> dict:
    """The same over the model's own protocol trials, greedy phase only: at every greedy decision on
    a tile where a move has already ended in a hole in this trial (the move taken or not)."""
    agent = InContextAgent(module.acting_network(), module.serializer, max_context=seq_len)
    schedule = paper_schedule()
    with torch.no_grad():
        trial = agent.play(maps, schedule, seed, record_q=True, keys=list(range(len(maps))))
    out = defaultdict(list)
    for i, rows in enumerate(maps):
        seen, t = defaultdict(int), 0
        for k, e in enumerate(trial.episodes[i]):
            obs, acts = e.observations, e.actions
            for j in range(len(acts)):
                q = trial.q_values[i][t + j]
                for a in range(4):
                    if schedule[k] == 1.0 and seen[(obs[j], a)]:
                        out[min(seen[(obs[j], a)], 3)].append((q[a], np.delete(q, a).max()))
            t += len(acts)
            if ends_in_hole(rows, obs, acts):
                seen[(obs[-2], acts[-1])] += 1
    return out


def show(name: str, table: dict) -> None:
    if not table:
        print(f"{name:18s} no move into a hole")
    for n in sorted(table):
        v = np.array(table[n])
        label = {0: "first time", 3: "seen 3+ times"}.get(n, f"seen {n} time{'s' * (n > 1)}")
        print(f"{name:18s} {label:14s} n={len(v):4d}  Q(hole move) {v[:, 0].mean():6.2f}  "
              f"best other {v[:, 1].mean():6.2f}  argmax {np.mean(v[:, 0] > v[:, 1]):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--maps", type=int, default=120, help="maps for the learner contexts")
    ap.add_argument("--eval-maps", type=int, default=50, help="evaluation maps for the own contexts")
    ap.add_argument("--seq-len", type=int, default=512, help="context window (the trained seq_len)")
    ap.add_argument("--seed", type=int, default=1234, help="evaluation seed (the protocol's default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    exit_on_input_error(run, args)


def run(args: argparse.Namespace) -> None:
    module, data = load_run(args.checkpoint)
    for split in ("train", "heldout"):  # heldout: as context_td_error.py --split heldout
        by_map = diagnostics.learner_episodes(data, split, maps=args.maps)
        show(f"learner, {split}", learner_contexts(module, by_map, args.maps, args.seq_len, np.random.default_rng(0)))
    maps = checkpoint_eval_maps(args.checkpoint, eval_maps=args.eval_maps)
    show("own, greedy phase", own_contexts(module, maps, args.seq_len, args.seed))


if __name__ == "__main__":
    main()
