"""Evaluation protocol, baselines and summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icrl_lightning.agent import InContextAgent
from icrl_lightning.checks import InputError
from icrl_lightning.envs import load_stitching_file, make_splits
from icrl_lightning.evaluation import EvalProtocol, paper_schedule, run_baseline, summarize, write_report


@pytest.fixture(scope="module")
def maps():
    return make_splits(0, 0).heldout[:4]


def test_paper_schedule():
    from icrl_lightning.envs import frozen_lake
    from icrl_lightning.evaluation import protocol

    s = paper_schedule()
    assert len(s) == 30
    assert s[:20] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8,
                      0.9, 0.9]
    assert s[20:] == [1.0] * 10
    # It lives with the environment; the evaluation package re-exports the same function.
    assert paper_schedule is frozen_lake.paper_schedule is protocol.paper_schedule


def test_protocol_schedule():
    assert EvalProtocol().greedy_probs() == paper_schedule()
    assert EvalProtocol(schedule=[0.5, 1.0]).greedy_probs() == [0.5, 1.0]
    EvalProtocol(schedule=[0.5, 1.0]).check()
    with pytest.raises(InputError, match="model.evaluation.schedule"):
        EvalProtocol(schedule=[0.5, 1.5]).greedy_probs()
    bad = EvalProtocol(schedule=[0.5, 1.5])  # constructing is fine: check() refuses it
    with pytest.raises(InputError, match="model.evaluation.schedule"):
        bad.check()
    for key, value in (("last_k", 0), ("max_context", -1), ("max_episode_steps", -1)):
        with pytest.raises(InputError, match=f"model.evaluation.{key}"):
            EvalProtocol(**{key: value}).check()


def test_oracle_is_perfect_when_greedy(maps, repo_root):
    stitching_map, _ = load_stitching_file(repo_root / "data" / "stitching.json")
    out = run_baseline("oracle", maps + [stitching_map], [1.0] * 3, seed=0)
    assert out.shape == (5, 3)
    assert (out == 1.0).all()


def test_baselines_share_exploration_draws(maps, tiny_model):
    """At greedy probability 0 every agent takes the same uniform actions from the same seed."""
    schedule = [0.0] * 6
    rnd = run_baseline("random", maps, schedule, seed=3)
    assert np.array_equal(rnd, run_baseline("oracle", maps, schedule, seed=3))
    assert np.array_equal(rnd, run_baseline("q_learning", maps, schedule, seed=3))
    model, _, s = tiny_model("compact")
    icrl = InContextAgent(model, s, max_context=1024).play(maps, schedule, seed=3).returns
    assert np.array_equal(rnd, icrl)
    assert set(np.unique(rnd)) <= {0.0, 1.0}
    assert not np.array_equal(rnd, run_baseline("random", maps, schedule, seed=4))


def test_q_learning_baseline_learns():
    maps = make_splits(0, 0).heldout[:10]
    out = run_baseline("q_learning", maps, paper_schedule(), seed=1)
    assert out[:, -10:].mean() > out[:, :10].mean()
    with pytest.raises(ValueError, match="baseline"):
        run_baseline("dqn", maps, [1.0], seed=0)


def test_optimistic_q_learning_baseline_beats_the_zero_initialised_one():
    """Untried moves start at the largest return, so it explores systematically and does not walk
    into the same hole again: on small maps its greedy phase nearly always reaches the goal."""
    maps = make_splits(0, 0).heldout[:20]
    zero = run_baseline("q_learning", maps, paper_schedule(), seed=1)
    optimistic = run_baseline("q_optimistic", maps, paper_schedule(), seed=1)
    assert optimistic[:, -10:].mean() > max(0.9, zero[:, -10:].mean() + 0.2)
    # The same exploration draws: the first, fully random episodes are identical.
    assert np.array_equal(optimistic[:, :2], zero[:, :2])


def test_summarize_hand_computed():
    returns = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    s = summarize(returns, [0.0, 1.0, 1.0], last_k=1)
    assert s["mean_return"] == [0.0, 0.5, 1.0]
    assert s["ci95"] == pytest.approx([0.0, round(1.96 * np.sqrt(0.5) / np.sqrt(2), 4), 0.0])
    assert s["last1"] == 1.0
    assert s["first_episodes"] == 0.0
    assert s["overall"] == pytest.approx(0.5)
    assert s["goal_found_before_greedy"] == 0.0
    assert s["greedy_return_if_found"] is None
    assert s["greedy_return_if_not_found"] == pytest.approx(0.75)
    assert s["episodes_to_first_success"] == [1, 2]
    assert s["first_success_histogram"] == [0, 1, 1]
    assert s["first_success_median"] == 1.5 and s["never_succeeded"] == 0.0
    assert s["per_map"] == returns.tolist()
    # Greedy episodes 1 and 2: after a failure map 0 ep 1 (1), map 1 ep 1 (0), map 1 ep 2 (1);
    # after a success map 0 ep 2 (1).
    assert s["greedy_after_failure"] == pytest.approx(2 / 3) and s["greedy_after_success"] == 1.0


def test_write_report(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_report({"a": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"a": [1, 2]}


def test_repeated_failures_counts_greedy_replays_of_a_failed_path():
    from icrl_lightning.evaluation.report import repeated_failures

    schedule = [0.0, 1.0, 1.0, 1.0]
    returns = np.array([[0.0, 0.0, 0.0, 1.0],    # greedy fails twice: once new, once a replay
                        [1.0, 1.0, 0.0, 0.0]])   # a replay of a success is not counted
    paths = [[[0, 1], [0, 4], [0, 4], [0, 3, 6]],
             [[0, 3, 6], [0, 3, 6], [0, 4], [0, 1]]]
    # Greedy failures: map 0 episodes 1 (path differs from episode 0), 2 (replays 1);
    # map 1 episodes 2 (after a success), 3 (a different path). One replay in four.
    assert repeated_failures(returns, paths, schedule) == 0.25
    assert repeated_failures(np.ones((2, 4)), paths, schedule) is None


def test_summarize_all_greedy_schedule():
    s = summarize(np.array([[1.0, 1.0], [0.0, 1.0]]), [1.0, 1.0], last_k=1)
    assert s["mean_return"] == [0.5, 1.0]


def test_first_success_distribution_counts_never():
    returns = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    s = summarize(returns, [0.0, 0.0, 1.0], last_k=1)
    assert s["episodes_to_first_success"] == [None, 0, 2, None]
    assert s["first_success_histogram"] == [1, 0, 1]
    assert s["never_succeeded"] == 0.5 and s["first_success_median"] == 1.0
    assert s["goal_found_before_greedy"] == 0.25
    assert s["greedy_return_if_found"] == 1.0 and s["greedy_return_if_not_found"] == pytest.approx(1 / 3)
    none = summarize(np.zeros((2, 3)), [0.0, 0.0, 1.0], last_k=1)
    assert none["first_success_median"] is None and none["never_succeeded"] == 1.0
    assert none["first_success_histogram"] == [0, 0, 0]


def test_print_table_rows_per_agent_and_phase():
    from rich.console import Console

    from icrl_lightning.evaluation.report import print_table, summarize_phases

    schedule = [0.0, 1.0]
    returns = np.array([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    s = summarize(returns, schedule * 2, last_k=1)
    s["phases"] = summarize_phases(returns, schedule, 2, last_k=1)
    assert s["phases"][0]["last1"] == 1.0 and s["phases"][1]["last1"] == 0.5
    assert s["phases"][1]["first_success_median"] == 1.0
    report = {"last_k": 1, "n_maps": 2, "n_episodes": 4, "scenario": "nonstationary", "agents": {"icrl": s}}
    console = Console(record=True, width=140)
    print_table(report, console)
    text = console.export_text()
    assert "icrl (map A)" in text and "icrl (map B)" in text and "nonstationary" in text
    assert "UNTRAINED" not in text


def test_print_table_says_when_the_model_is_untrained():
    """``validate`` without ``--ckpt_path`` plays random weights: the report says ``untrained`` and
    the table's title starts with it."""
    from rich.console import Console

    from icrl_lightning.evaluation.report import print_table

    s = summarize(np.array([[0.0, 1.0], [0.0, 0.0]]), [0.0, 1.0], last_k=1)
    base = {"last_k": 1, "n_maps": 2, "n_episodes": 2, "scenario": "standard", "agents": {"icrl": s}}
    titles = {}
    for untrained in (True, False, None):
        report = dict(base) if untrained is None else {**base, "untrained": untrained}
        console = Console(record=True, width=140)
        printed = []
        console.print = printed.append  # the Table itself, to read its title
        print_table(report, console)
        (table,) = printed
        titles[untrained] = str(table.title)
        Console.print(console, table)
        text = " ".join(console.export_text().split())
        assert ("UNTRAINED MODEL" in text) == bool(untrained)
    assert titles[True].startswith("UNTRAINED MODEL")
    assert "In-context evaluation (standard): 2 maps x 2 episodes" in titles[True]
    assert titles[False].startswith("In-context evaluation (standard)") and "UNTRAINED" not in titles[False]
    assert titles[None] == titles[False]  # reports written before the key existed


