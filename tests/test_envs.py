"""Frozen Lake map family: generation, splits, validation, the gymnasium env, BFS helpers, the
``FrozenLake`` family class and the input files (map lists, the stitching scenario)."""

from __future__ import annotations

import json
import os

import gymnasium as gym
import numpy as np
import pytest

from icrl_lightning.checks import InputError, MissingInputFile, read_input_file, read_json_file
from icrl_lightning.envs import (
    FrozenLake,
    generate_map,
    generate_maps,
    load_map_file,
    load_stitching_file,
    make_env,
    make_splits,
    paper_schedule,
    shortest_path_actions,
    validate_map,
)
from icrl_lightning.envs.frozen_lake import goal_distances, optimal_actions, path_steps

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
# SPEC's behaviour-stitching map (data/stitching.json holds it with its context).
STITCHING_ROWS = ("HHFF", "FFFF", "SFFH", "HFFF", "HFFF", "HFGF")


@pytest.fixture(scope="module")
def stitching_map(repo_root):
    """The map of the repository's ``data/stitching.json``."""
    rows, _ = load_stitching_file(repo_root / "data/stitching.json")
    return rows


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


def test_split_seed_fixes_the_evaluation_maps_across_seeds(splits):
    """Runs at another ``seed`` with the same ``split_seed`` share the held-out and OOD maps (and
    train on other maps); ``split_seed=None`` is ``seed``."""
    other = make_splits(seed=1, n_train=30, split_seed=0)
    assert other.heldout == splits.heldout and other.ood == splits.ood
    assert other.train != splits.train
    assert not set(other.train) & (set(other.heldout) | set(other.ood))
    assert make_splits(seed=1, n_train=5, split_seed=1) == make_splits(seed=1, n_train=5)


def test_training_maps_never_contain_the_evaluation_maps_of_split_seed():
    """3 x 3 maps are few: drawn without the exclusion, the training maps of seed 1 would repeat
    many held-out maps of split_seed 0; the splits leave every one of them out."""
    kw = {"min_size": 3, "max_size": 3, "min_hops": 3}
    split = make_splits(seed=1, n_train=40, split_seed=0, **kw)
    assert split.heldout == make_splits(seed=0, n_train=0, **kw).heldout
    assert len(set(split.train)) == 40
    assert not set(split.train) & (set(split.heldout) | set(split.ood))
    unfiltered = generate_maps(40, [1, 0], **kw)  # the same draw without the exclusion
    assert len(set(unfiltered) & set(split.heldout)) >= 5


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["SFF", "FG", "FFF"], "ragged"),
        (["SFX", "FFG"], "unknown tile"),
        (["FFF", "FFG"], "no start"),
        (["SFF", "FFH"], "no goal"),
        ([], "non-empty"),
        ("SFG", "a map is a list of row strings"),
        (["SHG", "HFF"], r"no path from start tile\(s\) \[0\] to a goal"),
        (["SHS", "HHH", "FFG"], r"no path from start tile\(s\) \[0, 2\]"),
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


def test_validate_map_accepts_a_map_where_every_start_reaches_a_goal():
    # Holes, an unreachable corner and a goal walled in on one side: only the starts must reach a goal.
    assert validate_map(["SFH", "HFH", "FFG", "HFH"]) == ("SFH", "HFH", "FFG", "HFH")
    assert validate_map(("SFFS", "FHHF", "FFGH")) == ("SFFS", "FHHF", "FFGH")
    with pytest.raises(InputError, match=r"start tile\(s\) \[3\]"):
        validate_map(["SFHS", "FFHH", "FFFG"])  # tile 3 is walled in by holes; tile 0 is fine


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


def test_goal_distances_on_stitching_map(stitching_map):
    assert stitching_map == STITCHING_ROWS
    dist = goal_distances(stitching_map)
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


def test_shortest_path_actions_reach_goal_on_stitching_map(stitching_map):
    best = shortest_path_actions(stitching_map)
    env = make_env(stitching_map)
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


def test_shortest_path_actions_from_every_tile(stitching_map):
    """From every tile that can reach a goal, following the table reaches it in ``dist`` moves
    (checked against gymnasium's own transition table)."""
    rows = stitching_map
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


# --- the FrozenLake family class ------------------------------------------------------------------------
def test_frozen_lake_family_defaults_and_settings():
    env = FrozenLake()
    assert env.settings() == {"max_episode_steps": 100, "min_size": 3, "max_size": 5, "p_hole": 0.2, "min_hops": 4}
    assert (env.largest_tiles("train"), env.largest_tiles("heldout"), env.largest_tiles("ood")) == (25, 25, 49)
    assert FrozenLake(max_size=4).largest_tiles("heldout") == 16
    assert FrozenLake(max_size=4).largest_tiles("ood") == 49  # the OOD maps are 6..7 a side whatever max_size is
    assert repr(FrozenLake(p_hole=0.3)) == \
        "FrozenLake(max_episode_steps=100, min_size=3, max_size=5, p_hole=0.3, min_hops=4)"


