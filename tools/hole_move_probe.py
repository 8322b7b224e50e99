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

Then the exploration the found share depends on: at every decision of the same trials before the
map's goal was first reached (exploration episodes, whichever action was then drawn), the kind of
move the greedy action is, by what the trial showed so far on that tile: ``hole`` (the move ended
in a hole), ``wall`` (it left the agent on its tile), ``safe`` (it led to another tile), ``untried``;
beside the shares a uniform choice would give, and each kind's mean Q less the row's mean. A
model that explores from its context picks ``hole`` below the uniform share and ``untried`` above.

The same question on contexts like the training data (``learner, heldout`` below): at every
action position on a tile where the sequence has shown some moves but not all, the mean Q of the
untried moves less that of the tried ones, and how often the greedy move is untried against the
untried share; for all such positions, and for those before the sequence's first success. A model
whose Q reads "not tried yet" from its context gives the untried moves a higher Q there.

Outcome-tagged formats (``compact_outcome``) also get the tag check: on the held-out learner
contexts, the mean Q of the moves of failed episodes with the episode's own tags in view (as the
replay stream trains them) and without (as the agent sees an episode while it plays it), beside
successful episodes'. A large gap means the model reads the episode's outcome
from its own tags rather than from the context (docs/results.md, "The outcome tags told the model
its own episode's outcome").

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


def is_hole(rows, tile: int) -> bool:
    return rows[tile // len(rows[0])][tile % len(rows[0])] == "H"


def ends_in_hole(rows, observations, actions) -> bool:
    return bool(actions) and is_hole(rows, observations[-1])


def learner_contexts(module, by_map, n_maps: int, seq_len: int, rng) -> tuple[dict, dict]:
    """Over learner contexts (packed by ``icrl_lightning.diagnostics.single_map_sequences``, as
    ``context_td_error.py`` packs them): {times seen before (capped at 3): [(Q of the hole move,
    best other Q)]}, and ``untried_against_tried`` pooled over the same sequences."""
    out, novelty = defaultdict(list), {"all": defaultdict(list), "before goal": defaultdict(list)}
    for seq in diagnostics.single_map_sequences(by_map, module.serializer, seq_len, rng, maps=n_maps):
        if not seq.episodes:
            continue
        rows, seen = seq.episodes[0].map_rows, defaultdict(int)
        q_rows = diagnostics.q_values(module, seq.batch).numpy()
        untried_against_tried(seq.episodes, q_rows, novelty)
        last_q = q_rows[np.flatnonzero(seq.batch["done"])]  # last moves
        for e, q in zip(seq.episodes, last_q, strict=True):
            if e.terminated and ends_in_hole(rows, e.observations, e.actions):
                key, a = (e.observations[-2], e.actions[-1]), e.actions[-1]
                out[min(seen[key], 3)].append((q[a], np.delete(q, a).max()))
                seen[key] += 1
    return out, novelty


def own_trials(module, maps, seq_len: int, seed: int):
    """The model's own protocol trials on ``maps``, with the Q row of every decision."""
    agent = InContextAgent(module.acting_network(), module.serializer, max_context=seq_len)
    with torch.no_grad():
        return agent.play(maps, paper_schedule(), seed, record_q=True, keys=list(range(len(maps))))


def own_contexts(trial, maps) -> dict:
    """The same over the model's own protocol trials, greedy phase only: at every greedy decision on
    a tile where a move has already ended in a hole in this trial (the move taken or not)."""
    schedule = paper_schedule()
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


def own_tags(module, by_map, n_maps: int, seq_len: int, rng) -> dict[str, list[float]]:
    """{"failed, own tags", "failed, untagged", "successful"}: the mean Q of the taken moves of each
    episode of the learner contexts, its context being the episodes packed before it (as they stand)."""
    s, untag = module.serializer, module.serializer.untag_table()
    out = defaultdict(list)
    for seq in diagnostics.single_map_sequences(by_map, s, seq_len, rng, maps=n_maps):
        ids, at = seq.batch["input_ids"][0].tolist(), 0
        for e in seq.episodes:
            enc = s.encode(e)
            versions = {"successful": enc.ids} if enc.success else {"failed, own tags": enc.ids,
                                                                    "failed, untagged": untag[enc.ids]}
            for name, own in versions.items():
                x = torch.tensor([ids[:at] + own.tolist()])
                mask = torch.zeros_like(x, dtype=torch.bool)
                mask[0, torch.from_numpy(enc.q_pos.astype(np.int64)) + at] = True
                q = diagnostics.q_values(module, {"input_ids": x, "q_mask": mask}).numpy()
                out[name].append(float(q[np.arange(len(q)), enc.actions].mean()))
            at += len(enc)
    return out


def untried_against_tried(episodes, q_rows: np.ndarray, out: dict | None = None) -> dict[str, dict[str, list[float]]]:
    """Over one packed sequence of one map (``episodes`` in order, ``q_rows`` one Q row per action):
    at every position whose tile has tried and untried moves in the sequence so far, {"gap": mean Q
    of the untried less that of the tried, "argmax": whether the greedy move is untried, "uniform":
    the untried share}, under "all" and, until the sequence's first success, "before goal";
    appended to ``out`` (a new table if None), which is returned."""
    actions = sum(len(e.actions) for e in episodes)
    if actions != len(q_rows):
        raise ValueError(f"{len(q_rows)} Q rows for {actions} actions")
    if out is None:
        out = {"all": defaultdict(list), "before goal": defaultdict(list)}
    t, tried, found = 0, set(), False
    for e in episodes:
        for tile, action in zip(e.tiles, e.actions, strict=True):
            row = q_rows[t]
            untried = [a for a in range(len(row)) if (tile, a) not in tried]
            if 0 < len(untried) < len(row):
                seen = [a for a in range(len(row)) if a not in untried]
                for key in ("all", "before goal") if not found else ("all",):
                    out[key]["gap"].append(float(np.mean(row[untried]) - np.mean(row[seen])))
                    out[key]["argmax"].append(float(int(np.argmax(row)) in untried))
                    out[key]["uniform"].append(len(untried) / len(row))
            tried.add((tile, action))
            t += 1
        found = found or e.success
    return out


KINDS = ("hole", "wall", "safe", "untried")


def before_goal(trial, maps) -> tuple[int, dict, dict, dict]:
    """(decisions, greedy share per kind, uniform share per kind, mean Q less the row mean per kind)
    over every decision before the map's goal was first reached (see the module docstring)."""
    greedy, uniform, gap, n = defaultdict(float), defaultdict(float), defaultdict(list), 0
    for i, rows in enumerate(maps):
        known, t = {}, 0
        for e in trial.episodes[i]:
            obs, acts = e.observations, e.actions
            for j in range(len(acts)):
                q = trial.q_values[i][t + j]
                kinds = [known.get((obs[j], a), "untried") for a in range(4)]
                greedy[kinds[int(np.argmax(q))]] += 1
                for kind in kinds:
                    uniform[kind] += 0.25
                for kind in set(kinds):
                    gap[kind].append(np.mean([q[a] for a in range(4) if kinds[a] == kind]) - q.mean())
                n += 1
                nxt = obs[j + 1]
                known[(obs[j], acts[j])] = "hole" if is_hole(rows, nxt) else "wall" if nxt == obs[j] else "safe"
            t += len(acts)
            if e.success:
                break
    return (n, {k: greedy[k] / max(n, 1) for k in KINDS}, {k: uniform[k] / max(n, 1) for k in KINDS},
            {k: float(np.mean(gap[k])) if gap[k] else float("nan") for k in KINDS})


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
        holes, novelty = learner_contexts(module, by_map, args.maps, args.seq_len, np.random.default_rng(0))
        show(f"learner, {split}", holes)
        if split == "heldout" and module.serializer.outcome_tags:
            tags = own_tags(module, by_map, args.maps, args.seq_len, np.random.default_rng(0))
            print("learner, heldout   Q of the taken moves: " + ", ".join(
                f"{k} {np.mean(v):.2f} (n={len(v)})" for k, v in tags.items()))
        if split == "heldout":
            for key, t in novelty.items():
                if t["gap"]:
                    print(f"learner, heldout   {key:11s} n={len(t['gap']):5d}  Q(untried) - Q(tried) "
                          f"{np.mean(t['gap']):+.2f}  argmax untried {np.mean(t['argmax']):.3f} "
                          f"(uniform {np.mean(t['uniform']):.3f})")
    maps = checkpoint_eval_maps(args.checkpoint, eval_maps=args.eval_maps)
    trial = own_trials(module, maps, args.seq_len, args.seed)
    show("own, greedy phase", own_contexts(trial, maps))
    n, greedy, uniform, gap = before_goal(trial, maps)
    print(f"own, before the goal: {n} decisions; kind of the greedy move (uniform share, mean Q less the row mean)")
    for k in KINDS:
        print(f"  {k:8s} {greedy[k]:.3f} ({uniform[k]:.3f}, {gap[k]:+.2f})")


if __name__ == "__main__":
    main()
