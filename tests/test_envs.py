"""Frozen Lake map family: generation, splits, validation, the gymnasium env, BFS helpers."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from icrl_lightning.checks import InputError
from icrl_lightning.envs import (
    STITCHING_MAP,
    generate_map,
    generate_maps,
    make_env,
    make_splits,
    shortest_path_actions,
    validate_map,
)
from icrl_lightning.envs.frozen_lake import goal_distances, optimal_actions

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3


def _check_valid(rows, min_size, max_size, min_hops):
    assert isinstance(rows, tuple)
    assert validate_map(rows) == rows
    assert min_size <= len(rows) <= max_size
    assert min_size <= len(rows[0]) <= max_size
    text = "".join(rows)
    assert "S" in text and "G" in text
    dist = goal_distances(rows)
    ncol = len(rows[0])
    for idx, ch in enumerate(text):
        if ch == "S":
            d = dist[idx // ncol, idx % ncol]
            assert d >= min_hops, (rows, idx, d)  # also rules out -1 (unreachable)


@pytest.mark.parametrize(("min_size", "max_size", "min_hops"), [(3, 5, 4), (6, 7, 4), (4, 4, 6)])
def test_generated_maps_are_valid(min_size, max_size, min_hops):
    maps = generate_maps(40, seed=11, min_size=min_size, max_size=max_size, min_hops=min_hops)
    assert len(maps) == 40
    assert len(set(maps)) == 40
    for rows in maps:
        _check_valid(rows, min_size, max_size, min_hops)
    # Both ends of the size range are drawn (uniform sizes, not a fixed one).
    if min_size != max_size:
        sides = {len(m) for m in maps} | {len(m[0]) for m in maps}
        assert min_size in sides and max_size in sides


def test_generation_is_deterministic_in_the_seed():
    assert generate_maps(15, seed=3) == generate_maps(15, seed=3)
    assert generate_maps(15, seed=3) != generate_maps(15, seed=4)
    a = generate_map(np.random.default_rng(5))
    b = generate_map(np.random.default_rng(5))
    assert a == b


def test_generate_maps_excludes():
    first = generate_maps(5, seed=0)
    again = generate_maps(5, seed=0, exclude=frozenset(first[:2]))
    assert not set(first[:2]) & set(again)


def test_impossible_generation_raises():
    with pytest.raises(InputError, match="min_hops"):
        generate_map(np.random.default_rng(0), min_size=3, max_size=3, min_hops=50, max_tries=200)


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0, n_train=30)


def test_splits_are_disjoint(splits):
    train, heldout, ood = splits.train, splits.heldout, splits.ood
    assert len(train) == 30
    assert len(set(train)) == len(train)
    assert len(set(heldout)) == len(heldout)
    assert len(set(ood)) == len(ood)
    assert not set(train) & set(heldout)
    assert not set(train) & set(ood)
    assert not set(heldout) & set(ood)


def test_split_sizes(splits):
    for rows in splits.train + splits.heldout:
        _check_valid(rows, 3, 5, 4)
    for rows in splits.ood:
        _check_valid(rows, 6, 7, 4)
    assert {len(m) for m in splits.ood} == {6, 7}
    assert {len(m[0]) for m in splits.ood} == {6, 7}


def test_splits_are_deterministic_and_eval_maps_do_not_depend_on_n_train(splits):
    other = make_splits(seed=0, n_train=5)
    assert other.heldout == splits.heldout
    assert other.ood == splits.ood
    assert other.train == splits.train[:5]
    assert make_splits(seed=1, n_train=5).heldout != splits.heldout


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["SFF", "FG", "FFF"], "ragged"),
        (["SFX", "FFG"], "unknown tile"),
        (["FFF", "FFG"], "no start"),
        (["SFF", "FFH"], "no goal"),
        ([], "non-empty"),
    ],
)
def test_validate_map_errors(rows, match):
    with pytest.raises(ValueError, match=match) as err:
        validate_map(rows, where="my-map-7")
    assert "my-map-7" in str(err.value)


def test_validate_map_names_the_bad_row_and_letters():
    with pytest.raises(ValueError) as err:
        validate_map(["SFF", "FqG"])
    assert "row 1" in str(err.value) and "'q'" in str(err.value)
    assert validate_map(["SF", "FG"]) == ("SF", "FG")


def _unwrap_frozen_lake(env):
    return env.unwrapped


def test_make_env_is_deterministic_frozen_lake():
    rows = ("SFF", "FFF", "FFG")
    env = make_env(rows)
    assert env.spec.id == "FrozenLake-v1"
    assert env.spec.kwargs["is_slippery"] is False
    assert isinstance(env, gym.wrappers.TimeLimit)
    base = _unwrap_frozen_lake(env)
    # Every transition of gymnasium's table has a single outcome with probability 1.
    for s in base.P:
        for a in base.P[s]:
            assert len(base.P[s][a]) == 1 and base.P[s][a][0][0] == 1.0
    obs, _ = env.reset(seed=0)
    assert obs == 0
    obs, r, term, trunc, _ = env.step(RIGHT)
    assert (obs, r, term, trunc) == (1, 0.0, False, False)
    obs, *_ = env.step(DOWN)
    assert obs == 4  # row 1, col 1 of a 3-wide map
    obs, *_ = env.step(LEFT)
    assert obs == 3
    obs, *_ = env.step(UP)
    assert obs == 0
    env.close()


def test_goal_gives_reward_one_and_terminates():
    env = make_env(("SFG",))
    env.reset(seed=0)
    obs, r, term, trunc, _ = env.step(RIGHT)
    assert (obs, r, term) == (1, 0.0, False)
    obs, r, term, trunc, _ = env.step(RIGHT)
    assert (obs, r, term, trunc) == (2, 1.0, True, False)
    env.close()


def test_hole_ends_episode_without_reward():
    env = make_env(("SHG",))
    env.reset(seed=0)
    obs, r, term, trunc, _ = env.step(RIGHT)
    assert (obs, r, term, trunc) == (1, 0.0, True, False)
    env.close()


def test_time_limit_is_100_steps():
    env = make_env(("SF", "FG"))
    env.reset(seed=0)
    for t in range(1, 101):
        obs, r, term, trunc, _ = env.step(LEFT)  # bumps the wall, stays on the start tile
        assert obs == 0 and r == 0.0 and not term
        assert trunc == (t == 100), t
    env.close()


def test_time_limit_is_configurable():
    env = make_env(("SF", "FG"), max_episode_steps=7)
    env.reset(seed=0)
    truncated_at = None
    for t in range(1, 8):
        *_, trunc, _ = env.step(UP)
        if trunc:
            truncated_at = t
            break
    assert truncated_at == 7
    env.close()


def test_reset_starts_on_a_start_tile():
    rows = ("SFFS", "FFFF", "HFFG")
    env = make_env(rows)
    starts = {env.reset(seed=s)[0] for s in range(30)}
    assert starts == {0, 3}  # several starts: gymnasium picks among them
    env.close()


def test_goal_distances_on_stitching_map():
    assert STITCHING_MAP == ("HHFF", "FFFF", "SFFH", "HFFF", "HFFF", "HFGF")
    dist = goal_distances(STITCHING_MAP)
    assert dist.shape == (6, 4)
    assert dist[5, 2] == 0
    assert dist[2, 0] == 5  # tile 8 -> 9 -> 10 -> 14 -> 18 -> 22
    assert dist[0, 0] == -1 and dist[2, 3] == -1  # holes


def test_optimal_actions_hand_case():
    rows = ("SFH", "FFG")  # tiles 0 1 2 / 3 4 5; actions left, down, right, up
    best = optimal_actions(rows)
    assert best.astype(int).tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0],
                                         [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert shortest_path_actions(rows).tolist() == [1, 1, -1, 2, 2, -1]


def test_shortest_path_actions_reach_goal_on_stitching_map():
    best = shortest_path_actions(STITCHING_MAP)
    env = make_env(STITCHING_MAP)
    obs, _ = env.reset(seed=0)
    assert obs == 8
    path, total, done = [int(obs)], 0.0, False
    while not done:
        assert best[obs] >= 0
        obs, r, term, trunc, _ = env.step(int(best[obs]))
        path.append(int(obs))
        total += r
        done = term or trunc
    env.close()
    assert total == 1.0
    assert path[-1] == 22
    assert len(path) - 1 == 5


def test_shortest_path_actions_from_every_tile():
    """From every tile that can reach a goal, following the table reaches it in ``dist`` moves
    (checked against gymnasium's own transition table)."""
    rows = STITCHING_MAP
    best = shortest_path_actions(rows)
    dist = goal_distances(rows)
    P = make_env(rows).unwrapped.P
    ncol = len(rows[0])
    for s in range(len(best)):
        d = dist[s // ncol, s % ncol]
        if d <= 0:
            assert best[s] == -1
            continue
        cur, steps, reward = s, 0, 0.0
        while steps < 50:
            _, cur, reward, term = P[cur][int(best[cur])][0]
            steps += 1
            if term:
                break
        assert reward == 1.0 and steps == d, (s, steps, d)
