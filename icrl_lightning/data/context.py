"""Context analysis of a packed sequence: what earlier episodes of the same map did on a tile.

The greedy phase of an evaluation recovers after a failed episode only where the model follows
the last *successful* visit of a tile rather than the most recent one; ``conflicts`` marks the
positions where the two disagree (``model.td.conflict_weight`` upweights them)."""

from __future__ import annotations

import numpy as np

from icrl_lightning.serialize import EncodedEpisode


def nearest_visits(chunk: list[EncodedEpisode]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per episode of a packed sequence, per action: the action taken at the most recent visit of
    that tile among the earlier episodes of the sequence on the same map, and the same among the
    successful ones only (-1 where there is none). -1 throughout for an episode of an unknown map."""
    last: dict[tuple[int, int], int] = {}  # (map, tile) -> action of the most recent visit
    last_ok: dict[tuple[int, int], int] = {}  # the same, successful episodes only
    out = []
    for e in chunk:
        if e.map_id < 0:
            out.append((np.full(len(e.actions), -1), np.full(len(e.actions), -1)))
            continue
        keys = [(e.map_id, int(t)) for t in e.tiles]
        out.append((np.array([last.get(k, -1) for k in keys], dtype=np.int64),
                    np.array([last_ok.get(k, -1) for k in keys], dtype=np.int64)))
        visit = {k: int(a) for k, a in zip(keys, e.actions, strict=True)}  # the last action on each tile
        last.update(visit)
        if e.success:
            last_ok.update(visit)
    return out


def conflicts(chunk: list[EncodedEpisode]) -> list[np.ndarray]:
    """Per episode of a packed sequence, per action: whether the most recent visit of that tile
    (``nearest_visits``) failed and took another action than the most recent successful visit.
    There "copy the nearest visit" and "follow the success" disagree, the case that decides
    whether the agent recovers after a failed episode."""
    return [(recent >= 0) & (success >= 0) & (recent != success) for recent, success in nearest_visits(chunk)]
