"""The evaluation scenarios: which maps a batch plays, with what schedule, map switch and
prefilled context (SPEC "Evaluation protocol": in-distribution, OOD and user maps are the
``standard`` scenario on different maps; ``nonstationary``; behaviour ``stitching``)."""

from __future__ import annotations

from dataclasses import dataclass

from icrl_lightning.envs.frozen_lake import _MOVES, STITCHING_MAP, Map, validate_map
from icrl_lightning.evaluation.protocol import ContextEpisode, EvalProtocol
from icrl_lightning.serialize import Serializer

# SPEC "Behaviour stitching": a path to the goal from tile 2, and one from the start (8) into a hole.
STITCHING_CONTEXT = ((2, 6, 10, 14, 18, 22), (8, 9, 10, 11))


@dataclass
class Plan:
    """What one batch plays: ``maps[i]`` (report index ``index[i]``) for the schedule, then, when
    ``switch_to`` is set, ``switch_to[i]`` for the schedule again; ``context`` is prefilled."""

    index: list[int]
    maps: list[Map]
    schedule: list[float]
    switch_to: list[Map] | None = None
    context: list[ContextEpisode] | None = None

    @property
    def phases(self) -> int:
        return 1 if self.switch_to is None else 2


def path_episode(rows: Map, path: list[int], where: str = "stitching_context") -> ContextEpisode:
    """A tile path on ``rows`` as an episode: each move's action, reward 1.0 on reaching a goal,
    terminated on a goal or hole (which must be the last tile), else truncated."""
    nrow, ncol = len(rows), len(rows[0])
    if len(path) < 2:
        raise ValueError(f"{where}: path {list(path)} needs at least two tiles")
    bad = [t for t in path if not 0 <= t < nrow * ncol]
    if bad:
        raise ValueError(f"{where}: tiles {bad} are outside the {nrow}x{ncol} map")
    actions, rewards = [], []
    for t, (a_tile, b_tile) in enumerate(zip(path, path[1:], strict=False)):
        letter = rows[a_tile // ncol][a_tile % ncol]
        if letter in "HG":
            raise ValueError(f"{where}: path {list(path)} goes on after tile {a_tile} ({letter!r}, terminal)")
        r, c = divmod(a_tile, ncol)
        moves = [a for a, (dr, dc) in enumerate(_MOVES)
                 if min(max(r + dr, 0), nrow - 1) * ncol + min(max(c + dc, 0), ncol - 1) == b_tile]
        if not moves:
            raise ValueError(f"{where}: no single move leads from tile {a_tile} to tile {b_tile} "
                             f"(step {t} of path {list(path)})")
        actions.append(moves[0])
        rewards.append(1.0 if rows[b_tile // ncol][b_tile % ncol] == "G" else 0.0)
    end = rows[path[-1] // ncol][path[-1] % ncol]
    return ContextEpisode(observations=list(path), actions=actions, rewards=rewards,
                          terminated=end in "HG", truncated=end not in "HG")


def stitching_setup(protocol: EvalProtocol) -> tuple[Map, list[ContextEpisode]]:
    """(map, context episodes) of the stitching scenario."""
    rows = validate_map(protocol.stitching_map, "model.evaluation.stitching_map") if protocol.stitching_map \
        else STITCHING_MAP
    paths = protocol.stitching_context or [list(p) for p in STITCHING_CONTEXT]
    return rows, [path_episode(rows, p, f"model.evaluation.stitching_context[{i}]") for i, p in enumerate(paths)]


def context_tokens(serializer: Serializer, episodes: list[ContextEpisode]) -> list[list[int]]:
    """Token ids of each context episode, exactly as the agent would have written them."""
    return [serializer.episode(e.observations, e.actions, e.rewards, e.terminated, e.truncated).ids.tolist()
            for e in episodes]


def make_plan(protocol: EvalProtocol, batch: list[tuple[int, Map]]) -> Plan:
    """The plan of ``protocol.scenario`` for a batch of ``(index, rows)`` evaluation maps."""
    schedule = protocol.greedy_probs()
    index = [int(i) for i, _ in batch]
    maps = [tuple(m) for _, m in batch]
    if protocol.scenario == "standard":
        return Plan(index, maps, schedule)
    if protocol.scenario == "nonstationary":
        if len(maps) < 2:
            raise ValueError("model.evaluation.scenario=nonstationary needs at least two evaluation maps per device "
                             f"(map B is the next map of the batch); got {len(maps)}: raise data.eval_maps")
        return Plan(index, maps, schedule, switch_to=maps[1:] + maps[:1])
    rows, context = stitching_setup(protocol)
    n = protocol.stitching_trials
    return Plan(list(range(n)), [rows] * n, schedule, context=context)
