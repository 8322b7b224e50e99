"""The optimistic teacher under study (``icrl_lightning.experimental.teacher``): its labels against
a hand-played tabular learner, the margin loss against hand computation, the batch field at the
action positions, and a tiny sweep whose setting runs the teacher's own command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from icrl_lightning.checks import InputError
from icrl_lightning.data.stream import ReplayStream
from icrl_lightning.experimental.teacher import TeacherModule, TeacherStream, margin_loss, teacher_actions
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
    # Row 0 already leads by 3 >= 2; row 1 leads by 1: relu(0 + 2 - 1) = 1; rows 2 and 3 rank nothing.
    assert loss.item() == pytest.approx(1 / 4) and hit.item() == 1.0
    loss.backward()
    assert q.grad[1, 1].item() == pytest.approx(-1 / 4)
    assert q.grad[[0, 2, 3]].abs().sum().item() == 0
    zero, _ = margin_loss(q, torch.zeros_like(labels), 2.0)
    assert zero.item() == 0
    # Averaged over the labelled rows (0, 1 and 2) instead of all four.
    assert margin_loss(q, labels, 2.0, average="labelled")[0].item() == pytest.approx(1 / 3)


def test_stream_puts_the_labels_at_the_action_positions(compact, synthetic):
    episodes, weights, _ = synthetic(compact, n_maps=3, n_eps=6)
    with pytest.raises(ValueError, match="unknown batch fields"):
        ReplayStream(episodes, weights, 64, compact.pad_id, 4, (3, 5), fields={"teacher"})
    stream = TeacherStream(episodes, weights, 64, compact.pad_id, 4, (3, 5), fields={"teacher"})
    chunk = next(stream.chunks(np.random.default_rng(0), sorted(episodes)))
    batch = stream.pack(chunk)
    expected = np.concatenate(teacher_actions(chunk, 4))
    assert batch["teacher"].shape == (64, 4)
    assert np.array_equal(batch["teacher"][batch["q_mask"]].numpy(), expected)
    assert not batch["teacher"][~batch["q_mask"]].any()
    plain = TeacherStream(episodes, weights, 64, compact.pad_id, 4, (3, 5))
    assert "teacher" not in plain.pack(chunk)


def test_bad_teacher_settings_are_input_errors(tiny_backbone):
    with pytest.raises(InputError, match="model.teacher_weight=-1"):
        TeacherModule(teacher_weight=-1, backbone=tiny_backbone())
    with pytest.raises(InputError, match="model.teacher_average='rows'"):
        TeacherModule(teacher_average="rows", backbone=tiny_backbone())
    with pytest.raises(InputError, match="dqn objective"):
        TeacherModule(teacher_weight=1, objective="dpt", backbone=tiny_backbone())


def test_a_sweep_setting_runs_the_teachers_command(tmp_path, capsys):
    from tests.test_sweep import QUICKSTART, TINY

    data = str(tmp_path / "data")
    doc = {"name": "t", "configs": [QUICKSTART], "seeds": [0], "steps": [2],
           "settings": {"teacher": {**TINY, "data.data_dir": data, "cli": "icrl_lightning.experimental.teacher",
                                    "model.teacher_weight": 3.0}},
           "out_dir": str(tmp_path / "sweeps"), "launcher": {"cluster": "inline"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    (job,) = plan(load_sweep(path))
    assert main([str(path), "--dry-run"]) == 0
    assert "python -m icrl_lightning.experimental.teacher fit" in capsys.readouterr().out
    assert main([str(path)]) == 0
    saved = torch.load(job.checkpoint(2), map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved["teacher_weight"] == 3.0
    report = json.loads(job.report("heldout", 2).read_text())
    assert report["checkpoint_step"] == 2 and not report["untrained"]
    doc["settings"]["teacher"]["cli"] = "nope.teacher"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match=r"settings.teacher.cli='nope.teacher' must name a module"):
        load_sweep(path)