def test_conflict_probe_reads_the_agents_own_trials(tmp_path, repo_root):
    """``tools/conflict_probe.py --report``: greedy episodes whose first tile is a conflict, split by
    first / later conflict of a map and by where the recent visit was, on a hand-made report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("conflict_probe", repo_root / "tools" / "conflict_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rows = ["SFF", "FHF", "FFG"]  # goal at tile 8, hole at tile 4
    report = {"schedule": [0.0, 0.0, 1.0, 1.0], "last_k": 2, "maps": [rows],
              "trajectories": [[[0, 1, 2, 5, 8], [0, 3, 4], [0, 3, 4], [0, 1, 2, 5, 8]]],
              "actions": [[[2, 2, 1, 1], [1, 2], [1, 2], [2, 2, 1, 1]]]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    c = probe.report_view(str(path))
    first = "first conflict of a map, recent visit in an exploration episode"
    later = "later conflict of a map, recent visit in a greedy episode"
    # Episode 2 (greedy) copies the failed exploration episode 1; episode 3 follows the success.
    assert (c[first, "n"], c[first, "success"], c[first, "recent"]) == (1, 0, 1)
    assert (c[later, "n"], c[later, "success"], c[later, "recent"]) == (1, 1, 0)
    assert sum(v for (k, f), v in c.items() if f == "n") == 2


def test_print_table_drops_the_exploration_split_without_exploring_episodes_and_shows_regret():
    """Bandits: every pull is greedy, so found / g|found / g|not would always read 0 and "-"; the
    table leaves them out and shows the cumulative regret instead. Frozen Lake keeps them."""
    from rich.console import Console

    from icrl_lightning.evaluation.report import print_table

    def header(report: dict) -> str:
        console = Console(record=True, width=200)
        print_table(report, console)
        return console.export_text()

    greedy = [1.0] * 3
    s = summarize(np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), greedy, last_k=1)
    s["regret"] = 1.25
    text = header({"last_k": 1, "n_maps": 2, "n_episodes": 3, "scenario": "standard", "schedule": greedy,
                   "agents": {"icrl": s}})
    assert "g|found" not in text and "found" not in text and "regret" in text and "1.25" in text
    explore = [0.0, 1.0, 1.0]
    s = summarize(np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]), explore, last_k=1)
    text = header({"last_k": 1, "n_maps": 2, "n_episodes": 3, "scenario": "standard", "schedule": explore,
                   "agents": {"icrl": s}})
    assert "g|found" in text and "regret" not in text
