"""Print the scalars of a TensorBoard run: ``python tools/tb_scalars.py runs/quickstart/version_0 [tag-prefix]``."""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    run = sys.argv[1]
    prefix = sys.argv[2] if len(sys.argv) > 2 else ""
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    for tag in sorted(acc.Tags()["scalars"]):
        if not tag.startswith(prefix):
            continue
        events = acc.Scalars(tag)
        tail = ", ".join(f"{e.step}:{e.value:.4g}" for e in events[-5:])
        print(f"{tag} ({len(events)} points) ... {tail}")


if __name__ == "__main__":
    main()
