"""Print the scalars of a TensorBoard run: every tag, its number of points and its last five
``step:value`` pairs.

    python tools/tb_scalars.py runs/quickstart/version_0 [tag-prefix]
"""

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run's version_N folder (e.g. runs/quickstart/version_0) or one event file")
    ap.add_argument("prefix", nargs="?", default="", help="print only the tags that start with this (e.g. train/)")
    args = ap.parse_args()
    run, prefix = args.run, args.prefix
    if not Path(run).exists():
        ap.exit(2, f"error: {run} does not exist\n")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["scalars"])
    if not tags:
        ap.exit(2, f"error: {run} holds no TensorBoard scalars (give a run's version_N folder or an event file)\n")
    for tag in tags:
        if not tag.startswith(prefix):
            continue
        events = acc.Scalars(tag)
        tail = ", ".join(f"{e.step}:{e.value:.4g}" for e in events[-5:])
        print(f"{tag} ({len(events)} points) ... {tail}")


if __name__ == "__main__":
    main()
