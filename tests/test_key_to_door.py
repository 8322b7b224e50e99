"""The Dark Key-to-Door family: splits, the gymnasium environment, the oracle, the baselines, the
serialization of its episodes, and a fit + validate through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from icrl_lightning.backbones import build_tokenizer
from icrl_lightning.checks import InputError
from icrl_lightning.cli import main
from icrl_lightning.envs import DarkKeyToDoor, ProblemFamily
from icrl_lightning.envs.key_to_door import ENV_ID, key_door_task, task_cells
from icrl_lightning.episodes import Episode
from icrl_lightning.evaluation import paper_schedule, run_baseline
from icrl_lightning.serialize import Serializer

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf/experiment/key_to_door_quickstart.yaml"


def test_splits_are_disjoint_deterministic_and_shared_across_seeds():
    fam = DarkKeyToDoor()
    s = fam.splits(seed=0, n_train=6280)
    assert isinstance(fam, ProblemFamily)
    assert len(s.heldout) == 200 and len(s.ood) == 200 and len(set(s.train)) == 6280
    every = {key_door_task(9, k, d) for k in range(81) for d in range(81) if k != d}
    assert not set(s.train) & set(s.heldout) and set(s.train) | set(s.heldout) == every
    assert all(len(t) == 11 for t in s.ood) and not every & set(s.ood)
    assert fam.splits(seed=0, n_train=6280) == s
    other = fam.splits(seed=3, n_train=50, split_seed=0)
    assert other.heldout == s.heldout and other.ood == s.ood and set(other.train) <= set(s.train)
    assert fam.splits(seed=0, n_train=10, split_seed=1).heldout != s.heldout
    with pytest.raises(InputError, match=r"data.num_train_maps=6281 is out of range: allowed \[0, 6280\]"):
        fam.splits(seed=0, n_train=6281)
    with pytest.raises(InputError, match="one 'K'"):
        task_cells(("FFF", "FDF", "FFF"))


def test_environment_picks_up_the_key_then_pays_on_the_door():
    key, door = 4 * 9 + 5, 4 * 9 + 3  # right of the centre, left of it
    env = gym.make(ENV_ID, task=key_door_task(9, key, door), max_episode_steps=50)
    obs, _ = env.reset(seed=0)
    assert obs == 40 and env.observation_space.n == 162 and env.action_space.n == 5
    # left (the door, no key: nothing), right x2 (the key: 1), stay (held: nothing), left x2 (the door: 1), stay (1)
    steps = [env.step(a) for a in (0, 2, 2, 4, 0, 0, 4)]
    assert [s[0] for s in steps] == [39, 40, 41 + 81, 41 + 81, 40 + 81, 39 + 81, 39 + 81]  # held from the pick-up on
    assert [s[1] for s in steps] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert not any(s[2] or s[3] for s in steps)
    for _ in range(42):
        env.step(4)
    *_, terminated, truncated, _ = env.step(4)
    assert truncated and not terminated  # the horizon: 50 steps


def test_oracle_is_optimal():
    fam = DarkKeyToDoor()
    tasks = fam.splits(0, 0).heldout[:40] + [key_door_task(9, 40, 0)]  # and a key on the start cell
    oracle = run_baseline("oracle", tasks, [1.0], seed=0, max_episode_steps=50, env=fam)[:, 0]

    def best(task) -> int:
        # The key after d1 steps (at least one: a stay picks up a key on the start cell), the door d2
        # steps later, then every remaining step on it: 1 + (50 - d1 - d2 + 1).
        _, (kr, kc), (dr, dc) = task_cells(task)
        d1 = max(1, abs(kr - 4) + abs(kc - 4))
        return 1 + 50 - d1 - (abs(kr - dr) + abs(kc - dc)) + 1

    assert oracle.tolist() == [best(t) for t in tasks]


def test_baselines_behave_as_their_theory_says():
    fam = DarkKeyToDoor()
    tasks = fam.splits(0, 0).heldout[:30]
    out = {name: run_baseline(name, tasks, paper_schedule(), seed=1, max_episode_steps=50, env=fam)
           for name in ("random", "q_learning", "oracle")}
    last = {name: r[:, -10:].mean() for name, r in out.items()}
    assert last["random"] < last["q_learning"] < last["oracle"]


def test_serialization_of_a_known_episode():
    tok = build_tokenizer("compact", max_tiles=162, actions=DarkKeyToDoor.actions)
    s = Serializer(tok, "compact", 162, DarkKeyToDoor.actions)
    enc = s.encode(Episode([40, 41 + 81, 41 + 81], [2, 4], [1.0, 0.0], terminated=False, truncated=True))
    words = tok.convert_ids_to_tokens(enc.ids.tolist())
    assert words == ["<ep>", "o40", "right", "o122", "r1.0", "stay", "o122", "<trunc>", "</ep>"]


def test_fit_then_validate_through_the_cli(tmp_path):
    args = ["-c", str(CONFIG), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "root"),
            "--data.num_train_maps", "3", "--data.episodes_per_map", "6", "--data.seq_len", "512",
            "--data.batch_size", "2", "--data.eval_maps", "2", "--data.data_dir", str(tmp_path / "data"),
            "--model.backbone.hidden_size", "32", "--model.backbone.num_layers", "1",
            "--model.backbone.num_heads", "2", "--model.backbone.intermediate_size", "64"]
    fit = main(["fit", *args])
    assert isinstance(fit.model.env, DarkKeyToDoor) and fit.model.action_ids.numel() == 5
    (report_path,) = (tmp_path / "logs").rglob("report.json")
    report = json.loads(report_path.read_text())
    assert report["n_episodes"] == 30 and set(report["agents"]) >= {"icrl", "no_context", "oracle", "q_learning"}
    oracle = np.asarray(report["agents"]["oracle"]["per_map"])
    greedy = oracle[:, -10:]  # the protocol's greedy episodes: the optimal return every time
    assert greedy.min() > 0 and np.ptp(greedy, axis=1).max() == 0
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    val = main(["validate", *args, "--data.eval_split", "ood", "--ckpt_path", str(ckpt)])
    assert all(len(t) == 11 for t in val.datamodule.eval_maps)
