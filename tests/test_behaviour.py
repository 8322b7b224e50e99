"""The tabular Q-learner that generates the offline data (``data.behaviour_*``)."""

from __future__ import annotations

import pytest

from icrl_lightning.behaviour import q_learning_run

# Holes beside the start and along the way: a learner that does not learn from a hole falls in again.
MAP = ("SFFH", "FHFF", "FFHF", "HFFG")


def _hole_moves(episodes, rows=MAP) -> list[tuple[int, int]]:
    """(state, action) of every move that ended an episode in a hole, in the order played."""
    w = len(rows[0])
    return [(e.observations[-2], e.actions[-1]) for e in episodes
            if e.terminated and rows[e.observations[-1] // w][e.observations[-1] % w] == "H"]


def test_optimistic_learner_never_repeats_a_move_into_a_hole():
    moves = _hole_moves(q_learning_run(MAP, 0, 60, seed=0, epsilon=0.0, lr=1.0, q_init=1.0))
    assert moves and len(set(moves)) == len(moves)
    # The default zero-initialised table learns nothing from a hole (reward 0, like an untried move).
    zero = _hole_moves(q_learning_run(MAP, 0, 60, seed=0, epsilon=0.0, lr=1.0))
    assert len(set(zero)) < len(zero)


def test_protocol_trials_restart_the_learner_and_use_the_schedule_as_greedy_probability():
    greedy = q_learning_run(MAP, 0, 40, seed=0, lr=1.0, q_init=1.0, schedule=[1.0] * 10)
    assert [e.learner_episode for e in greedy] == list(range(40))
    trials = [_hole_moves(greedy[t * 10:(t + 1) * 10]) for t in range(4)]
    for moves in trials:  # one learner within a trial: never the same hole move twice
        assert len(set(moves)) == len(moves)
    every = [m for moves in trials for m in moves]
    assert len(set(every)) < len(every)  # a fresh learner per trial falls in again
    # Greedy probability 0: uniform random moves, so the same hole move comes back within a trial.
    random = _hole_moves(q_learning_run(MAP, 0, 20, seed=0, lr=1.0, q_init=1.0, schedule=[0.0] * 20))
    assert len(set(random)) < len(random)


@pytest.mark.parametrize("q_init", [0.0, 1.0])
def test_constant_schedule_data_is_unchanged_by_the_new_options(q_init):
    """``schedule=None`` is one run (the original data); ``q_init`` only changes the table."""
    a = q_learning_run(MAP, 0, 30, seed=3, q_init=q_init)
    b = q_learning_run(MAP, 0, 30, seed=3, q_init=q_init, schedule=None)
    assert [e.actions for e in a] == [e.actions for e in b]


def test_mixed_schedule_is_one_learner_with_greedy_probabilities_drawn_from_the_schedule():
    mixed = q_learning_run(MAP, 0, 120, seed=0, lr=1.0, q_init=1.0, schedule=[0.0, 1.0], sample_schedule=True)
    assert [e.learner_episode for e in mixed] == list(range(120))
    # One learner: once it has found the goal its greedy episodes succeed, while the episodes
    # drawn with greedy probability 0 are random walks that mostly fail.
    late = mixed[60:]
    assert 0.2 < sum(e.success for e in late) / len(late) < 0.9
    # The same schedule as trials (fresh learners) differs, and the seed decides the run.
    trials = q_learning_run(MAP, 0, 120, seed=0, lr=1.0, q_init=1.0, schedule=[0.0, 1.0])
    assert [e.actions for e in trials] != [e.actions for e in mixed]
    again = q_learning_run(MAP, 0, 120, seed=0, lr=1.0, q_init=1.0, schedule=[0.0, 1.0], sample_schedule=True)
    assert [e.actions for e in again] == [e.actions for e in mixed]
