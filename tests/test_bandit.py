"""The Bernoulli bandit family: splits, the environment, the oracle, the baselines' regret, the
serialization of a pull, and a fit + validate through the CLI with regret in the report."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from icrl_lightning.backbones import build_tokenizer
from icrl_lightning.checks import InputError
from icrl_lightning.cli import main
from icrl_lightning.data.stream import ReplayStream
from icrl_lightning.envs import BernoulliBandit, ProblemFamily
from icrl_lightning.envs.bandit import ENV_ID, arm_means
from icrl_lightning.episodes import Episode
from icrl_lightning.evaluation import run_baseline
from icrl_lightning.serialize import Serializer

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf/experiment/bandit_quickstart.yaml"


def test_splits_are_disjoint_and_deterministic():
    fam = BernoulliBandit()
    s = fam.splits(seed=0, n_train=300)
    assert isinstance(fam, ProblemFamily) and fam.actions == ("A", "B", "C", "D", "E")
    assert len(s.train) == 300 and len(s.heldout) == 200 and len(s.ood) == 200
    assert not set(s.train) & (set(s.heldout) | set(s.ood)) and not set(s.heldout) & set(s.ood)
    assert all(len(t) == 5 for t in s.train + s.heldout + s.ood)
    assert all(0.4 <= m <= 0.6 for t in s.ood for m in arm_means(t))
    assert fam.splits(seed=0, n_train=300) == s
    assert fam.splits(seed=3, n_train=10, split_seed=0).heldout == s.heldout
    with pytest.raises(InputError, match="arm means"):
        arm_means(("0.5", "x"))


def test_a_pull_is_one_bernoulli_episode():
    task = ("0.100", "0.900")
    env = gym.make(ENV_ID, task=task)
    rewards = []
    for k in range(2000):
        obs, _ = env.reset(seed=k)
        obs2, r, terminated, truncated, _ = env.step(1)
        assert obs == obs2 == 0 and terminated and not truncated
        rewards.append(r)
    assert set(rewards) == {0.0, 1.0} and abs(np.mean(rewards) - 0.9) < 0.03


def test_behaviour_pulls_are_terminated_not_truncated():
    """As the agent writes them (a pull ends the episode; no time-limit marker in training data)."""
    from icrl_lightning.behaviour import QLearning

    fam = BernoulliBandit()
    eps = QLearning(q_init=1.0, history=10).run(fam, fam.splits(0, 1).train[0], 0, 20, [0])
    assert all(e.terminated and not e.truncated and len(e.actions) == 1 for e in eps)


def test_oracle_pulls_the_best_arm():
    fam = BernoulliBandit(arms=3)
    task = ("0.200", "0.700", "0.400")
    assert fam.oracle_actions(task).tolist() == [1] and fam.best_expected_return(task) == 0.7
    out = run_baseline("oracle", [task] * 20, [1.0] * 200, seed=0, env=fam)
    assert abs(out.mean() - 0.7) < 0.02


def test_bandit_baselines_behave_as_their_theory_says():
    fam = BernoulliBandit()
    task = ("0.300", "0.500", "0.450", "0.700", "0.650")
    best = 0.7
    n = 800

    def regret(name: str) -> np.ndarray:
        returns = run_baseline(name, [task] * 20, [1.0] * n, seed=2, env=fam)
        return np.cumsum(best - returns, axis=1).mean(axis=0)

    thompson, ucb, rnd = regret("thompson"), regret("ucb1"), regret("random")
    # Thompson sampling's regret grows sublinearly (800 pulls): the second half adds far less than
    # the first; random pulls lose about (0.7 - mean of the means) = 0.18 per pull, linearly.
    assert thompson[-1] - thompson[n // 2] < 0.5 * thompson[n // 2]
    assert abs(rnd[-1] / n - (best - 0.52)) < 0.03
    assert thompson[-1] < 0.3 * rnd[-1] and ucb[-1] < 0.6 * rnd[-1]
    greedy = regret("greedy")
    assert greedy[-1] < rnd[-1]
    with pytest.raises(ValueError, match="choose from"):
        run_baseline("lin_ucb", [task], [1.0], seed=0, env=fam)


def test_serialization_of_a_known_pull():
    fam = BernoulliBandit()
    tok = build_tokenizer("compact", max_tiles=1, actions=fam.actions)
    s = Serializer(tok, "compact", 1, fam.actions)
    won, lost = s.encode(Episode([0, 0], [2], [1.0], True)), s.encode(Episode([0, 0], [4], [0.0], True))
    assert tok.convert_ids_to_tokens(won.ids.tolist()) == ["<ep>", "o0", "C", "o0", "r1.0", "</ep>"]
    assert tok.convert_ids_to_tokens(lost.ids.tolist()) == ["<ep>", "o0", "E", "o0", "</ep>"]
    assert won.q_pos.tolist() == [1] and won.actions.tolist() == [2]


def test_outcome_observation_puts_arm_and_reward_in_one_token():
    fam = BernoulliBandit(outcome_observation=True)
    assert fam.n_observations(("0.1", "0.2")) == 11 and fam.largest_observations("ood") == 11
    assert fam.settings()["outcome_observation"] is True and "outcome_observation" not in BernoulliBandit().settings()
    env = fam.make_env(("0.000", "1.000", "0.000", "0.000", "0.000"))
    assert env.reset(seed=0)[0] == 0
    assert env.step(1)[:3] == (1 + 2 * 1 + 1, 1.0, True) and env.reset(seed=1)[0] == 0
    assert env.step(3)[:3] == (1 + 2 * 3, 0.0, True)
    tok = build_tokenizer("compact", max_tiles=11, actions=fam.actions)
    s = Serializer(tok, "compact", 11, fam.actions)
    won, lost = s.encode(Episode([0, 6], [2], [1.0], True)), s.encode(Episode([0, 9], [4], [0.0], True))
    assert tok.convert_ids_to_tokens(won.ids.tolist()) == ["<ep>", "o0", "C", "o6", "r1.0", "</ep>"]
    assert tok.convert_ids_to_tokens(lost.ids.tolist()) == ["<ep>", "o0", "E", "o9", "</ep>"]
    assert fam.optimal_actions(("0.2", "0.7", "0.1", "0.3", "0.5")).shape == (11, 5)
    # The tabular baselines never read the outcome (a pull ends the episode there): same pulls.
    tasks = BernoulliBandit().splits(0, 0).heldout[:4]
    for name in ("q_learning", "q_optimistic", "thompson", "greedy"):
        plain = run_baseline(name, tasks, [0.5] * 30, seed=3, env=BernoulliBandit())
        assert np.array_equal(plain, run_baseline(name, tasks, [0.5] * 30, seed=3, env=fam)), name


def _tiny(tmp: Path, *extra: str) -> list[str]:
    """The quickstart config at a tiny size, then ``extra`` overrides."""
    return ["-c", str(CONFIG), "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
            "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp / "root"),
            "--data.num_train_maps", "6", "--data.set_size_min", "20", "--data.set_size_max", "20",
            "--data.batch_size", "2", "--data.data_dir", str(tmp / "data"),
            "--model.backbone.hidden_size", "32", "--model.backbone.num_layers", "1",
            "--model.backbone.num_heads", "2", "--model.backbone.intermediate_size", "64", *extra]


def test_fit_then_validate_through_the_cli(tmp_path):
    args = _tiny(tmp_path, "--data.episodes_per_map", "40", "--data.behaviour.history", "20",
                 "--data.seq_len", "256", "--data.eval_maps", "3")
    fit = main(["fit", *args])
    assert isinstance(fit.model.env, BernoulliBandit) and fit.model.action_ids.numel() == 5
    (report_path,) = (tmp_path / "logs").rglob("report.json")
    report = json.loads(report_path.read_text())
    assert report["n_episodes"] == 100 and report["schedule"] == [1.0] * 100
    agents = {"icrl", "no_context", "random", "q_learning", "q_optimistic", "oracle", "ucb1", "thompson", "greedy"}
    assert set(report["agents"]) == agents
    for name, s in report["agents"].items():
        assert len(s["cumulative_regret"]) == 100, name
    assert report["agents"]["oracle"]["regret"] < report["agents"]["random"]["regret"]
    assert (report_path.parent / "curves.png").is_file() and not (report_path.parent / "trajectories.png").exists()
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    val = main(["validate", *args, "--data.eval_split", "ood", "--ckpt_path", str(ckpt)])
    assert all(0.4 <= m <= 0.6 for t in val.datamodule.eval_maps for m in arm_means(t))
    # Non-stationary: task B after 100 pulls; the regret of the second phase is against B's best arm.
    ns = main(["validate", *args, "--model.evaluation.scenario", "nonstationary", "--ckpt_path", str(ckpt)])
    rep = ns.model.eval_report
    assert rep["n_episodes"] == 200 and len(rep["agents"]["oracle"]["cumulative_regret"]) == 200
    maps, switch = rep["maps"], rep["switch_to"]
    best = np.array([[max(map(float, a)), max(map(float, b))] for a, b in zip(maps, switch, strict=True)])
    oracle = np.asarray(rep["agents"]["oracle"]["per_map"])
    want = np.cumsum(np.repeat(best, 100, axis=1) - oracle, axis=1).mean(axis=0)
    assert np.allclose(rep["agents"]["oracle"]["cumulative_regret"], want.round(4), atol=1e-4)


def _random_pulls(serializer, map_id: int, n: int, rng) -> list:
    return [serializer.encode(Episode([0, 0], [int(rng.integers(5))], [float(rng.random() < 0.5)], True,
                                      map_id=map_id)) for _ in range(n)]


def test_dpt_stream_marks_the_best_arm_and_keeps_one_task_per_sequence():
    fam = BernoulliBandit()
    tasks = [("0.100", "0.900", "0.200", "0.300", "0.400"), ("0.800", "0.100", "0.200", "0.300", "0.400")]
    tok = build_tokenizer("compact", max_tiles=1, actions=fam.actions)
    s = Serializer(tok, "compact", 1, fam.actions)
    rng = np.random.default_rng(0)
    episodes = {m: _random_pulls(s, m, 30, rng) for m in range(2)}
    weights = {m: np.ones(30) for m in range(2)}
    optimal = {m: fam.optimal_actions(t) for m, t in enumerate(tasks)}
    stream = ReplayStream(episodes, weights, 64, s.pad_id, 12, (8, 8), fields={"optimal"},
                          optimal_actions=optimal, set_per_sequence=True)
    best_arms = set()
    for batch in stream:
        rows = batch["optimal"][batch["q_mask"]]
        assert len(rows) == 8  # one set of 8 pulls (at most 48 tokens), the rest padding
        assert (rows.sum(dim=1) == 1).all() and (rows == rows[0]).all()  # one task: its best arm
        assert not batch["optimal"][~batch["q_mask"]].any()
        best_arms.add(int(rows[0].int().argmax()))
    assert best_arms == {0, 1}
    packed = ReplayStream(episodes, weights, 64, s.pad_id, 12, (8, 8), fields={"optimal"}, optimal_actions=optimal)
    assert any(int(b["q_mask"].sum()) > 8 for b in packed)  # sets follow one another in a sequence
    with pytest.raises(ValueError, match="optimal_actions table of every map"):
        ReplayStream(episodes, weights, 64, s.pad_id, 2, fields={"optimal"}, optimal_actions={0: optimal[0]})


def test_dpt_objective_fits_through_the_cli(tmp_path, capsys):
    args = _tiny(tmp_path, "--trainer.log_every_n_steps", "1", "--model.objective", "dpt",
                 "--data.episodes_per_map", "20", "--data.behaviour.epsilon", "1.0", "--data.behaviour.history", "null",
                 "--data.set_order", "random", "--data.set_per_sequence", "true", "--data.seq_len", "128",
                 "--data.eval_maps", "2")
    fit = main(["fit", *args])
    assert fit.model.batch_fields == {"optimal"}
    logged = fit.trainer.logged_metrics
    assert "train/dpt_loss" in logged and "train/td_loss" not in logged
    assert 0 <= float(logged["train/dpt_accuracy"]) <= 1
    with pytest.raises(SystemExit):
        main(["fit", *args, "--model.cql.weight", "1.0"])
    assert "model.cql: the dpt objective has no TD loss" in capsys.readouterr().err


def test_outcome_observation_fits_and_needs_the_tiles(tmp_path, capsys):
    args = _tiny(tmp_path, "--model.objective", "dpt", "--data.episodes_per_map", "20",
                 "--data.behaviour.epsilon", "1.0", "--data.behaviour.history", "null",
                 "--data.set_per_sequence", "true", "--data.seq_len", "128", "--data.eval_maps", "2",
                 "--data.env.init_args.outcome_observation", "true")
    with pytest.raises(SystemExit):
        main(["fit", *args, "--model.backbone.max_tiles", "1"])
    assert "model.backbone.max_tiles to 11" in capsys.readouterr().err
    fit = main(["fit", *args])
    assert fit.model.env.outcome_observation and fit.model.serializer.max_tiles == 11
    report = fit.model.eval_report
    assert len(report["agents"]["icrl"]["cumulative_regret"]) == 100