def test_frozen_lake_family_splits_and_env():
    fam = FrozenLake(max_size=4, p_hole=0.3, min_hops=3, max_episode_steps=7)
    assert fam.splits(2, 5, split_seed=0) == make_splits(2, 5, 0, min_size=3, max_size=4, p_hole=0.3, min_hops=3)
    env = fam.make_env(("SF", "FG"))
    assert env.spec.id == "FrozenLake-v1" and env.spec.kwargs["is_slippery"] is False
    env.reset(seed=0)
    truncs = [env.step(UP)[3] for _ in range(7)]
    assert truncs == [False] * 6 + [True]
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_episode_steps": 0}, r"data\.env\.max_episode_steps=0 is out of range"),
        ({"min_size": 1}, r"data\.env\.min_size=1 is out of range.*2 x 2"),
        ({"min_size": 4, "max_size": 3}, r"data\.env\.max_size=3 is out of range: allowed \[4, inf\)"),
        ({"p_hole": 1.0}, r"data\.env\.p_hole=1\.0 is out of range: allowed \[0, 1\)"),
        ({"p_hole": -0.1}, r"data\.env\.p_hole=-0\.1"),
        ({"min_hops": 9}, r"data\.env\.min_hops=9 is out of range: allowed \[0, 8\].*8 moves apart"),
        ({"max_size": 3, "min_hops": 5}, r"data\.env\.min_hops=5 .*\[0, 4\]"),
    ],
)
def test_frozen_lake_family_checks_its_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        FrozenLake(**kwargs)


def test_paper_schedule():
    from icrl_lightning.evaluation.protocol import paper_schedule as from_protocol

    schedule = paper_schedule()
    assert schedule == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8,
                        0.9, 0.9] + [1.0] * 10
    assert from_protocol() == schedule


# --- tile paths (the stitching scenario's context) -----------------------------------------------------------
def test_path_steps_on_the_stitching_map():
    rows = STITCHING_ROWS
    assert path_steps(rows, [2, 6, 10, 14, 18, 22], "ctx") == ([DOWN] * 5, [0.0] * 4 + [1.0], True, False)
    assert path_steps(rows, [8, 9, 10, 11], "ctx") == ([RIGHT] * 3, [0.0] * 3, True, False)  # ends in a hole
    assert path_steps(rows, [8, 8, 9], "ctx") == ([LEFT, RIGHT], [0.0, 0.0], False, True)  # bumps the wall
    assert path_steps(rows, [8, 9], "ctx") == ([RIGHT], [0.0], False, True)


def test_path_steps_are_what_the_env_does(stitching_map):
    """Every step ``path_steps`` derives is gymnasium's transition (reward, end) on that map."""
    for path in ([2, 6, 10, 14, 18, 22], [8, 9, 10, 11], [8, 8, 9, 13, 17, 21, 22]):
        actions, rewards, terminated, truncated = path_steps(stitching_map, path, "ctx")
        env = make_env(stitching_map)
        env.reset(seed=0)
        env.unwrapped.s = path[0]
        for t, a in enumerate(actions):
            obs, r, term, _, _ = env.step(a)
            assert (obs, r) == (path[t + 1], rewards[t])
        assert term == terminated and truncated == (not term)
        env.close()


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ([8], r"path \[8\] needs at least two tiles"),
        ([8, 24], r"tiles \[24\] are outside the 6x4 map"),
        ([-1, 8], r"tiles \[-1\] are outside"),
        ([8, "9"], r"tiles \['9'\] are outside"),
        ([8, 10], r"no single move leads from tile 8 to tile 10 \(step 0 of path \[8, 10\]\)"),
        ([10, 11, 15], r"goes on after tile 11 \('H', terminal\)"),
        ([18, 22, 23], r"goes on after tile 22 \('G', terminal\)"),
    ],
)
def test_path_steps_errors(path, match):
    with pytest.raises(InputError, match=match) as err:
        path_steps(STITCHING_ROWS, path, "where-7")
    assert str(err.value).startswith("where-7: ")


# --- input files: one-line errors that name the option and the path -------------------------------------------
def _one_line_error(err, what: str, path) -> str:
    msg = str(err.value)
    assert isinstance(err.value, InputError)
    assert msg.startswith(f"{what}: {path}"), msg
    assert "\n" not in msg, msg
    return msg


