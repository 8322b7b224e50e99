"""Writes many behaviour-stitching layouts (``icrl_lightning.envs.stitching.make_layout``) built on
Frozen Lake maps that no run is scored on: by default the held-out maps 150..199 of
``data.split_seed`` 0 (maps 0..49 are the reported held-out maps, 50..149 the selection maps).
A layout moves the map's start and goal, so its map is a new one; layouts whose map is a training
map of seeds 0-6 with 2,500 training maps (the quickstart's) are dropped.

    python tools/make_stitching_layouts.py                     # writes data/stitching_layouts.json
    python tools/make_stitching_layouts.py --split ood --out /tmp/ood_layouts.json

Each layout: one start, one goal, a failed context episode from the start that leaves a shortest
path into a hole beside it, and a successful one that joins that path from another tile. The
file is played by ``conf/experiment/eval_stitching_layouts.yaml``. The output is deterministic in
the arguments; ``tests/test_stitching.py`` checks that the committed file is this tool's default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from icrl_lightning.checks import InputError, check_choice, check_range
from icrl_lightning.envs.frozen_lake import RESERVED_EVAL_MAPS, make_splits
from icrl_lightning.envs.stitching import make_layouts

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "stitching_layouts.json"


def layouts(split: str = "heldout", first: int = 150, last: int = 199, split_seed: int = 0, seed: int = 0,
            per_map: int = 2, train_seeds: tuple[int, ...] = tuple(range(7)), train_maps: int = 2500) -> list[dict]:
    """The layouts of maps ``first..last`` of ``split`` (Frozen Lake's default generator), none on a
    training map of ``train_seeds`` x ``train_maps``."""
    check_choice("--split", split, ("heldout", "ood"))
    check_range("--first", first, 0, RESERVED_EVAL_MAPS - 1)
    check_range("--last", last, first, RESERVED_EVAL_MAPS - 1, why="last >= first")
    check_range("--per-map", per_map, 1, None)
    check_range("--train-maps", train_maps, 0, None)
    terrains = getattr(make_splits(split_seed, 0), split)[first:last + 1]
    train = frozenset(m for s in train_seeds for m in make_splits(s, train_maps, split_seed).train)
    return make_layouts(terrains, n=per_map * len(terrains), seed=seed, per_terrain=per_map, exclude=train)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            return tuple(range(lo, hi + 1))
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--train-seeds={text!r}: expected a-b or comma-separated integers") from None


def dumps(items: list[dict]) -> str:
    """One layout per line, so that a diff of the file reads layout by layout."""
    return "[\n" + ",\n".join(json.dumps(x) for x in items) + "\n]\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="heldout", help="heldout (3..5 maps) or ood (6..7 maps)")
    ap.add_argument("--first", type=int, default=150, help="first map of the split used (0-based)")
    ap.add_argument("--last", type=int, default=199, help="last map of the split used (inclusive)")
    ap.add_argument("--split-seed", type=int, default=0, help="data.split_seed of the maps")
    ap.add_argument("--seed", type=int, default=0, help="seeds the draw of starts, goals and split tiles")
    ap.add_argument("--per-map", type=int, default=2, help="at most this many distinct layouts per map")
    ap.add_argument("--train-seeds", default="0-6",
                    help="drop layouts on a training map of these data.seed values (a-b or comma-separated)")
    ap.add_argument("--train-maps", type=int, default=2500, help="data.num_train_maps of those seeds")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON file to write")
    args = ap.parse_args(argv)
    try:
        seeds = _seeds(args.train_seeds)
        items = layouts(args.split, args.first, args.last, args.split_seed, args.seed, args.per_map, seeds,
                        args.train_maps)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.out).write_text(dumps(items))
    print(f"wrote {len(items)} layouts from {args.last - args.first + 1} {args.split} maps to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
