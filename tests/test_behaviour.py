"""The tabular Q-learner that generates the offline data (``data.behaviour``: ``QLearning``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from icrl_lightning.behaviour import Behaviour, QLearning, TabularQLearner, play_episode, q_learning_run
from icrl_lightning.checks import InputError
from icrl_lightning.envs import FrozenLake, make_env
from icrl_lightning.episodes import Episode

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


def test_run_is_one_learner_whose_episodes_are_records_of_the_map():
    eps = q_learning_run(MAP, 5, 40, seed=[0, 3, 5], lr=1.0, q_init=1.0)
    assert all(isinstance(e, Episode) for e in eps)
    assert [e.learner_episode for e in eps] == list(range(40))
    assert all(e.map_id == 5 and e.map_rows == MAP for e in eps)
    assert all(e.terminated != e.truncated for e in eps)
    assert all(e.observations[0] == 0 for e in eps)  # the only start tile
    # One learner for the whole run: once it has found the goal, its (mostly greedy) episodes succeed.
    assert not eps[0].success and sum(e.success for e in eps[-10:]) >= 8
    # The seed decides the run.
    again = q_learning_run(MAP, 5, 40, seed=[0, 3, 5], lr=1.0, q_init=1.0)
    assert [e.actions for e in again] == [e.actions for e in eps]
    other = q_learning_run(MAP, 5, 40, seed=[0, 3, 6], lr=1.0, q_init=1.0)
    assert [e.actions for e in other] != [e.actions for e in eps]


def test_time_limit_truncates_the_behaviours_episodes():
    eps = q_learning_run(("SF", "FF", "FG"), 0, 5, seed=0, epsilon=1.0, max_episode_steps=3)
    assert all(len(e.actions) <= 3 for e in eps)
    assert any(e.truncated and len(e.actions) == 3 for e in eps)


@pytest.mark.parametrize("q_init", [0.0, 1.0])
def test_qlearning_behaviour_is_the_q_learning_run(q_init):
    """``QLearning.run`` plays exactly ``q_learning_run`` with its settings (the dataset's episodes)."""
    b = QLearning(epsilon=0.2, lr=0.7, gamma=0.8, q_init=q_init)
    assert isinstance(b, Behaviour)
    got = b.run(FrozenLake(max_episode_steps=20), MAP, 3, 30, seed=[0, 3, 3])
    want = q_learning_run(MAP, 3, 30, seed=[0, 3, 3], epsilon=0.2, lr=0.7, gamma=0.8, max_episode_steps=20,
                          q_init=q_init)
    assert got == want
    # Defaults: epsilon 0.1, lr 0.5, gamma 0.9, q_init 0 (the original data).
    assert QLearning().run(FrozenLake(), MAP, 0, 30, seed=3) == q_learning_run(MAP, 0, 30, seed=3)


def test_qlearning_settings_key_the_dataset():
    assert QLearning().settings() == {"learner": "tabular_q", "behaviour_epsilon": 0.1, "behaviour_lr": 0.5,
                                      "behaviour_gamma": 0.9}
    # q_init was added later: only a non-default value enters the key, so older datasets keep their folder.
    assert QLearning(q_init=1.0).settings() == {**QLearning().settings(), "behaviour_q_init": 1.0}
    assert QLearning(epsilon=0.3).settings()["behaviour_epsilon"] == 0.3
    assert repr(QLearning(lr=1.0)) == "QLearning(epsilon=0.1, lr=1.0, gamma=0.9, q_init=0.0, history=None)"
    with pytest.raises(NotImplementedError):
        Behaviour().settings()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": 1.5}, r"data\.behaviour\.epsilon=1\.5 is out of range: allowed \[0, 1\]"),
        ({"epsilon": -0.1}, r"data\.behaviour\.epsilon=-0\.1"),
        ({"lr": 0.0}, r"data\.behaviour\.lr=0\.0 is out of range: allowed \(0, 1\]"),
        ({"lr": 1.1}, r"data\.behaviour\.lr=1\.1"),
        ({"gamma": 2}, r"data\.behaviour\.gamma=2 is out of range"),
        ({"q_init": -1.0}, r"data\.behaviour\.q_init=-1\.0 is out of range.*optimistic"),
        ({"epsilon": float("nan")}, r"data\.behaviour\.epsilon=nan"),
    ],
)
def test_qlearning_checks_its_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        QLearning(**kwargs)


def test_play_episode_returns_a_frozen_episode_with_the_given_fields():
    env = make_env(("SFG",))
    moves = iter([2, 2])
    rng = np.random.default_rng(0)
    learner = TabularQLearner(3, lr=1.0, rng=rng)
    e = play_episode(env, lambda obs: next(moves), rng, learner, map_id=4, map_rows=("SFG",), learner_episode=9)
    env.close()
    assert e == Episode([0, 1, 2], [2, 2], [0.0, 1.0], True, False, map_id=4, map_rows=("SFG",), learner_episode=9)
    assert e.success and e.ret == 1.0 and e.tiles == [0, 1]
    assert learner.q[1, 2] == 1.0 and learner.q[0, 2] == 0.0  # learnt from every step, in order
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.map_id = 5
    # Without fields: an episode of an unknown map.
    env = make_env(("SHG",))
    e = play_episode(env, lambda obs: 2, np.random.default_rng(0))
    env.close()
    assert (e.observations, e.actions, e.rewards, e.terminated, e.map_id, e.map_rows) == ([0, 1], [2], [0.0], True,
                                                                                         -1, ())


def test_history_restarts_the_learner_every_history_episodes():
    from icrl_lightning.behaviour import QLearning, q_learning_run

    rows = ("SFFF", "FHFH", "FFFH", "HFFG")
    one = q_learning_run(rows, 0, 12, seed=3, q_init=1.0)
    hist = QLearning(q_init=1.0, history=6).run(FrozenLake(), rows, 0, 12, [3])
    assert QLearning(history=6).history_length == 6 and QLearning().history_length is None
    # The first history is the one run's first six episodes; the second starts from a fresh table,
    # so it explores again (an optimistic learner's first episode tries untried moves).
    assert [e.actions for e in hist[:6]] == [e.actions for e in one[:6]]
    assert len(hist[6].actions) > len(one[6].actions) or hist[6].actions != one[6].actions
    assert QLearning(history=6).settings()["behaviour_history"] == 6
    assert "behaviour_history" not in QLearning().settings()
