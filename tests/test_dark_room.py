"""The Dark Room family: splits, the gymnasium environment, the oracle, the baselines, the
serialization of its episodes, and a fit + validate through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from icrl_lightning.backbones import build_tokenizer
from icrl_lightning.behaviour import QLearning
from icrl_lightning.checks import InputError
from icrl_lightning.cli import main
from icrl_lightning.envs import DarkRoom, FrozenLake, ProblemFamily
from icrl_lightning.envs.dark_room import ENV_ID, room_task, task_goal
from icrl_lightning.evaluation import paper_schedule, run_baseline
from icrl_lightning.module import ICRLModule
from icrl_lightning.serialize import Serializer

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf/experiment/dark_room_quickstart.yaml"


def _distance(task) -> int:
    size, r, c = task_goal(task)
    return abs(r - size // 2) + abs(c - size // 2)


def test_splits_are_disjoint_deterministic_and_shared_across_seeds():
    fam = DarkRoom()
    s = fam.splits(seed=0, n_train=65)
    assert isinstance(fam, ProblemFamily)
    assert len(s.train) == 65 and len(s.heldout) == 16 and len(s.ood) == 121
    assert len(set(s.train)) == 65 and not set(s.train) & set(s.heldout)
    assert set(s.train) | set(s.heldout) == {room_task(9, g) for g in range(81)}
    assert not (set(s.train) | set(s.heldout)) & set(s.ood) and all(len(t) == 11 for t in s.ood)
    assert fam.splits(seed=0, n_train=65) == s
    # Another data seed trains on other goals first, never on a held-out one; the evaluation tasks
    # depend on the split seed only.
    other = fam.splits(seed=5, n_train=10, split_seed=0)
    assert other.heldout == s.heldout and other.ood == s.ood
    assert set(other.train) <= set(s.train) and other.train != s.train[:10]
    assert fam.splits(seed=0, n_train=65, split_seed=1).heldout != s.heldout
    with pytest.raises(InputError, match=r"data.num_train_maps=66 is out of range: allowed \[0, 65\]"):
        fam.splits(seed=0, n_train=66)


def test_environment_follows_ad_eps_dark_room():
    task = room_task(9, 4 * 9 + 6)  # two cells right of the centre
    env = gym.make(ENV_ID, task=task, max_episode_steps=20)
    obs, _ = env.reset(seed=0)
    assert obs == 40 and env.action_space.n == 5 and env.observation_space.n == 81
    steps = [env.step(a) for a in (2, 2, 4, 4, 0)]  # right, right (goal), stay, stay, left
    assert [s[0] for s in steps] == [41, 42, 42, 42, 41]
    assert [s[1] for s in steps] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert not any(s[2] or s[3] for s in steps)  # the goal does not end the episode
    for _ in range(14):
        *_, terminated, truncated, _ = env.step(3)
        assert not terminated and not truncated
    *_, terminated, truncated, _ = env.step(3)
    assert truncated and not terminated  # the horizon: 20 steps
    corner = gym.make(ENV_ID, task=room_task(9, 0))
    corner.reset()
    for _ in range(6):
        corner.step(3)  # up into the wall: clipped
    assert corner.unwrapped.pos == (0, 4)
    with pytest.raises(InputError, match="one 'G'"):
        task_goal(("FFF", "FFF", "FFF"))


def test_oracle_is_optimal_on_every_goal():
    fam = DarkRoom()
    tasks = [room_task(9, g) for g in range(81)]
    oracle = run_baseline("oracle", tasks, [1.0], seed=0, max_episode_steps=20, env=fam)[:, 0]
    # Reaching the goal takes at least its Manhattan distance d, and then every remaining step can
    # be spent on it: 20 - d + 1 (20 when it is the start cell). The oracle gets exactly that.
    best = np.array([20 if _distance(t) == 0 else 21 - _distance(t) for t in tasks])
    assert np.array_equal(oracle, best)
    assert fam.optimal_actions(room_task(9, 40))[40].tolist() == [False, False, False, False, True]


def test_baselines_behave_as_their_theory_says():
    fam = DarkRoom()
    tasks = fam.splits(0, 0).heldout
    schedule = paper_schedule()
    out = {name: run_baseline(name, tasks, schedule, seed=1, max_episode_steps=20, env=fam)
           for name in ("random", "q_learning", "q_optimistic", "oracle")}
    last = {name: r[:, -10:].mean() for name, r in out.items()}
    # Greedy episodes of an optimistic learner sweep untried moves until the goal is found, then walk
    # to it; the zero-initialised learner only follows where random exploration found it.
    assert last["random"] < last["q_learning"] <= last["oracle"]
    assert last["q_optimistic"] > last["random"]
    assert out["oracle"][:, -10:].min() > 0  # every goal of the 9 x 9 room is reachable in 20 steps


def test_behaviour_plays_full_horizon_episodes():
    fam = DarkRoom()
    task = fam.splits(0, 1).train[0]
    eps = QLearning().run(fam, task, 7, 30, [0, 3, 7])
    assert len(eps) == 30 and all(len(e.actions) == 20 and e.truncated and not e.terminated for e in eps)
    assert all(e.map_id == 7 and e.map_rows == task and set(e.actions) <= set(range(5)) for e in eps)
    assert QLearning().run(fam, task, 7, 30, [0, 3, 7]) == eps


def test_serialization_of_a_known_episode():
    tok = build_tokenizer("compact", max_tiles=81, actions=DarkRoom.actions)
    s = Serializer(tok, "compact", 81, DarkRoom.actions)
    from icrl_lightning.episodes import Episode

    e = Episode([40, 41, 41, 41], [2, 4, 0], [1.0, 1.0, 0.0], terminated=False, truncated=True)
    enc = s.encode(e)
    words = tok.convert_ids_to_tokens(enc.ids.tolist())
    assert words == ["<ep>", "o40", "right", "o41", "r1.0", "stay", "o41", "r1.0", "left", "o41", "<trunc>", "</ep>"]
    assert [words[p + 1] for p in enc.q_pos] == ["right", "stay", "left"]
    assert len(s.action_token_ids) == 5
    # Frozen Lake's vocabulary is untouched (its token ids, hence its trained models, do not change).
    assert "stay" not in build_tokenizer("compact").get_vocab()


def _tiny(tmp: Path) -> list[str]:
    return ["-c", str(CONFIG), "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
            "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp / "root"),
            "--data.num_train_maps", "4", "--data.episodes_per_map", "10", "--data.seq_len", "256",
            "--data.batch_size", "2", "--data.eval_maps", "3", "--data.data_dir", str(tmp / "data"),
            "--model.backbone.hidden_size", "32", "--model.backbone.num_layers", "1",
            "--model.backbone.num_heads", "2", "--model.backbone.intermediate_size", "64"]


def test_fit_then_validate_through_the_cli(tmp_path, capsys):
    fit = main(["fit", *_tiny(tmp_path)])
    assert isinstance(fit.model.env, DarkRoom) and isinstance(fit.datamodule.env, DarkRoom)
    assert fit.model.action_ids.numel() == 5
    (report_path,) = (tmp_path / "logs").rglob("report.json")
    report = json.loads(report_path.read_text())
    assert report["n_maps"] == 3 and report["n_episodes"] == 30
    assert all(len(m) == 9 for m in report["maps"])
    assert all(len(ep) == 21 for trial in report["trajectories"] for ep in trial)  # 20 steps each
    assert set(report["agents"]) == {"icrl", "no_context", "random", "q_learning", "q_optimistic", "oracle"}
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    loaded = ICRLModule.load_from_checkpoint(str(ckpt), weights_only=True)
    assert isinstance(loaded.env, DarkRoom) and loaded.env.max_episode_steps == 20 == loaded.protocol.max_episode_steps
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, fit.model.state_dict()[k]), k
    val = main(["validate", *_tiny(tmp_path), "--data.eval_split", "ood", "--ckpt_path", str(ckpt)])
    assert all(len(m) == 11 for m in val.datamodule.eval_maps)
    # Validated with Frozen Lake's configuration: one line naming both families.
    frozen = [str(REPO / "conf/experiment/quickstart.yaml") if a == str(CONFIG) else a for a in _tiny(tmp_path)]
    with pytest.raises(SystemExit):
        main(["validate", *frozen, "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert "was trained on DarkRoom (model.env), but data.env is FrozenLake" in err, err


def test_the_teachers_labels_have_one_column_per_action_of_the_family(tmp_path):
    # Dark Room has five actions; the teacher's batch field is as wide as the family's action set.
    cli = main([*_tiny(tmp_path), "--model.teacher", "{weight: 3.0}"], run=False)
    assert cli.model.teacher is not None and "teacher" in cli.model.batch_fields
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    batch = torch.utils.data.default_collate(list(cli.datamodule.train_stream(num_sequences=4)))
    assert batch["teacher"].shape == (*batch["q_mask"].shape, 5)
    assert batch["teacher"].any() and not batch["teacher"][~batch["q_mask"]].any()


def test_bad_dark_room_settings_fail_in_one_line(tmp_path, capsys):
    for extra, message in [
        (["--data.eval_maps", "17"], "data.eval_maps=17: the DarkRoom family has only 16 heldout tasks"),
        (["--data.env.train_goals", "81"], "data.env.train_goals=81 is out of range: allowed [1, 80]"),
        (["--model.backbone.max_tiles", "64"],
         "data.env: tasks of 81 tiles, but the model's tokenizer writes at most 64"),
        (["--model.evaluation.scenario", "stitching", "--model.evaluation.stitching_file", "data/stitching.json"],
         "model.evaluation.scenario=stitching plays a Frozen Lake map; data.env is DarkRoom"),
    ]:
        with pytest.raises(SystemExit):
            main(["validate", *_tiny(tmp_path), *extra])
        err = capsys.readouterr().err
        assert message in err, (extra, err)


def test_choosing_the_class_on_the_command_line_keeps_its_own_defaults(print_config):
    """jsonargparse carries init arguments of the same name over when the class changes; Dark Room
    names its horizon apart from Frozen Lake's ``max_episode_steps``, so it keeps its 20."""
    cfg = print_config(["fit", "-c", str(REPO / "conf/experiment/quickstart.yaml"),
                        "--data.env=icrl_lightning.envs.DarkRoom", "--print_config"])
    assert cfg["data"]["env"]["init_args"] == {"size": 9, "train_goals": 65, "ood_size": 11, "horizon": 20}


def test_frozen_lake_is_a_problem_family():
    fam = FrozenLake()
    assert isinstance(fam, ProblemFamily) and fam.n_actions == 4 and fam.rewards_per_episode == 1
    rows = ("SFG",)
    assert fam.n_observations(rows) == 3 and fam.oracle_actions(rows).tolist() == [2, 2, 0]