def test_read_input_file(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("  hello\n")
    assert read_input_file(path, "some.option") == "  hello\n"
    assert read_input_file(str(path), "some.option") == "  hello\n"
    path.write_text('{"a": [1, 2]}')
    assert read_json_file(path, "some.option") == {"a": [1, 2]}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("folder", "is a folder, not a file"),
        (b"", "is empty"),
        (b"  \n\t\n", "is empty"),
        (b"\xff\xfe[\x00]", r"is not a text file \(not UTF-8\)"),
    ],
)
def test_read_input_file_errors(tmp_path, content, match):
    path = tmp_path / "in.json"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    for read in (read_input_file, read_json_file):
        with pytest.raises(InputError, match=match) as err:
            read(path, "some.option")
        _one_line_error(err, "some.option", path)
    if content is None:
        assert isinstance(err.value, MissingInputFile) and isinstance(err.value, FileNotFoundError)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_read_input_file_unreadable(tmp_path):
    path = tmp_path / "in.json"
    path.write_text("[]")
    path.chmod(0)
    try:
        with pytest.raises(InputError, match=r"not readable \(permission denied\)") as err:
            read_input_file(path, "some.option")
        _one_line_error(err, "some.option", path)
    finally:
        path.chmod(0o600)


def test_read_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "in.json"
    path.write_text("[1,\n 2,,]")
    with pytest.raises(InputError, match=r"is not valid JSON \(Expecting value at line 2, column 4\)") as err:
        read_json_file(path, "some.option")
    _one_line_error(err, "some.option", path)


def test_load_map_file(tmp_path, repo_root):
    path = tmp_path / "maps.json"
    path.write_text(json.dumps([["SFF", "FHG"], ["SF", "FG"]]))
    assert load_map_file(path) == [("SFF", "FHG"), ("SF", "FG")]
    assert load_map_file(repo_root / "data/example_maps.json") == [("SFFH", "FHFF", "FFFG"), ("SFF", "FHF", "FFG")]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[["SFF", "FFG"], ', r"not valid JSON \(.* at line 1, column"),
        ('{"maps": []}', "non-empty JSON list"),
        ('"SFFG"', "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('[["SFF", "FFG"], ["SFF", "FG"]]', r"map 1\b.*ragged"),
        ('[["SFF", "FFG"], ["SF", "FG"], ["SFF", "FFF"]]', r"map 2\b.*no goal"),
        ('[["SXF", "FFG"]]', r"map 0\b.*unknown"),
        ('[["SFF", "FFG"], [1, 2]]', r"map 1\b.*list of row strings"),
        # A map where no start reaches a goal (holes block every way): refused, naming the map and tiles.
        ('[["SF", "FG"], ["SFF", "FFG"], ["SHG", "HFF"]]', r"map 2: no path from start tile\(s\) \[0\] to a goal"),
        ('[["SHS", "HHH", "FFG"]]', r"map 0: no path from start tile\(s\) \[0, 2\]"),
    ],
)
def test_load_map_file_errors(tmp_path, text, match):
    path = tmp_path / "bad-maps.json"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as err:
        load_map_file(path)
    _one_line_error(err, "data.eval_map_file", path)


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "does not exist"), ("folder", "is a folder"), (b"", "is empty"), (b"\x80[]", "not UTF-8")],
)
def test_load_map_file_file_errors(tmp_path, content, match):
    path = tmp_path / "nope.json"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        load_map_file(path)
    _one_line_error(err, "data.eval_map_file", path)
    with pytest.raises(InputError) as err:
        load_map_file(path, what="my.maps")
    _one_line_error(err, "my.maps", path)


def test_load_map_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_map_file(tmp_path / "nope.json")


def test_load_map_file_rejects_a_map_given_as_one_string(tmp_path):
    path = tmp_path / "maps.json"
    path.write_text(json.dumps([["SFF", "FFG"], "SHFG"]))
    with pytest.raises(InputError, match="map 1"):
        load_map_file(path)


# --- the stitching scenario's file ---------------------------------------------------------------------
def test_load_stitching_file(repo_root, tmp_path):
    rows, paths = load_stitching_file(repo_root / "data/stitching.json")
    assert rows == STITCHING_ROWS
    assert paths == [[2, 6, 10, 14, 18, 22], [8, 9, 10, 11]]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"context": [[0, 1, 3]], "map": ["SF", "FG"]}))
    assert load_stitching_file(path) == (("SF", "FG"), [[0, 1, 3]])


