"""InContextAgent: the KV-cached, lock-step agent against a plain full-recompute reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_model

from icrl_lightning.agent import InContextAgent, draw_action
from icrl_lightning.envs import make_env

MAPS = [
    ("SFFF", "FHFH", "FFFH", "HFFG"),  # 4x4
    ("SFHF", "FFFG", "HFFF"),  # 3 rows, 4 wide
    ("FFSFF", "HFFFH", "FFHFF", "GFFFF", "FHFFG"),  # 5x5, several goals
]
SCHEDULE = [0.0, 0.5, 1.0, 1.0]
MAX_STEPS = 16


def reference_play(model, s, maps, schedule, seed, max_steps, max_context=None, keep_context=True, switch_to=None,
                   prefill=None):
    """One map at a time; before every action the whole context is re-encoded from scratch with
    the plain HF forward (no cache, no padding). Oldest whole episodes are dropped while the
    context is longer than ``max_context``. ``prefill``: episodes (token ids) the context starts
    with. Returns (returns, trajectories, Q rows per map)."""
    phases = [maps] if switch_to is None else [maps, switch_to]
    n_eps = len(schedule)
    total = n_eps * len(phases)
    returns = np.zeros((len(maps), total))
    trajs, qs = [], []
    head_ids = torch.as_tensor(s.action_token_ids)
    for i in range(len(maps)):
        rng = np.random.default_rng([seed, i])
        episodes: list[list[int]] = [list(e) for e in prefill or []]
        traj, qrows = [], []
        env = None
        for k in range(total):
            if k % n_eps == 0:
                if env is not None:
                    env.close()
                env = make_env(phases[k // n_eps][i], max_steps)
            o, _ = env.reset(seed=int(rng.integers(2**31)))
            if not keep_context:
                episodes = []
            episodes.append(list(s.begin(int(o))))
            traj.append([int(o)])
            done, ret = False, 0.0
            while not done:
                if max_context is not None:
                    while sum(map(len, episodes)) > max_context:
                        episodes.pop(0)
                ctx = [t for e in episodes for t in e]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ctx])).logits[0, -1]
                q = logits[head_ids].float()
                qrows.append(q)
                a = draw_action(rng, schedule[k % n_eps], lambda q=q: q.argmax())
                o2, r, term, trunc, _ = env.step(a)
                done = term or trunc
                ret += r
                traj[-1].append(int(o2))
                episodes[-1] += s.after_action(a, int(o2), float(r), done, bool(trunc and not term))
            if ret <= 0:
                s.mark_failed(episodes[-1])  # outcome-tagged formats: the start now says "failed"
            returns[i, k] = ret
        env.close()
        trajs.append(traj)
        qs.append(qrows)
    return returns, trajs, qs


def _assert_same_play(result, ref, atol=1e-4):
    ref_returns, ref_trajs, ref_q = ref
    assert np.array_equal(result.returns, ref_returns)
    assert result.trajectories == ref_trajs
    for i, (rows, ref_rows) in enumerate(zip(result.q_values, ref_q, strict=True)):
        assert len(rows) == len(ref_rows), i
        torch.testing.assert_close(torch.as_tensor(np.stack(rows)), torch.stack(ref_rows), rtol=0, atol=atol)


@pytest.mark.parametrize(("fmt", "attn"), [("compact", "sdpa"), ("llama3", "sdpa"), ("compact", "eager")])
def test_kv_cache_equals_full_recompute(fmt, attn):
    model, _, s = tiny_model(fmt, seed=1, attn_implementation=attn, max_position_embeddings=4096)
    agent = InContextAgent(model, s, max_context=4096, max_episode_steps=MAX_STEPS)
    result = agent.play(MAPS, SCHEDULE, seed=7, record_q=True)
    assert result.returns.shape == (len(MAPS), len(SCHEDULE))
    assert result.reencodes == 0
    # Lock-step: one forward call per decision of the longest-playing map, plus at most two per
    # episode boundary (a call appends at most one step's tokens per map).
    decisions = max(len(r) for r in result.q_values)
    assert decisions <= result.forward_calls <= decisions + 2 * len(SCHEDULE)
    ref = reference_play(model, s, MAPS, SCHEDULE, seed=7, max_steps=MAX_STEPS)
    _assert_same_play(result, ref)
    # Greedy decisions happened (the comparison exercised the Q-values, not just the rng).
    assert sum(len(t) - 1 for traj in result.trajectories for t in traj[2:]) > 0


def test_outcome_tags_retag_failed_episodes_and_match_reference():
    """compact_outcome: every episode is played from ``<ep>``; one that fails is rewritten to start
    with ``<ep->`` and the context re-encoded, so later decisions see the outcome at its start."""
    model, tok, s = tiny_model("compact_outcome", seed=4, max_position_embeddings=4096)
    assert s.outcome_tags
    agent = InContextAgent(model, s, max_context=4096, max_episode_steps=MAX_STEPS)
    schedule = [0.0, 0.0, 0.5, 1.0, 1.0]
    result = agent.play(MAPS, schedule, seed=5, record_q=True)
    failed_before_last = int((result.returns[:, :-1] <= 0).sum())
    assert failed_before_last > 0
    assert result.reencodes == failed_before_last
    ref = reference_play(model, s, MAPS, schedule, seed=5, max_steps=MAX_STEPS)
    _assert_same_play(result, ref)
    # The tag changes the Q-values: the same play without retagging differs.
    plain = InContextAgent(model, s, max_context=4096, max_episode_steps=MAX_STEPS)
    plain.s = type(s)(tok, "compact", s.max_tiles)  # same ids for every shared piece, no failure tag
    assert plain.s.action_token_ids.tolist() == s.action_token_ids.tolist()
    untagged = plain.play(MAPS, schedule, seed=5, record_q=True)
    assert untagged.reencodes == 0
    assert any(not np.allclose(a, b) for qa, qb in zip(result.q_values, untagged.q_values, strict=True)
               for a, b in zip(qa, qb, strict=False))


def test_outcome_tags_without_context_do_not_reencode():
    model, _, s = tiny_model("compact_outcome", seed=4)
    agent = InContextAgent(model, s, max_context=256, max_episode_steps=MAX_STEPS)
    result = agent.play(MAPS, [0.0, 0.0, 1.0], seed=5, keep_context=False)
    assert result.reencodes == 0


def test_same_seed_same_play_and_seed_matters():
    model, _, s = tiny_model("compact", seed=2)
    agent = InContextAgent(model, s, max_context=256, max_episode_steps=MAX_STEPS)
    a = agent.play(MAPS, SCHEDULE, seed=3)
    b = agent.play(MAPS, SCHEDULE, seed=3)
    c = agent.play(MAPS, SCHEDULE, seed=4)
    assert np.array_equal(a.returns, b.returns) and a.trajectories == b.trajectories
    assert a.trajectories != c.trajectories


def test_small_window_reencodes_and_matches_reference():
    model, _, s = tiny_model("compact", seed=3)
    agent = InContextAgent(model, s, max_context=2 * 2 * MAX_STEPS + 20, max_episode_steps=MAX_STEPS)
    schedule = [0.0, 0.3, 0.6, 1.0, 1.0, 1.0]
    result = agent.play(MAPS, schedule, seed=11, record_q=True)
    assert result.reencodes > 0
    assert result.returns.shape == (len(MAPS), len(schedule))
    assert all(len(traj) == len(schedule) for traj in result.trajectories)
    assert agent.max_context - 2 * MAX_STEPS < result.longest_context <= agent.max_context
    ref = reference_play(model, s, MAPS, schedule, seed=11, max_steps=MAX_STEPS, max_context=agent.max_context)
    _assert_same_play(result, ref)
    # Re-encoding computes the last layer's MLP for the last position only, through hooks that are
    # gone afterwards.
    last = model.get_decoder().layers[-1]
    assert not last.mlp._forward_pre_hooks and not last.self_attn.o_proj._forward_pre_hooks


def test_window_smaller_than_two_episodes_is_refused():
    model, _, s = tiny_model("compact")
    # A compact step is 2 tokens: an episode of MAX_STEPS steps is at least 2 * MAX_STEPS + 3 tokens.
    too_small = 2 * (2 * MAX_STEPS + 3) - 1
    with pytest.raises(ValueError, match="max_context"):
        InContextAgent(model, s, max_context=too_small, max_episode_steps=MAX_STEPS)
    with pytest.raises(ValueError, match="max_context"):
        InContextAgent(model, s, max_context=1024, max_episode_steps=1000)
    InContextAgent(model, s, max_context=4 * (2 * MAX_STEPS + 10), max_episode_steps=MAX_STEPS)


def test_no_context_equals_fresh_context_per_episode():
    model, _, s = tiny_model("compact", seed=4)
    agent = InContextAgent(model, s, max_context=256, max_episode_steps=MAX_STEPS)
    result = agent.play(MAPS, SCHEDULE, seed=5, keep_context=False, record_q=True)
    ref = reference_play(model, s, MAPS, SCHEDULE, seed=5, max_steps=MAX_STEPS, keep_context=False)
    _assert_same_play(result, ref)
    # And the context matters: the first episode is the same either way, the first decision of
    # the second one is not.
    kept = reference_play(model, s, MAPS, SCHEDULE, seed=5, max_steps=MAX_STEPS)
    n1 = len(ref[1][0][0]) - 1  # decisions in episode 0 of map 0
    assert kept[1][0][0] == ref[1][0][0] and kept[1][0][1][0] == ref[1][0][1][0]
    assert not torch.allclose(kept[2][0][n1], ref[2][0][n1], atol=1e-4)


def test_non_stationary_switch_matches_reference():
    model, _, s = tiny_model("compact", seed=5)
    agent = InContextAgent(model, s, max_context=512, max_episode_steps=MAX_STEPS)
    switch = [MAPS[2], MAPS[0], MAPS[1]]
    schedule = [0.0, 1.0]
    result = agent.play(MAPS, schedule, seed=9, switch_to=switch, record_q=True)
    assert result.returns.shape == (len(MAPS), 4)
    ref = reference_play(model, s, MAPS, schedule, seed=9, max_steps=MAX_STEPS, switch_to=switch)
    _assert_same_play(result, ref)


def test_draw_action_rule():
    rng = np.random.default_rng(0)
    assert all(draw_action(rng, 1.0, lambda: 3) == 3 for _ in range(50))
    rng = np.random.default_rng(0)
    draws = [draw_action(rng, 0.0, lambda: pytest.fail("greedy must not be called at p=0")) for _ in range(400)]
    assert set(draws) == {0, 1, 2, 3}


def test_prefilled_context_matches_reference():
    """Behaviour stitching: the context starts with given episodes; with a window that cannot keep
    them all, they are dropped (oldest first) like any other episode."""
    model, _, s = tiny_model("compact", seed=6)
    prefill = [s.episode([2, 6, 10], [1, 1], [0.0, 1.0], True, False).ids.tolist(),
               s.episode([0, 1, 2, 3], [2, 2, 2], [0.0, 0.0, 0.0], True, False).ids.tolist()]
    for window in (4096, 2 * (2 * MAX_STEPS + 3) + 4):
        agent = InContextAgent(model, s, max_context=window, max_episode_steps=MAX_STEPS)
        result = agent.play(MAPS, SCHEDULE, seed=13, prefill=prefill, record_q=True)
        ref = reference_play(model, s, MAPS, SCHEDULE, seed=13, max_steps=MAX_STEPS, max_context=window,
                             prefill=prefill)
        _assert_same_play(result, ref)
    # The prefill is in the context: the first decision differs from an empty context's.
    empty = agent.play(MAPS, SCHEDULE, seed=13, record_q=True)
    assert not np.allclose(empty.q_values[0][0], result.q_values[0][0], atol=1e-4)


def test_many_maps_finishing_at_different_times_match_reference():
    """Eight maps whose trials end at different calls: finished maps leave the batch (several
    times), the window forces re-encodings, and every map still plays exactly as alone."""
    from icrl_lightning.envs import make_splits

    maps = make_splits(0, 0).heldout[:8]
    model, _, s = tiny_model("compact", seed=8)
    window = 2 * (2 * MAX_STEPS + 3) + 10
    agent = InContextAgent(model, s, max_context=window, max_episode_steps=MAX_STEPS)
    schedule = [0.0, 0.2, 0.6, 1.0, 1.0]
    result = agent.play(maps, schedule, seed=21, record_q=True)
    assert result.reencodes > 0
    lengths = [sum(len(e) - 1 for e in t) for t in result.trajectories]
    assert len(set(lengths)) > 3  # trials of different lengths
    ref = reference_play(model, s, maps, schedule, seed=21, max_steps=MAX_STEPS, max_context=window)
    _assert_same_play(result, ref)


def test_actions_replay_to_the_trajectories():
    model, _, s = tiny_model("compact", seed=9)
    agent = InContextAgent(model, s, max_context=512, max_episode_steps=MAX_STEPS)
    result = agent.play(MAPS, SCHEDULE, seed=2)
    for i, rows in enumerate(MAPS):
        env = make_env(rows, MAX_STEPS)
        for k, (tiles, acts) in enumerate(zip(result.trajectories[i], result.actions[i], strict=True)):
            env.reset()
            env.unwrapped.s = tiles[0]  # the start the agent's reset drew
            assert rows[tiles[0] // len(rows[0])][tiles[0] % len(rows[0])] == "S"
            assert len(acts) == len(tiles) - 1
            ret = 0.0
            for a, tile in zip(acts, tiles[1:], strict=True):
                o, r, *_ = env.step(a)
                ret += r
                assert o == tile
            assert ret == result.returns[i, k]
        env.close()
