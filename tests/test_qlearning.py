"""The RL math against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from icrl_lightning.qlearning import (
    action_q_values,
    bellman_loss,
    conservative_penalty,
    double_dqn_targets,
    next_step,
    optimal_action_loss,
    polyak_,
    position_weights,
    successful_episode,
)


def test_double_dqn_targets_hand_computed():
    reward = torch.tensor([0.0, 1.0, 0.0, 1.0])
    done = torch.tensor([False, True, False, False])
    q_online_next = torch.tensor([
        [1.0, 3.0, 2.0, 0.0],  # argmax 1
        [5.0, 0.0, 0.0, 0.0],  # masked (done)
        [0.0, 0.0, 0.0, 9.0],  # argmax 3
        [0.0, 0.0, 4.0, 1.0],  # argmax 2
    ])
    q_target_next = torch.tensor([
        [10.0, 20.0, 30.0, 40.0],  # target's own max (40) must NOT be used
        [7.0, 7.0, 7.0, 7.0],
        [1.0, 2.0, 3.0, 4.0],
        [-1.0, -2.0, -3.0, 8.0],
    ])
    y = double_dqn_targets(reward, done, q_online_next, q_target_next, gamma=0.9, reward_scale=30.0)
    expected = torch.tensor([0.9 * 20.0, 30.0, 0.9 * 4.0, 30.0 + 0.9 * -3.0])
    torch.testing.assert_close(y, expected)


def test_double_dqn_targets_gamma_and_scale():
    reward = torch.tensor([1.0, 0.0])
    done = torch.tensor([False, True])
    qo = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    qt = torch.tensor([[0.0, 2.0, 0.0, 0.0], [100.0, 100.0, 100.0, 100.0]])
    y = double_dqn_targets(reward, done, qo, qt, gamma=0.5, reward_scale=2.0)
    torch.testing.assert_close(y, torch.tensor([2.0 + 0.5 * 2.0, 0.0]))


def test_next_step():
    v = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert torch.equal(next_step(v), torch.tensor([[2.0, 2.0], [3.0, 3.0], [3.0, 3.0]]))
    assert torch.equal(next_step(torch.tensor([4, 5, 6])), torch.tensor([5, 6, 6]))


def test_bellman_loss_mse():
    q = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = torch.tensor([2.0, 2.0, 5.0], requires_grad=True)
    loss = bellman_loss(q, y, "mse")
    torch.testing.assert_close(loss, torch.tensor(5.0 / 3.0))
    loss.backward()
    torch.testing.assert_close(q.grad, torch.tensor([-2.0, 0.0, -4.0]) / 3.0)
    assert y.grad is None  # targets are constants


def test_bellman_loss_normalized():
    q = torch.tensor([1.0, 2.0, 3.0, 0.0])
    y = torch.tensor([2.0, 2.0, 5.0, -4.0])
    seq = torch.tensor([0, 0, 1, 1])
    # sequence means of y: 2.0 and 0.5; squared errors 1, 0, 4, 16
    expected = (1.0 / 2.0 + 0.0 / 2.0 + 4.0 / 0.5 + 16.0 / 0.5) / 4
    torch.testing.assert_close(bellman_loss(q, y, "normalized", seq), torch.tensor(expected))


def test_bellman_loss_normalized_uses_abs_of_negative_mean():
    q = torch.tensor([0.0, 0.0])
    y = torch.tensor([-2.0, -4.0])
    seq = torch.tensor([0, 0])
    torch.testing.assert_close(bellman_loss(q, y, "normalized", seq), torch.tensor((4.0 / 3.0 + 16.0 / 3.0) / 2))


def test_bellman_loss_errors():
    q, y = torch.zeros(2), torch.ones(2)
    with pytest.raises(ValueError, match="sequence"):
        bellman_loss(q, y, "normalized")
    with pytest.raises(ValueError, match="huber"):
        bellman_loss(q, y, "huber")


def test_conservative_penalty_hand_computed():
    ln3 = float(torch.log(torch.tensor(3.0)))
    q = torch.tensor([[0.0, ln3, 0.0, 0.0],   # logsumexp = ln 6; taken ln 3 -> ln 2
                      [5.0, 5.0, 5.0, 5.0]])  # logsumexp = 5 + ln 4; taken 5 -> ln 4
    action = torch.tensor([1, 2])
    expected = (torch.log(torch.tensor(2.0)) + torch.log(torch.tensor(4.0))) / 2
    torch.testing.assert_close(conservative_penalty(q, action), expected)
    # Its gradient lowers the actions not taken and raises the one taken.
    q = q.clone().requires_grad_(True)
    conservative_penalty(q, action).backward()
    assert q.grad[0, 1] < 0 and (q.grad[0, [0, 2, 3]] > 0).all()

    # `where` keeps only the selected rows; the others count as zero in the mean.
    torch.testing.assert_close(conservative_penalty(q.detach(), action, torch.tensor([False, True])),
                               torch.log(torch.tensor(4.0)) / 2)


def test_per_action_weights_hand_computed():
    q_taken, y = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 0.0, 0.0])
    w = torch.tensor([0.5, 2.0, 0.5])
    assert bellman_loss(q_taken, y, "mse", weight=w).item() == pytest.approx((0.5 * 1 + 2 * 4 + 0.5 * 16) / 3)
    seq = torch.tensor([0, 0, 1])  # sequence mean targets 1 and 2 -> errors / 1, / 1, / 2
    assert bellman_loss(q_taken, y + torch.tensor([1.0, 1.0, 2.0]), "normalized", seq, w).item() == \
        pytest.approx((0.5 * 0 + 2 * 1 + 0.5 * 4 / 2) / 3)
    q = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    ln4 = float(torch.log(torch.tensor(4.0)))
    assert conservative_penalty(q, torch.tensor([0, 1]), weight=torch.tensor([3.0, 1.0])).item() == \
        pytest.approx((3 * ln4 + ln4) / 2)


def test_successful_episode_marks_every_action_of_an_episode_that_reached_a_goal():
    # Three episodes: 3 actions ending on the goal, 2 ending in a hole, 1 reaching the goal.
    reward = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    done = torch.tensor([False, False, True, False, True, True])
    assert successful_episode(reward, done).tolist() == [True, True, True, False, False, True]
    with pytest.raises(ValueError, match="close an episode"):
        successful_episode(reward[:3], torch.tensor([False, True, False]))


def test_position_weights_hand_computed():
    marked = torch.tensor([True, False, False, True])
    # weight 3 on the marked rows, 1 elsewhere: [3, 1, 1, 3], mean 2
    torch.testing.assert_close(position_weights(marked, 3.0), torch.tensor([1.5, 0.5, 0.5, 1.5]))
    # weight 0 drops the marked rows: [0, 1, 1, 0], mean 0.5
    torch.testing.assert_close(position_weights(marked, 0.0), torch.tensor([0.0, 2.0, 2.0, 0.0]))
    # weight 1, or every row marked: all ones
    assert torch.equal(position_weights(marked, 1.0), torch.ones(4))
    torch.testing.assert_close(position_weights(torch.ones(3, dtype=torch.bool), 7.0), torch.ones(3))
    assert position_weights(marked, 3.0).dtype == torch.float32
    # Scaled to mean 1, the weighted MSE of equal errors is the unweighted one.
    err = torch.tensor([2.0, 2.0, 2.0, 2.0])
    w = position_weights(marked, 5.0)
    assert w.mean().item() == pytest.approx(1.0)
    assert bellman_loss(err, torch.zeros(4), "mse", weight=w).item() == pytest.approx(4.0)


def test_action_q_values():
    torch.manual_seed(0)
    hidden = torch.randn(5, 8)
    lm_head = torch.nn.Linear(8, 20, bias=False)
    action_ids = torch.tensor([11, 3, 17, 0])
    q = action_q_values(hidden, lm_head.weight[action_ids])
    assert q.shape == (5, 4)
    torch.testing.assert_close(q, lm_head(hidden)[:, action_ids])
    # Column a is the logit of action_ids[a].
    torch.testing.assert_close(q[:, 2], hidden @ lm_head.weight[17])


def test_action_q_values_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, rows = torch.randn(64, 128) * 3, torch.randn(4, 128)
    exact = (hidden.double() @ rows.double().T).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = action_q_values(hidden, rows)
        rounded = hidden @ rows.T  # what a plain product gives under autocast
    assert q.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert (q - exact).abs().max() < 1e-3 < (rounded.float() - exact).abs().max()
    # bf16 inputs (a bf16 model): the product is still float32, and gradients reach them.
    h = hidden.bfloat16().requires_grad_()
    action_q_values(h, rows.bfloat16()).sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("alpha", [0.1, 0.01, 0.5, 1.0, 0.0])
def test_polyak_exact(alpha):
    torch.manual_seed(1)
    online = [torch.randn(7, 5), torch.randn(33), torch.randn(2, 3, 4), torch.randn(1000, 37)]
    old = [torch.randn_like(t) for t in online]
    target = [t.clone() for t in old]
    polyak_(target, online, alpha)
    for t, o, p in zip(target, online, old, strict=True):
        expected = alpha * o + (1 - alpha) * p
        assert torch.equal(t, expected)
    assert not any(torch.equal(t, p) for t, p in zip(target, old, strict=True)) or alpha == 0.0


def test_polyak_leaves_online_and_grad_alone():
    online = [torch.ones(3, requires_grad=True)]
    target = [torch.zeros(3)]
    polyak_(target, online, 0.25)
    assert torch.equal(target[0], torch.full((3,), 0.25))
    assert torch.equal(online[0].detach(), torch.ones(3))
    assert target[0].grad_fn is None


def test_no_bootstrap_across_an_episode_end_hand_computed():
    reward = torch.tensor([0.0, 1.0, 0.0, 0.0])
    done = torch.tensor([False, True, False, True])
    q_next = torch.tensor([[1.0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 4.0, 0], [5.0, 0, 0, 0]])
    y = double_dqn_targets(reward, done, q_next, q_next, 0.9, 30.0)
    assert y.tolist() == pytest.approx([1.8, 30.0, 3.6, 0.0])


def test_optimal_action_loss_is_the_cross_entropy_of_the_optimal_set():
    q = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    optimal = torch.tensor([[True, False, False, False], [True, True, False, False],
                            [False, True, False, False], [False, False, False, False]])
    loss, hit = optimal_action_loss(q, optimal)
    # log 4 (one of four), log 2 (two of four), 5 + log(1 + 3 e^-5) (the wrong one is high); the
    # last row has no optimal action and does not count.
    want = (math.log(4) + math.log(2) + 5 + math.log(1 + 3 * math.exp(-5))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert hit.item() == pytest.approx(2 / 3)  # argmax 0 is optimal in rows 0 and 1, not in row 2
    q.requires_grad_(True)
    optimal_action_loss(q, optimal)[0].backward()
    assert q.grad[3].abs().sum() == 0 and q.grad[2, 1] < 0 < q.grad[2, 0]
    none, _ = optimal_action_loss(q, torch.zeros_like(optimal))
    assert none.item() == 0
