"""Stitching layouts: files of one or many layouts, the layout generator, the committed
data/stitching_layouts.json, and a many-layout scenario through the Evaluator."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from icrl_lightning.agent import InContextAgent
from icrl_lightning.checks import InputError
from icrl_lightning.envs import load_stitching_file, load_stitching_layouts, make_splits
from icrl_lightning.envs.frozen_lake import goal_distances, path_steps
from icrl_lightning.envs.stitching import make_layout, make_layouts
from icrl_lightning.evaluation import EvalProtocol, run_baseline
from icrl_lightning.evaluation.runner import Evaluator
from icrl_lightning.evaluation.scenarios import path_episode


def _tool(repo_root):
    path = repo_root / "tools" / "make_stitching_layouts.py"
    spec = importlib.util.spec_from_file_location("make_stitching_layouts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tile(rows, t):
    return rows[t // len(rows[0])][t % len(rows[0])]


def _check_layout(layout: dict) -> None:
    """The stitching property: the failed episode leaves a shortest path from the one start into a
    hole at a split tile; the successful one reaches the one goal through that tile from a tile
    off the path; the failed prefix and the success's suffix make a shortest path."""
    rows = tuple(layout["map"])
    success, failed = layout["context"]
    text = "".join(rows)
    assert text.count("S") == 1 and text.count("G") == 1
    start = text.index("S")
    for path in (success, failed, failed[:-1] + success[success.index(failed[-2]) + 1:]):
        path_steps(rows, path, "layout")  # single legal moves, nothing after a hole or the goal
    assert failed[0] == start and _tile(rows, failed[-1]) == "H"
    assert _tile(rows, success[-1]) == "G" and start not in success and failed[-1] not in success
    split = failed[-2]
    assert success[0] not in failed and success.index(split) >= 2  # joins from 2+ moves away
    joined = failed[:-1] + success[success.index(split) + 1:]
    dist = goal_distances(rows)
    assert len(joined) - 1 == dist[start // len(rows[0]), start % len(rows[0])] >= 4
    assert len(set(success)) == len(success) and len(set(joined)) == len(joined)


def test_make_layout_has_the_stitching_property():
    rng = np.random.default_rng(0)
    made = 0
    for terrain in make_splits(3, 0).heldout[:60]:
        layout = make_layout(terrain, rng)
        if layout is not None:
            _check_layout(layout)
            made += 1
    assert made >= 40  # most maps admit a layout
    # A map without a hole beside any path tile admits none.
    assert make_layout(("SFFFG",), np.random.default_rng(0)) is None


def test_make_layouts_is_deterministic_and_distinct():
    terrains = make_splits(0, 0).heldout[:10]
    a = make_layouts(terrains, n=100, seed=4, per_terrain=2)
    assert a == make_layouts(terrains, n=100, seed=4, per_terrain=2)
    assert a != make_layouts(terrains, n=100, seed=5, per_terrain=2)
    assert len(a) <= 20 and len({json.dumps(x) for x in a}) == len(a)
    assert make_layouts(terrains, n=3, seed=4) == a[:3]
    # Excluded maps (e.g. training maps) are never a layout's map.
    banned = frozenset(tuple(x["map"]) for x in a[:5])
    assert not {tuple(x["map"]) for x in make_layouts(terrains, n=100, seed=4, exclude=banned)} & banned


@pytest.mark.slow
def test_committed_layouts_are_the_tools_default(repo_root):
    """Builds the training maps of seeds 0-6 (about a minute on 2 cores)."""
    tool = _tool(repo_root)
    assert (repo_root / "data" / "stitching_layouts.json").read_text() == tool.dumps(tool.layouts())


def test_committed_layouts(repo_root, tmp_path):
    path = repo_root / "data" / "stitching_layouts.json"
    tool = _tool(repo_root)
    layouts = json.loads(path.read_text())
    assert len(layouts) >= 60 and path.read_text() == tool.dumps(layouts)
    for layout in layouts:
        _check_layout(layout)
    loaded = load_stitching_layouts(path)
    assert len(loaded) == len(layouts)
    # Every layout can be stitched: tabular Q-learning that replays its two episodes solves it.
    maps = [rows for rows, _ in loaded]
    context = [[path_episode(rows, p) for p in paths] for rows, paths in loaded]
    assert (run_baseline("q_learning", maps, [1.0], seed=0, context=context) == 1.0).all()
    assert run_baseline("q_learning", maps, [1.0], seed=0).mean() < 0.5  # without them it does not
    with pytest.raises(ValueError, match="context has 1 entries"):
        run_baseline("q_learning", maps, [1.0], seed=0, context=context[:1])
    # None is a training map of seed 0 at 2,500 maps (the quickstart's; seeds 1-6: the slow test).
    train = frozenset(make_splits(0, 2500, 0).train)
    assert not {tuple(x["map"]) for x in layouts} & train
    # The maps come from held-out maps 150..199, never the reported (0..49) or selection (50..149) ones.
    heldout = make_splits(0, 0).heldout
    holes = lambda rows: [i for i, x in enumerate("".join(rows)) if x == "H"]  # noqa: E731
    sources = {tuple(holes(m)): i for i, m in enumerate(heldout[150:], 150)}
    assert all(tuple(holes(x["map"])) in sources for x in layouts)
    out = tmp_path / "ood.json"
    args = ["--train-seeds", "0", "--train-maps", "10", "--out", str(out)]
    assert tool.main(["--split", "ood", "--first", "0", "--last", "4", *args]) == 0
    assert all(6 <= len(x["map"]) <= 7 for x in json.loads(out.read_text()))
    assert tool.main(["--first", "10", "--last", "5", *args]) == 2
    assert tool.main(["--train-seeds", "a-b", "--out", str(out)]) == 2
    assert tool._seeds("0-2") == (0, 1, 2) and tool._seeds("3,5") == (3, 5)


def test_layout_files_one_or_many(tmp_path, repo_root):
    one = load_stitching_layouts(repo_root / "data" / "stitching.json")
    assert len(one) == 1 and one[0] == load_stitching_file(repo_root / "data" / "stitching.json")
    path = tmp_path / "two.json"
    path.write_text(json.dumps([{"map": ["SFG"], "context": [[0, 1, 2]]},
                                {"map": ["SF", "HG"], "context": [[1, 3], [0, 2]]}]))
    assert load_stitching_layouts(path) == [(("SFG",), [[0, 1, 2]]), (("SF", "HG"), [[1, 3], [0, 2]])]
    with pytest.raises(InputError, match="holds 2 layouts; expected one"):
        load_stitching_file(path)
    path.write_text("[]")
    with pytest.raises(InputError, match="list of layouts is empty"):
        load_stitching_layouts(path)
    path.write_text(json.dumps([{"map": ["SFG"], "context": [[0, 1, 2]]}, {"map": ["SFG"], "context": [[0, 2]]}]))
    with pytest.raises(InputError, match=r"layout 1, context 0: no single move") as err:
        EvalProtocol(scenario="stitching", stitching_file=str(path)).check()
    assert "model.evaluation.stitching_file" in str(err.value) and str(path) in str(err.value)


def test_many_layouts_through_the_evaluator(tiny_model, repo_root, tmp_path):
    """Each trial plays its own layout with its own context; the tabular Q-learner that replays a
    layout's context solves every layout (the layouts can be stitched), the oracle too."""
    path = repo_root / "data" / "stitching_layouts.json"
    layouts = json.loads(path.read_text())[:6]
    small = tmp_path / "layouts.json"
    small.write_text(json.dumps(layouts))
    protocol = EvalProtocol(scenario="stitching", stitching_file=str(small), stitching_trials=2, max_episode_steps=12)
    protocol.check()
    model, _, s = tiny_model("compact", seed=2)
    ev = Evaluator(protocol)
    agent = InContextAgent(model, s, max_context=512, max_episode_steps=12)
    _, report = ev.finish([ev.run(agent, [(0, ("SFG",))])], global_step=1)
    assert report["n_maps"] == 12
    assert report["maps"] == [x["map"] for x in layouts for _ in range(2)]
    assert [[e["observations"] for e in c] for c in report["context"]] == [x["context"] for x in layouts
                                                                           for _ in range(2)]
    starts = ["".join(x["map"]).index("S") for x in layouts for _ in range(2)]
    assert [t[0][0] for t in report["trajectories"]] == starts
    assert report["agents"]["q_learning"]["per_map"] == [[1.0]] * 12
    assert report["agents"]["oracle"]["per_map"] == [[1.0]] * 12
    # Where the model's trials went, against each trial's own context.
    paths = report["agents"]["icrl"]["stitching"]
    assert set(paths) == {"reached_success_path", "success_if_reached", "known_hole"}
    assert 0.0 <= paths["reached_success_path"] <= 1.0 and 0.0 <= paths["known_hole"] <= 1.0


def test_stitching_paths_on_the_papers_layout():
    """The paper's context: 2-6-10-14-18-22 reaches the goal, 8-9-10-11 ends in the hole at 11."""
    from icrl_lightning.evaluation.report import stitching_paths

    success = {"observations": [2, 6, 10, 14, 18, 22], "actions": [1] * 5, "rewards": [0, 0, 0, 0, 1.0],
               "terminated": True, "truncated": False}
    failed = {"observations": [8, 9, 10, 11], "actions": [2] * 3, "rewards": [0.0] * 3, "terminated": True,
              "truncated": False}
    paths = [[[8, 9, 10, 14, 18, 22]], [[8, 12]], [[8, 9, 10, 11]], [[8, 4, 5, 4]]]
    returns = np.array([[1.0], [0.0], [0.0], [0.0]])
    got = stitching_paths(returns, paths, [[success, failed]] * 4)
    # Stitched; into an unknown hole; back into the known hole over the path's tile 10; a time-out.
    assert got == {"reached_success_path": 0.5, "success_if_reached": 0.5, "known_hole": 0.25}
    assert stitching_paths(returns[1:2], paths[1:2], [[success, failed]])["success_if_reached"] is None
