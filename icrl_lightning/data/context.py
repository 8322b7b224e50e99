"""Context analysis of a packed sequence: what earlier episodes of the same map did on a tile.

The greedy phase of an evaluation recovers after a failed episode only where the model follows
the last *successful* visit of a tile rather than the most recent one; ``conflicts`` marks the
positions where the two disagree (``model.td.conflict_weight`` upweights them).
``teacher_actions`` labels each position with what an optimistic tabular learner replaying the
context would try next (``model.teacher``)."""

from __future__ import annotations

import numpy as np

from icrl_lightning.behaviour import TabularQLearner
from icrl_lightning.serialize import EncodedEpisode

# The teacher: the q_optimistic evaluation baseline's learner (behaviour.TabularQLearner).
TEACHER_Q_INIT, TEACHER_LR, TEACHER_GAMMA = 1.0, 0.5, 0.9


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


def teacher_actions(chunk: list[EncodedEpisode], n_actions: int, q_init: float = TEACHER_Q_INIT,
                    lr: float = TEACHER_LR, gamma: float = TEACHER_GAMMA) -> list[np.ndarray]:
    """Per episode of a packed sequence, ``[steps, n_actions]`` bool: at each step, the greedy
    actions (all ties) of a tabular Q-learner that starts every entry at ``q_init`` and has
    learned from every earlier step of the same map in the sequence, in order; all False from the
    step after the sequence first reaches a goal on that map (a positive reward; the learner is not
    replayed further), and throughout for an episode of an unknown map (``map_id < 0``). Every
    episode end is terminal (the double-DQN loss does not bootstrap across one either)."""
    size = max((int(e.tiles.max()) + 1 for e in chunk if len(e.tiles)), default=1)
    learners: dict[int, TabularQLearner] = {}
    found: set[int] = set()
    out = []
    for e in chunk:
        labels = np.zeros((len(e.actions), n_actions), dtype=bool)
        out.append(labels)
        if e.map_id < 0 or e.map_id in found:
            continue
        if e.map_id not in learners:
            learners[e.map_id] = TabularQLearner(size, lr=lr, gamma=gamma, q_init=q_init, n_actions=n_actions)
        learner = learners[e.map_id]
        tiles, actions, rewards = e.tiles, e.actions, e.rewards
        for t in range(len(actions)):
            s, r = int(tiles[t]), float(rewards[t])
            row = learner.q[s]
            labels[t] = row == row.max()
            if r > 0:
                found.add(e.map_id)
                break
            last = t + 1 == len(actions)
            learner.update(s, int(actions[t]), r, s if last else int(tiles[t + 1]), terminated=last)
    return out
