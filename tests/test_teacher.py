"""The optimistic teacher (``model.teacher``): its labels against a hand-played tabular learner,
the margin loss against hand computation, the batch field at the action positions, its settings,
its loss in a training step; and a sweep setting's ``cli`` (an experimental command) on a module
made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from icrl_lightning.checks import InputError
from icrl_lightning.data.context import teacher_actions
from icrl_lightning.data.stream import ReplayStream
from icrl_lightning.module import ICRLModule
from icrl_lightning.qlearning import margin_loss
from icrl_lightning.serialize import EncodedEpisode
from icrl_lightning.sweep import load_sweep, main, plan

REPO = Path(__file__).resolve().parents[1]
T, F = True, False

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


def _ep(tiles, actions, rewards, map_id):
    n = len(actions)
    return EncodedEpisode(ids=np.zeros(n + 1, dtype=np.int32), q_pos=np.arange(n, dtype=np.int32),
                          actions=np.array(actions), rewards=np.array(rewards, dtype=np.float32),
                          tiles=np.array(tiles), map_id=map_id, success=bool(sum(rewards)))


def test_labels_follow_an_optimistic_learner_replaying_the_context_until_a_goal():
    chunk = [_ep([0, 1], [2, 1], [0, 0], 0),        # right, then down into a hole
             _ep([0, 1, 2], [2, 2, 1], [0, 0, 1], 0),  # right, right, down onto the goal
             _ep([0], [3], [0], 0),                  # after the goal: no labels
             _ep([0], [0], [0], 1),                  # another map: its own table
             _ep([0], [0], [0], -1)]                 # an unknown map: no labels
    a, b, c, d, e = teacher_actions(chunk, 4)
    # Every entry starts at 1: all four actions tie until tried.
    assert a.tolist() == [[T, T, T, T], [T, T, T, T]]
    # q[0, right] = 1 + 0.5 (0.9 * 1 - 1) = 0.95; q[1, down] = 1 + 0.5 (0 - 1) = 0.5 (a hole ends the episode).
    assert b.tolist() == [[T, T, F, T], [T, F, T, T], [T, T, T, T]]
    assert not c.any() and not e.any()
    assert d.tolist() == [[T, T, T, T]]


def test_margin_loss_by_hand():
    q = torch.tensor([[3.0, 0, 0, 0], [0, 1, 0, 0], [5, 5, 5, 5], [1, 2, 3, 4]], requires_grad=True)
    labels = torch.tensor([[T, F, F, F], [F, T, F, F], [T, T, T, T], [F, F, F, F]])
    loss, hit = margin_loss(q, labels, margin=2.0)
    # Row 0 already leads by 3 >= 2; row 1 leads by 1: relu(0 + 2 - 1) = 1; rows 2 and 3 rank
    # nothing. Averaged over the labelled rows (0, 1 and 2); row 3 has no label and no say.
    assert loss.item() == pytest.approx(1 / 3) and hit.item() == 1.0
    loss.backward()
    assert q.grad[1, 1].item() == pytest.approx(-1 / 3)
    assert q.grad[[0, 2, 3]].abs().sum().item() == 0
    zero, _ = margin_loss(q, torch.zeros_like(labels), 2.0)
    assert zero.item() == 0


def test_stream_puts_the_labels_at_the_action_positions(compact, synthetic):
    episodes, weights, _ = synthetic(compact, n_maps=3, n_eps=6)
    stream = ReplayStream(episodes, weights, 64, compact.pad_id, 4, (3, 5), fields={"teacher"}, n_actions=4)
    chunk = next(stream.chunks(np.random.default_rng(0), sorted(episodes)))
    batch = stream.pack(chunk)
    expected = np.concatenate(teacher_actions(chunk, 4))
    assert expected.any() and batch["teacher"].shape == (64, 4)
    assert np.array_equal(batch["teacher"][batch["q_mask"]].numpy(), expected)
    assert not batch["teacher"][~batch["q_mask"]].any()
    plain = ReplayStream(episodes, weights, 64, compact.pad_id, 4, (3, 5))
    assert "teacher" not in plain.pack(chunk)


def test_bad_teacher_settings_are_input_errors(tiny_backbone):
    with pytest.raises(InputError, match="model.teacher.weight=-1"):
        ICRLModule(teacher={"weight": -1}, backbone=tiny_backbone())
    with pytest.raises(InputError, match="model.teacher.margin=0"):
        ICRLModule(teacher={"margin": 0}, backbone=tiny_backbone())
    with pytest.raises(InputError, match="model.teacher: the teacher's margin loss sits beside the dqn objective"):
        ICRLModule(teacher={}, objective="dpt", backbone=tiny_backbone())


def test_the_teacher_adds_its_margin_loss_to_the_training_step(tiny_backbone, compact, synthetic):
    module = ICRLModule(backbone=tiny_backbone(), teacher={"weight": 2.0, "margin": 0.5})
    plain = ICRLModule(backbone=tiny_backbone())
    plain.load_state_dict(module.state_dict())
    assert "teacher" in module.batch_fields and "teacher" not in plain.batch_fields
    assert module.hparams.teacher == {"weight": 2.0, "margin": 0.5}  # saved as a plain dict
    episodes, weights, _ = synthetic(module.serializer, n_maps=3, n_eps=6)
    stream = ReplayStream(episodes, weights, 64, module.serializer.pad_id, 2, (3, 5), fields={"teacher"})
    batch = torch.utils.data.default_collate(list(stream))
    logged = {}
    module.log = plain.log = lambda name, value, **kw: logged.__setitem__(name, value)
    torch.manual_seed(0)
    with_teacher = module.training_step(batch, 0)
    teacher_loss = logged["train/teacher_loss"]
    assert 0 < logged["train/teacher_share"] <= 1
    torch.manual_seed(0)
    without = plain.training_step(batch, 0)
    q = module.q_values(batch["input_ids"], batch["q_mask"])
    expected, _ = margin_loss(q, batch["teacher"][batch["q_mask"]], 0.5 * module.td.reward_scale)
    assert expected.item() > 0  # an untrained model ranks the teacher's moves below a margin of 15
    assert teacher_loss.item() == pytest.approx(expected.item())
    assert with_teacher.item() == pytest.approx(without.item() + 2.0 * expected.item(), rel=1e-5)


def test_a_sweep_setting_runs_an_experimental_command(tmp_path, capsys, monkeypatch):
    """A sweep setting's ``cli`` names a module whose ``main(args)`` runs fit and validate (an
    experimental command with its own model class); its options reach the checkpoint."""
    from tests.test_sweep import QUICKSTART, TINY

    (tmp_path / "probe_cli.py").write_text(
        "from icrl_lightning.cli import main as core_main\n"
        "from icrl_lightning.module import ICRLModule\n\n\n"
        "class ProbeModule(ICRLModule):\n"
        "    def __init__(self, probe: int = 0, **kwargs):\n"
        "        super().__init__(**kwargs)\n\n\n"
        "def main(args=None):\n"
        "    return core_main(args, ProbeModule, prog='python -m probe_cli')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = str(tmp_path / "data")
    doc = {"name": "t", "configs": [QUICKSTART], "seeds": [0], "steps": [2],
           "settings": {"probe": {**TINY, "data.data_dir": data, "cli": "probe_cli", "model.probe": 7}},
           "out_dir": str(tmp_path / "sweeps"), "launcher": {"cluster": "inline"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    (job,) = plan(load_sweep(path))
    assert main([str(path), "--dry-run"]) == 0
    assert "python -m probe_cli fit" in capsys.readouterr().out
    assert main([str(path)]) == 0
    saved = torch.load(job.checkpoint(2), map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved["probe"] == 7 and saved["teacher"] == {"weight": 3.0, "margin": 0.1}  # the quickstart's
    report = json.loads(job.report("heldout", 2).read_text())
    assert report["checkpoint_step"] == 2 and not report["untrained"]
    doc["settings"]["probe"]["cli"] = "nope.probe"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match=r"settings.probe.cli='nope.probe' must name a module"):
        load_sweep(path)


def test_teacher_on_the_command_line(print_config):
    quickstart = str(REPO / "conf/experiment/quickstart.yaml")
    base = print_config(["fit", "-c", quickstart, "--print_config"])
    assert base["model"]["teacher"] == {"weight": 3.0, "margin": 0.1}
    for off in (["--model.teacher", "null"], ["-c", str(REPO / "conf/experiment/q7.yaml")]):
        assert print_config(["fit", "-c", quickstart, *off, "--print_config"])["model"]["teacher"] is None, off
    long = print_config(["fit", "-c", quickstart, "-c", str(REPO / "conf/experiment/long.yaml"), "--print_config"])
    assert long["model"]["teacher"] == {"weight": 3.0, "margin": 0.1}  # the long recipe keeps the teacher
    assert long["data"]["permute_observations"] == 0.5 and long["trainer"]["max_steps"] == 6600
    # The quickstart (Q9) permutes a quarter of its sequences; Q7's and Q8's overlays none; Q8 keeps the teacher.
    assert base["data"]["permute_observations"] == 0.25
    for name, teacher in (("q7", None), ("q8", {"weight": 3.0, "margin": 0.1})):
        overlay = str(REPO / f"conf/experiment/{name}.yaml")
        cfg = print_config(["fit", "-c", quickstart, "-c", overlay, "--print_config"])
        assert cfg["data"]["permute_observations"] == 0.0 and cfg["model"]["teacher"] == teacher, name
    weight = print_config(["fit", "-c", quickstart, "-c", str(REPO / "conf/experiment/q7.yaml"),
                           "--model.teacher.weight", "1.5", "--print_config"])["model"]["teacher"]
    assert weight == {"weight": 1.5, "margin": 0.1}
