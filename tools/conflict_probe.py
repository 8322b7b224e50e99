"""Does a model follow the success in its context, or the most recent visit, where they disagree?

A *conflict* is an action position whose tile was last visited (in an earlier episode of the same
map) by an episode that failed, with another action than the last successful visit took
(``icrl_lightning.data.conflicts``). "Copy the nearest visit" and "follow the success" then
disagree: this is where an agent recovers after a failed episode, or locks into it.

Two views, one line per case, each with the share of actions that follow the success / the
recent visit:

* ``--report runs/.../report.json``: the in-context agent's own trials. Greedy-phase episodes
  whose first tile is a conflict, split into the first such episode of a map and later ones, and
  by whether the recent visit was in a greedy-phase episode (the agent's own replay) or in an
  exploration episode.
* ``--ckpt CKPT``: learner contexts (tabular Q-learning episodes, shuffled sets packed as in
  training, ``--maps train`` with another stream seed or ``--maps heldout`` with fresh runs on the
  held-out maps). Every conflict position of a *successful* episode (written as a success, as the
  agent writes its own), the model's greedy action against what the data did.

    python tools/conflict_probe.py --report runs/quickstart/version_0/report.json \\
        --ckpt runs/quickstart/version_0/checkpoints/last.ckpt --maps heldout
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import numpy as np

from icrl_lightning.checks import InputError, read_json_file

REPORT_KEYS = ("schedule", "last_k", "maps", "trajectories", "actions")  # what report_view reads


def report_view(path: str) -> Counter:
    """{(case, "n" / "success" / "recent"): count} over the greedy-phase episodes of a report.json."""
    c: Counter = Counter()
    r = read_json_file(path, "--report")
    missing = [k for k in REPORT_KEYS if not isinstance(r, dict) or k not in r]
    if missing:
        raise InputError(f"--report: {path} is not a report.json of the in-context evaluation "
                         f"(no {', '.join(missing)})")
    greedy_from = len(r["schedule"]) - r["last_k"]
    for rows, episodes, actions in zip(r["maps"], r["trajectories"], r["actions"], strict=True):
        w = len(rows[0])
        ok = [rows[e[-1] // w][e[-1] % w] == "G" for e in episodes]
        last, last_ok, source, seen = {}, {}, {}, False
        for k, (obs, acts) in enumerate(zip(episodes, actions, strict=True)):
            if k >= greedy_from and acts:
                s, a = obs[0], acts[0]
                if s in last and s in last_ok and last[s] != last_ok[s]:
                    key = ("first" if not seen else "later") + " conflict of a map, recent visit in " + (
                        "a greedy episode" if source[s] >= greedy_from else "an exploration episode")
                    seen = True
                    c[key, "n"] += 1
                    c[key, "success"] += a == last_ok[s]
                    c[key, "recent"] += a == last[s]
            visit = dict(zip(obs[:-1], acts, strict=True))
            last.update(visit)
            source.update(dict.fromkeys(visit, k))
            if ok[k]:
                last_ok.update(visit)
    return c


def model_view(ckpt: str, maps: str, sequences: int, seed: int, heldout_maps: int = 100) -> Counter:
    from icrl_lightning import diagnostics
    from icrl_lightning.checkpoints import load_run
    from icrl_lightning.data import conflicts, nearest_visits

    module, data = load_run(ckpt, num_workers=0)
    # train: every training map (the dataset's runs); heldout: fresh runs on the first held-out maps
    by_map = diagnostics.learner_episodes(data, maps, maps=heldout_maps if maps == "heldout" else None)
    stream = diagnostics.replay_stream(data, by_map, sequences)
    chunks = stream.chunks(np.random.default_rng([seed, 1]), sorted(stream.episodes))
    c: Counter = Counter()
    for _ in range(sequences):
        chunk = next(chunks)
        packed = stream.pack(chunk)
        greedy = diagnostics.q_values(module, packed).argmax(-1).numpy()
        row = 0
        for e, flags, (recent, success) in zip(chunk, conflicts(chunk), nearest_visits(chunk), strict=True):
            if e.rewards.sum() > 0:
                for who, acts in (("model", greedy[row:row + len(flags)]), ("data", e.actions)):
                    c[who, "n"] += int(flags.sum())
                    c[who, "success"] += int((acts == success)[flags].sum())
                    c[who, "recent"] += int((acts == recent)[flags].sum())
            row += len(flags)
    return c


def show(title: str, c: Counter) -> None:
    print(title)
    if not c:
        print("  no conflict position")
    for key in sorted({k for k, _ in c}):
        n = c[key, "n"]
        if not n:
            print(f"  {key:64s} n {n:6d}")
            continue
        print(f"  {key:64s} n {n:6d}   success {c[key, 'success'] / n:.2f}   recent {c[key, 'recent'] / n:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", help="a report.json: the agent's own trials")
    ap.add_argument("--ckpt", help="a checkpoint: the model on learner contexts")
    ap.add_argument("--maps", choices=("train", "heldout"), default="heldout",
                    help="learner contexts of the training maps or of fresh runs on the held-out maps")
    ap.add_argument("--sequences", type=int, default=360, help="packed sequences to read (--ckpt)")
    ap.add_argument("--seed", type=int, default=12345, help="seed of the set stream (--ckpt)")
    ap.add_argument("--heldout-maps", type=int, default=100, help="held-out maps played for --maps heldout (--ckpt)")
    args = ap.parse_args()
    if not args.report and not args.ckpt:
        ap.error("give --report, --ckpt or both")
    try:
        if args.report:
            show(f"agent's greedy episodes, first action ({args.report})", report_view(args.report))
        if args.ckpt:
            show(f"learner contexts ({args.maps} maps), successful episodes, every conflict position",
                 model_view(args.ckpt, args.maps, args.sequences, args.seed, args.heldout_maps))
    except InputError as err:  # a missing or unreadable report or checkpoint: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