@pytest.mark.parametrize("variant", ["mirror", "flip", "rot180", "transpose"])
def test_stitching_variants_are_the_layout_moved(repo_root, variant):
    """``data/stitching_variants/``: the stitching layout and its two context paths under one
    symmetry of the grid each, so they load and pose the same task (a success from another start,
    a failure from the start that shares a tile with it)."""
    rows, paths = load_stitching_file(repo_root / "data/stitching.json")
    h, w = len(rows), len(rows[0])
    move = {"mirror": lambda r, c: (r, w - 1 - c), "flip": lambda r, c: (h - 1 - r, c),
            "rot180": lambda r, c: (h - 1 - r, w - 1 - c), "transpose": lambda r, c: (c, r)}[variant]
    got_rows, got_paths = load_stitching_file(repo_root / f"data/stitching_variants/{variant}.json")
    gw = len(got_rows[0])

    def moved(tile: int) -> int:
        rr, cc = move(*divmod(tile, w))
        return rr * gw + cc

    for t in range(h * w):
        rr, cc = divmod(moved(t), gw)
        assert got_rows[rr][cc] == rows[t // w][t % w]
    assert got_paths == [[moved(t) for t in path] for path in paths]


GOOD_MAP = list(STITCHING_ROWS)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([GOOD_MAP], "expected an object with the keys 'map'"),
        ({"map": GOOD_MAP}, "expected an object with the keys 'map'"),
        ({"map": GOOD_MAP, "context": [[8, 9]], "extra": 1}, "expected an object with the keys 'map'"),
        ({"map": ["SHG", "HFF"], "context": [[2, 5]]}, r", map: no path from start tile\(s\) \[0\]"),
        ({"map": ["SFF", "FFF"], "context": [[0, 1]]}, ", map: the map has no goal"),
        ({"map": GOOD_MAP, "context": []}, "'context' must be a non-empty list of tile paths"),
        ({"map": GOOD_MAP, "context": [8, 9]}, "'context' must be a non-empty list of tile paths"),
        ({"map": GOOD_MAP, "context": "8 9"}, "'context' must be a non-empty list of tile paths"),
        ({"map": GOOD_MAP, "context": [[8, 9], [8]]}, r", context 1: path \[8\] needs at least two tiles"),
        ({"map": GOOD_MAP, "context": [[8, 99]]}, r", context 0: tiles \[99\] are outside the 6x4 map"),
        ({"map": GOOD_MAP, "context": [[8, 10]]}, r", context 0: no single move leads from tile 8 to tile 10"),
        ({"map": GOOD_MAP, "context": [[18, 22, 23]]}, r", context 0: path \[18, 22, 23\] goes on after tile 22"),
    ],
)
def test_load_stitching_file_errors(tmp_path, data, match):
    path = tmp_path / "stitching.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=match) as err:
        load_stitching_file(path)
    _one_line_error(err, "model.evaluation.stitching_file", path)


@pytest.mark.parametrize(("content", "match"), [(None, "does not exist"), (b"{", "not valid JSON"),
                                                (b"", "is empty")])
def test_load_stitching_file_file_errors(tmp_path, content, match):
    path = tmp_path / "stitching.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        load_stitching_file(path)
    _one_line_error(err, "model.evaluation.stitching_file", path)


@pytest.mark.parametrize("family", ["frozen_lake", "slippery", "dark_room", "key_to_door", "bandit"])
def test_fork_env_steps_independently_and_alike(family):
    """``ProblemFamily.fork_env``: the copy plays on from the same state and draws (a slippery lake and
    a bandit draw from the environment's generator), and stepping it leaves the original alone."""
    from icrl_lightning.envs import BernoulliBandit, DarkKeyToDoor, DarkRoom, FrozenLake

    fam = {"frozen_lake": FrozenLake(), "slippery": FrozenLake(), "dark_room": DarkRoom(size=5, train_goals=20),
           "key_to_door": DarkKeyToDoor(size=5), "bandit": BernoulliBandit()}[family]
    task = fam.splits(seed=0, n_train=4).heldout[0]
    env = fam.make_env(task)
    if family == "slippery":
        env = gym.make("FrozenLake-v1", desc=list(task), is_slippery=True, max_episode_steps=100,
                       disable_env_checker=True)
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    moves = [int(rng.integers(fam.n_actions)) for _ in range(12)]
    env.step(moves[0])
    twin = fam.fork_env(env)
    ahead = [twin.step(a)[:4] for a in moves[1:]]
    fresh = fam.fork_env(env)  # the original has not moved since the first fork
    assert [fresh.step(a)[:4] for a in moves[1:]] == ahead
    assert [env.step(a)[:4] for a in moves[1:]] == ahead
