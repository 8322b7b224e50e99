"""Writes Frozen Lake maps from gymnasium's own generator (``generate_random_map``: square, the start
in the top-left corner, the goal in the bottom-right one, each other tile a hole with probability
``--holes``), not the project's, for checking a checkpoint on maps no recipe was chosen on:

    python tools/gym_maps.py --sizes 3-5 --out /tmp/gym_3_5.json
    python tools/gym_maps.py --sizes 6-7 --out /tmp/gym_6_7.json
    python -m icrl_lightning validate -c conf/experiment/quickstart.yaml \\
        -c conf/experiment/eval_user_maps.yaml --data.eval_map_file /tmp/gym_3_5.json --ckpt_path ...

Every map has a path from start to goal (the generator's own check). The output is deterministic
in the arguments; the defaults wrote ``data/gym_maps.json`` (sides 3-5) and ``data/gym_maps_ood.json``
(sides 6-7), which ``conf/experiment/eval_gym.yaml`` and ``eval_gym_ood.yaml`` play.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from icrl_lightning.checks import InputError, check_range, exit_on_input_error


def gym_maps(n: int = 50, sizes: tuple[int, int] = (3, 5), holes: float = 0.2, seed: int = 0) -> list[list[str]]:
    """``n`` maps, each of a side drawn uniformly from ``sizes`` (inclusive)."""
    check_range("--n", n, 1, None)
    if not 2 <= sizes[0] <= sizes[1]:
        raise InputError(f"--sizes={sizes[0]}-{sizes[1]}: expected 2 <= smallest side <= largest side")
    check_range("--holes", holes, 0.0, 0.9)
    rng = np.random.default_rng(seed)
    sides = rng.integers(sizes[0], sizes[1] + 1, size=n)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    pairs = zip(sides, seeds, strict=True)
    return [list(generate_random_map(size=int(s), p=1.0 - holes, seed=int(k))) for s, k in pairs]


def dumps(maps: list[list[str]]) -> str:
    """One map per line, so that a diff of the file reads map by map."""
    return "[\n" + ",\n".join(json.dumps(m) for m in maps) + "\n]\n"


def _sizes(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise InputError(f"--sizes={text!r}: expected a side (5) or a range (3-5)") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="how many maps (default 50)")
    ap.add_argument("--sizes", type=_sizes, default=(3, 5), help="side or range of sides, e.g. 3-5 (default) or 6-7")
    ap.add_argument("--holes", type=float, default=0.2, help="probability of a hole on each other tile (default 0.2)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sides and the generator (default 0)")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write (a list of maps, rows as strings)")
    args = ap.parse_args(argv)
    maps = exit_on_input_error(gym_maps, args.n, args.sizes, args.holes, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(maps))
    print(f"wrote {len(maps)} maps of sides {args.sizes[0]}..{args.sizes[1]} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
