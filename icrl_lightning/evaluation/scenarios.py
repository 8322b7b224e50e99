"""The evaluation scenarios: which maps a batch plays, with what schedule, map switch and
prefilled context (SPEC "Evaluation protocol": in-distribution, OOD and user maps are the
``standard`` scenario on different maps; ``nonstationary``; behaviour ``stitching``)."""

from __future__ import annotations

from dataclasses import dataclass

from icrl_lightning.envs.frozen_lake import Map, path_steps
from icrl_lightning.envs.stitching import load_stitching_layouts
from icrl_lightning.episodes import Episode
from icrl_lightning.evaluation.protocol import EvalProtocol
from icrl_lightning.serialize import Serializer


@dataclass
class Plan:
    """What one batch plays: ``maps[i]`` (report index ``index[i]``) for the schedule, then, when
    ``switch_to`` is set, ``switch_to[i]`` for the schedule again; ``context[i]``: the episodes
    prefilled in map ``i``'s context."""

    index: list[int]
    maps: list[Map]
    schedule: list[float]
    switch_to: list[Map] | None = None
    context: list[list[Episode]] | None = None

    @property
    def phases(self) -> int:
        return 1 if self.switch_to is None else 2


def path_episode(rows: Map, path: list[int], where: str = "stitching context") -> Episode:
    """A tile path on ``rows`` as an episode (see ``frozen_lake.path_steps``)."""
    actions, rewards, terminated, truncated = path_steps(rows, path, where)
    return Episode(list(path), actions, rewards, terminated, truncated, map_rows=tuple(rows))


def stitching_setup(protocol: EvalProtocol) -> list[tuple[Map, list[Episode]]]:
    """(map, context episodes) of each layout of the stitching scenario, from
    ``protocol.stitching_file``."""
    return [(rows, [path_episode(rows, p, f"stitching layout {j}, context {i}") for i, p in enumerate(paths)])
            for j, (rows, paths) in enumerate(load_stitching_layouts(protocol.stitching_file))]


def context_tokens(serializer: Serializer, episodes: list[Episode]) -> list[list[int]]:
    """Token ids of each context episode, exactly as the agent would have written them."""
    return [serializer.encode(e).ids.tolist() for e in episodes]


def make_plan(protocol: EvalProtocol, batch: list[tuple[int, Map]],
              default_schedule: list[float] | None = None) -> Plan:
    """The plan of ``protocol.scenario`` for a batch of ``(index, rows)`` evaluation maps;
    ``default_schedule``: the problem family's (the paper's when not given)."""
    schedule = protocol.greedy_probs(default_schedule)
    index = [int(i) for i, _ in batch]
    maps = [tuple(m) for _, m in batch]
    if protocol.scenario == "standard":
        return Plan(index, maps, schedule)
    if protocol.scenario == "nonstationary":
        if len(maps) < 2:
            raise ValueError("model.evaluation.scenario=nonstationary needs at least two evaluation maps per device "
                             f"(map B is the next map of the batch); got {len(maps)}: raise data.eval_maps")
        return Plan(index, maps, schedule, switch_to=maps[1:] + maps[:1])
    # Each layout is played stitching_trials times in a row; trial i is index i of the report.
    trials = [layout for layout in stitching_setup(protocol) for _ in range(protocol.stitching_trials)]
    return Plan(list(range(len(trials))), [rows for rows, _ in trials], schedule, context=[c for _, c in trials])
