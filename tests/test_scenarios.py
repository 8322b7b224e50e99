"""Evaluation scenarios: plans, the stitching context, and each scenario through the Evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icrl_lightning.agent import InContextAgent
from icrl_lightning.checks import InputError
from icrl_lightning.envs import make_splits
from icrl_lightning.episodes import Episode
from icrl_lightning.evaluation import EvalProtocol, run_baseline
from icrl_lightning.evaluation.runner import Evaluator
from icrl_lightning.evaluation.scenarios import context_tokens, make_plan, path_episode, stitching_setup

MAX_STEPS = 12
# SPEC's stitching map (data/stitching.json).
STITCHING_MAP = ("HHFF", "FFFF", "SFFH", "HFFF", "HFFF", "HFGF")
EPISODE_KEYS = {"observations", "actions", "rewards", "terminated", "truncated"}


@pytest.fixture(scope="module")
def maps():
    return make_splits(0, 0).heldout[:4]


@pytest.fixture(scope="module")
def agent(tiny_model):
    model, _, s = tiny_model("compact", seed=3)
    return InContextAgent(model, s, max_context=256, max_episode_steps=MAX_STEPS)


@pytest.fixture(scope="module")
def stitching_file(repo_root) -> str:
    return str(repo_root / "data" / "stitching.json")


def _stitching(stitching_file, **kwargs) -> EvalProtocol:
    return EvalProtocol(scenario="stitching", stitching_file=stitching_file, **kwargs)


def test_protocol_rejects_unknown_scenario(stitching_file):
    with pytest.raises(InputError, match="model.evaluation.scenario"):
        EvalProtocol(scenario="sideways").check()
    with pytest.raises(InputError, match="model.evaluation.stitching_trials"):
        _stitching(stitching_file, stitching_trials=0).check()
    with pytest.raises(InputError, match=r"model.evaluation.draft_budget=-1 is out of range"):
        EvalProtocol(draft_budget=-1).check()
    EvalProtocol(draft_budget=0).check()
    _stitching(stitching_file).check()
    EvalProtocol(scenario="nonstationary").check()
    assert _stitching(stitching_file).greedy_probs() == [1.0]
    assert _stitching(stitching_file, schedule=[0.5, 1.0]).greedy_probs() == [0.5, 1.0]
    assert len(EvalProtocol(scenario="nonstationary").greedy_probs()) == 30


def test_stitching_without_a_file_is_refused(tmp_path):
    for missing in (None, ""):
        with pytest.raises(InputError, match="model.evaluation.stitching_file") as err:
            EvalProtocol(scenario="stitching", stitching_file=missing).check()
        assert "data/stitching.json" in str(err.value)  # where the paper's map and context are
    # The other scenarios need no file.
    EvalProtocol(scenario="standard").check()
    # A file that is not there, or holds a bad context, is refused at check() naming the key and file.
    with pytest.raises(InputError, match="model.evaluation.stitching_file"):
        EvalProtocol(scenario="stitching", stitching_file=str(tmp_path / "missing.json")).check()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"map": ["SFG"], "context": [[0, 2]]}))
    with pytest.raises(InputError, match="no single move") as err:
        EvalProtocol(scenario="stitching", stitching_file=str(bad)).check()
    assert "model.evaluation.stitching_file" in str(err.value) and str(bad) in str(err.value)


def test_spec_stitching_context(stitching_file):
    [(rows, context)] = stitching_setup(_stitching(stitching_file))
    assert rows == STITCHING_MAP
    assert all(isinstance(e, Episode) and e.map_rows == STITCHING_MAP for e in context)
    goal, hole = context
    # 2-6-10-14-18-22: five moves down, the last onto the goal.
    assert goal.observations == [2, 6, 10, 14, 18, 22] and goal.actions == [1] * 5
    assert goal.rewards == [0.0, 0.0, 0.0, 0.0, 1.0] and goal.terminated and not goal.truncated
    # 8-9-10-11: three moves right, into the hole.
    assert hole.observations == [8, 9, 10, 11] and hole.actions == [2, 2, 2]
    assert hole.rewards == [0.0, 0.0, 0.0] and hole.terminated


def test_path_episode_errors_name_the_problem():
    with pytest.raises(InputError, match="no single move"):
        path_episode(STITCHING_MAP, [8, 10])
    with pytest.raises(InputError, match="outside"):
        path_episode(STITCHING_MAP, [8, 99])
    with pytest.raises(InputError, match="terminal"):
        path_episode(STITCHING_MAP, [8, 9, 10, 11, 15])
    with pytest.raises(InputError, match="two tiles"):
        path_episode(STITCHING_MAP, [8])
    with pytest.raises(InputError, match="^my context: "):  # ``where`` names the path in the message
        path_episode(STITCHING_MAP, [8, 10], "my context")
    open_end = path_episode(STITCHING_MAP, [8, 9])
    assert isinstance(open_end, Episode)
    assert open_end.truncated and not open_end.terminated
    assert (open_end.observations, open_end.actions, open_end.rewards) == ([8, 9], [2], [0.0])
    assert open_end.map_rows == STITCHING_MAP


def test_context_tokens_are_the_serialized_episodes(agent, stitching_file):
    [(_, context)] = stitching_setup(_stitching(stitching_file))
    ids = context_tokens(agent.s, context)
    assert len(ids) == 2
    for e, got in zip(context, ids, strict=True):
        assert got == agent.s.encode(e).ids.tolist()
    e = context[0]
    assert ids[0] == agent.s.encode(Episode(e.observations, e.actions, e.rewards, True, False)).ids.tolist()


def test_plans(maps, stitching_file, tmp_path):
    batch = list(enumerate(maps))
    standard = make_plan(EvalProtocol(), batch)
    assert standard.maps == maps and standard.switch_to is None and standard.phases == 1
    ns = make_plan(EvalProtocol(scenario="nonstationary"), batch)
    assert ns.switch_to == maps[1:] + maps[:1] and ns.phases == 2
    assert all(a != b for a, b in zip(ns.maps, ns.switch_to, strict=True))
    with pytest.raises(ValueError, match="at least two"):
        make_plan(EvalProtocol(scenario="nonstationary"), batch[:1])
    st = make_plan(_stitching(stitching_file, stitching_trials=3), batch)
    assert st.maps == [STITCHING_MAP] * 3 and st.index == [0, 1, 2]
    assert len(st.context) == 3 and all(len(c) == 2 for c in st.context)
    assert st.switch_to is None and st.phases == 1
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"map": ["SFG"], "context": [[0, 1, 2]]}))
    custom = make_plan(EvalProtocol(scenario="stitching", stitching_file=str(path)), batch)
    assert custom.maps == [("SFG",)] * 5 and [len(c) for c in custom.context] == [1] * 5
    assert custom.context[0][0] == Episode([0, 1, 2], [2, 2], [0.0, 1.0], True, False, map_rows=("SFG",))


def test_baselines_switch_maps(maps, tiny_model):
    switch = maps[1:] + maps[:1]
    oracle = run_baseline("oracle", maps, [1.0, 1.0], seed=0, switch_to=switch)
    assert oracle.shape == (4, 4) and (oracle == 1.0).all()
    # At greedy probability 0 every agent makes the same uniform draws, map switch included.
    schedule = [0.0] * 3
    rnd = run_baseline("random", maps, schedule, seed=5, switch_to=switch)
    assert np.array_equal(rnd, run_baseline("q_learning", maps, schedule, seed=5, switch_to=switch))
    model, _, s = tiny_model("compact")
    icrl = InContextAgent(model, s, max_context=1024).play(maps, schedule, seed=5, switch_to=switch)
    assert np.array_equal(rnd, icrl.returns)
    # The second phase is played on the other maps: its episodes start on a start tile of map B.
    for b, traj in zip(switch, icrl.trajectories, strict=True):
        assert all(b[t[0] // len(b[0])][t[0] % len(b[0])] == "S" for t in traj[3:])
    for a, b, eps in zip(maps, switch, icrl.episodes, strict=True):
        assert [e.map_rows for e in eps] == [a] * 3 + [b] * 3


def test_q_learning_stitches_its_context(stitching_file):
    """The tabular counterpart of stitching: Q-learning replayed on the two context episodes goes
    8-9-10 then down to the goal; without them it knows nothing."""
    [(_, context)] = stitching_setup(_stitching(stitching_file))
    with_context = run_baseline("q_learning", [STITCHING_MAP] * 5, [1.0], seed=0, context=[context] * 5)
    assert (with_context == 1.0).all()
    without = run_baseline("q_learning", [STITCHING_MAP] * 5, [1.0], seed=0)
    assert without.mean() < 1.0
    one_goal = [Episode([2, 6, 10, 14, 18, 22], [1] * 5, [0, 0, 0, 0, 1.0], True)]
    assert run_baseline("random", [STITCHING_MAP], [1.0], seed=0, context=[one_goal]).shape == (1, 1)


def _run(agent, protocol, batch):
    ev = Evaluator(protocol)
    out = ev.run(agent, batch)
    return ev.finish([out], global_step=7)


def test_standard_scenario_report(agent, maps):
    metrics, report = _run(agent, EvalProtocol(schedule=[0.0, 0.5, 1.0], max_episode_steps=MAX_STEPS, last_k=2),
                           list(enumerate(maps)))
    assert report["scenario"] == "standard" and report["n_maps"] == 4 and report["n_episodes"] == 3
    assert set(report["agents"]) == {"icrl", "no_context", "random", "q_learning", "q_optimistic", "oracle"}
    assert report["switch_to"] is None and report["context"] is None
    assert report["protocol"]["scenario"] == "standard"
    assert len(report["agents"]["icrl"]["mean_episode_steps"]) == 3
    assert len(report["actions"]) == 4
    assert {"icrl_s", "total_s", "per_rank"} <= set(report["timings"])
    assert "val/icrl_last2" in metrics and "val_curve/return_ep02" in metrics


def test_nonstationary_scenario_report(agent, maps):
    protocol = EvalProtocol(scenario="nonstationary", schedule=[0.0, 1.0], max_episode_steps=MAX_STEPS, last_k=1)
    metrics, report = _run(agent, protocol, list(enumerate(maps)))
    assert report["n_episodes"] == 4 and report["phases"] == 2 and report["phase_length"] == 2
    assert report["schedule"] == [0.0, 1.0, 0.0, 1.0]
    assert report["switch_to"] == [list(m) for m in maps[1:] + maps[:1]]
    for name, s in report["agents"].items():
        assert len(s["mean_return"]) == 4 and len(s["phases"]) == 2, name
        assert s["phases"][1]["last1"] == pytest.approx(np.mean(np.asarray(s["per_map"])[:, 3]))
    assert report["agents"]["oracle"]["phases"][0]["last1"] == 1.0 == report["agents"]["oracle"]["phases"][1]["last1"]
    assert "val/icrl_map_a_last1" in metrics and "val_curve/return_ep03" in metrics
    # The trajectory of episode 2 starts on map B.
    for i, traj in enumerate(report["trajectories"]):
        b = report["switch_to"][i]
        start = traj[2][0]
        assert b[start // len(b[0])][start % len(b[0])] == "S"


def test_stitching_scenario_report(agent, maps, stitching_file):
    metrics, report = _run(agent, _stitching(stitching_file), list(enumerate(maps)))
    assert report["scenario"] == "stitching" and report["n_maps"] == 5 and report["n_episodes"] == 1
    assert report["maps"] == [list(STITCHING_MAP)] * 5
    assert report["protocol"]["stitching_file"] == stitching_file
    # The context episodes as plain JSON: exactly an episode's own fields, no map or bookkeeping.
    # One context per trial.
    assert all(set(e) == EPISODE_KEYS for c in report["context"] for e in c)
    assert report["context"] == [[
        {"observations": [2, 6, 10, 14, 18, 22], "actions": [1] * 5, "rewards": [0.0, 0.0, 0.0, 0.0, 1.0],
         "terminated": True, "truncated": False},
        {"observations": [8, 9, 10, 11], "actions": [2, 2, 2], "rewards": [0.0, 0.0, 0.0],
         "terminated": True, "truncated": False}]] * 5
    json.dumps(report)  # what the report callback writes
    assert all(t[0][0] == 8 for t in report["trajectories"])  # the single start tile
    assert report["agents"]["oracle"]["per_map"] == [[1.0]] * 5
    assert report["agents"]["q_learning"]["per_map"] == [[1.0]] * 5
    # The prefilled context reaches the model: the first decision sees it (two episodes of tokens).
    assert report["timings"]["per_rank"][0]["longest_context"] > sum(len(e) for e in context_tokens(
        agent.s, stitching_setup(_stitching(stitching_file))[0][1]))
