"""Print the scalars of a TensorBoard run: ``python tools/tb_scalars.py runs/quickstart/version_0 [tag-prefix]``."""

import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) not in (2, 3):
        print(f"usage: python {sys.argv[0]} RUN_FOLDER_OR_EVENT_FILE [tag-prefix]", file=sys.stderr)
        raise SystemExit(2)
    run = sys.argv[1]
    prefix = sys.argv[2] if len(sys.argv) > 2 else ""
    if not Path(run).exists():
        print(f"error: {run} does not exist", file=sys.stderr)
        raise SystemExit(2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = sorted(acc.Tags()["scalars"])
    if not tags:
        print(f"error: {run} holds no TensorBoard scalars (give a run's version_N folder or an event file)",
              file=sys.stderr)
        raise SystemExit(2)
    for tag in tags:
        if not tag.startswith(prefix):
            continue
        events = acc.Scalars(tag)
        tail = ", ".join(f"{e.step}:{e.value:.4g}" for e in events[-5:])
        print(f"{tag} ({len(events)} points) ... {tail}")


if __name__ == "__main__":
    main()
