"""InContextAgent: the KV-cached, lock-step agent against a plain full-recompute reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icrl_lightning.agent import InContextAgent, TrialResult, _RaggedCache, draw_action
from icrl_lightning.checks import InputError
from icrl_lightning.envs import DarkKeyToDoor, DarkRoom, make_env, make_splits
from icrl_lightning.episodes import Episode
from icrl_lightning.serialize import Serializer

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
    context is longer than ``max_context``. ``prefill[i]``: episodes (token ids) map ``i``'s
    context starts with. Returns (returns, ``Episode`` records per map, Q rows per map)."""
    phases = [maps] if switch_to is None else [maps, switch_to]
    n_eps = len(schedule)
    total = n_eps * len(phases)
    returns = np.zeros((len(maps), total))
    records, qs = [], []
    head_ids = torch.as_tensor(s.action_token_ids)
    for i in range(len(maps)):
        rng = np.random.default_rng([seed, i])
        episodes: list[list[int]] = [list(e) for e in (prefill[i] if prefill else [])]
        played, qrows = [], []
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
            tiles, acts, rewards = [int(o)], [], []
            done, ret, term, trunc = False, 0.0, False, False
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
                tiles.append(int(o2))
                acts.append(a)
                rewards.append(float(r))
                episodes[-1] += s.after_action(a, int(o2), float(r), done, bool(trunc and not term))
            if ret <= 0:
                s.mark_failed(episodes[-1])  # outcome-tagged formats: the start now says "failed"
            returns[i, k] = ret
            played.append(Episode(tiles, acts, rewards, bool(term), bool(trunc and not term), map_id=i,
                                  map_rows=tuple(phases[k // n_eps][i]), learner_episode=k))
        env.close()
        records.append(played)
        qs.append(qrows)
    return returns, records, qs


def _assert_same_play(result: TrialResult, ref, atol=1e-4):
    ref_returns, ref_episodes, ref_q = ref
    assert np.array_equal(result.returns, ref_returns)
    assert result.trajectories == [[e.observations for e in eps] for eps in ref_episodes]
    assert result.actions == [[e.actions for e in eps] for eps in ref_episodes]
    # The whole records: rewards, endings, map id / rows and episode index as well.
    assert result.episodes == ref_episodes
    for i, (rows, ref_rows) in enumerate(zip(result.q_values, ref_q, strict=True)):
        assert len(rows) == len(ref_rows), i
        torch.testing.assert_close(torch.as_tensor(np.stack(rows)), torch.stack(ref_rows), rtol=0, atol=atol)


def _replay(episode: Episode, max_steps: int) -> float:
    """Plays ``episode``'s actions in gymnasium's FrozenLake on ``episode.map_rows`` from its first
    tile, checking every observation, reward and the ending against the record; its return."""
    rows = episode.map_rows
    width = len(rows[0])
    start = episode.observations[0]
    assert rows[start // width][start % width] == "S"  # the agent's reset drew a start tile
    env = make_env(rows, max_steps)
    try:
        env.reset(seed=0)
        env.unwrapped.s = start  # the start the agent's reset drew
        ret, term, trunc = 0.0, False, False
        for t, (a, tile, reward) in enumerate(zip(episode.actions, episode.observations[1:], episode.rewards,
                                                  strict=True)):
            assert not (term or trunc), "the record goes on after the episode ended"
            o, r, term, trunc, _ = env.step(a)
            assert (int(o), float(r)) == (tile, reward), t
            ret += r
        assert term or trunc, "the record stops before the episode ended"
        assert (episode.terminated, episode.truncated) == (bool(term), bool(trunc and not term))
    finally:
        env.close()
    return ret


@pytest.mark.parametrize(("fmt", "attn"), [("compact", "sdpa"), ("llama3", "sdpa"), ("compact", "eager")])
@pytest.mark.parametrize("draft_budget", [0, 256])
def test_kv_cache_equals_full_recompute(tiny_model, fmt, attn, draft_budget):
    model, _, s = tiny_model(fmt, seed=1, attn_implementation=attn, max_position_embeddings=4096)
    agent = InContextAgent(model, s, max_context=4096, max_episode_steps=MAX_STEPS, draft_budget=draft_budget)
    result = agent.play(MAPS, SCHEDULE, seed=7, record_q=True)
    assert result.returns.shape == (len(MAPS), len(SCHEDULE))
    assert result.reencodes == 0
    decisions = max(len(r) for r in result.q_values)
    if draft_budget:
        # Drafted steps: random moves and repeated greedy ones are checked several to a call; some
        # greedy drafts were wrong, so the cut-back path ran too.
        assert result.forward_calls < decisions / 2
        assert 0 < result.drafts_kept < result.drafted
    else:
        # Lock-step: one forward call per decision of the longest-playing map, plus at most two per
        # episode boundary (a call appends at most one step's tokens per map).
        assert decisions <= result.forward_calls <= decisions + 2 * len(SCHEDULE)
    ref = reference_play(model, s, MAPS, SCHEDULE, seed=7, max_steps=MAX_STEPS)
    _assert_same_play(result, ref)
    # Greedy decisions happened (the comparison exercised the Q-values, not just the rng).
    assert sum(len(t) - 1 for traj in result.trajectories for t in traj[2:]) > 0


def test_outcome_tags_retag_failed_episodes_and_match_reference(tiny_model):
    """compact_outcome: every episode is played from ``<ep>``; one that fails is rewritten to start
    with ``<ep->`` and re-appended from its first column (the context before it stays in the cache),
    so later decisions see the outcome at its start, exactly as a full recompute does."""
    model, tok, s = tiny_model("compact_outcome", seed=4, max_position_embeddings=4096)
    assert s.outcome_tags
    agent = InContextAgent(model, s, max_context=4096, max_episode_steps=MAX_STEPS)
    schedule = [0.0, 0.0, 0.5, 1.0, 1.0]
    result = agent.play(MAPS, schedule, seed=5, record_q=True)
    failed_before_last = int((result.returns[:, :-1] <= 0).sum())
    assert failed_before_last > 0
    assert result.retags == failed_before_last and result.reencodes == 0
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


def test_outcome_tags_without_context_do_not_reencode(tiny_model):
    model, _, s = tiny_model("compact_outcome", seed=4)
    agent = InContextAgent(model, s, max_context=256, max_episode_steps=MAX_STEPS)
    result = agent.play(MAPS, [0.0, 0.0, 1.0], seed=5, keep_context=False)
    assert result.reencodes == 0


def test_same_seed_same_play_and_seed_matters(tiny_model):
    model, _, s = tiny_model("compact", seed=2)
    agent = InContextAgent(model, s, max_context=256, max_episode_steps=MAX_STEPS)
    a = agent.play(MAPS, SCHEDULE, seed=3)
    b = agent.play(MAPS, SCHEDULE, seed=3)
    c = agent.play(MAPS, SCHEDULE, seed=4)
    assert np.array_equal(a.returns, b.returns) and a.trajectories == b.trajectories
    assert a.episodes == b.episodes
    assert a.trajectories != c.trajectories


def test_outcome_tags_with_a_small_window_match_reference(tiny_model):
    """Retagged episodes rolled back and re-appended, and contexts over the window re-encoded,
    in one trial: the play equals a full recompute."""
    model, _, s = tiny_model("compact_outcome", seed=6)
    agent = InContextAgent(model, s, max_context=2 * 2 * MAX_STEPS + 20, max_episode_steps=MAX_STEPS)
    schedule = [0.0, 0.3, 0.6, 1.0, 1.0, 1.0]
    result = agent.play(MAPS, schedule, seed=13, record_q=True)
    assert result.reencodes > 0 and result.retags > 0
    ref = reference_play(model, s, MAPS, schedule, seed=13, max_steps=MAX_STEPS, max_context=agent.max_context)
    _assert_same_play(result, ref)


def test_small_window_reencodes_and_matches_reference(tiny_model):
    model, _, s = tiny_model("compact", seed=3)
    agent = InContextAgent(model, s, max_context=2 * 2 * MAX_STEPS + 20, max_episode_steps=MAX_STEPS)
    schedule = [0.0, 0.3, 0.6, 1.0, 1.0, 1.0]
    result = agent.play(MAPS, schedule, seed=11, record_q=True)
    assert result.reencodes > 0
    assert result.returns.shape == (len(MAPS), len(schedule))
    assert all(len(eps) == len(schedule) for eps in result.episodes)
    assert all(len(traj) == len(schedule) for traj in result.trajectories)
    assert agent.max_context - 2 * MAX_STEPS < result.longest_context <= agent.max_context
    ref = reference_play(model, s, MAPS, schedule, seed=11, max_steps=MAX_STEPS, max_context=agent.max_context)
    _assert_same_play(result, ref)
    # Re-encoding computes the last layer's MLP for the last position only, through hooks that are
    # gone afterwards.
    last = model.get_decoder().layers[-1]
    assert not last.mlp._forward_pre_hooks and not last.self_attn.o_proj._forward_pre_hooks


def test_window_smaller_than_two_episodes_is_refused(tiny_model):
    model, _, s = tiny_model("compact")
    # A compact step is 2 tokens: an episode of MAX_STEPS steps is at least 2 * MAX_STEPS + 3 tokens.
    too_small = 2 * (2 * MAX_STEPS + 3) - 1
    with pytest.raises(InputError, match="max_context"):
        InContextAgent(model, s, max_context=too_small, max_episode_steps=MAX_STEPS)
    with pytest.raises(InputError, match="max_context"):
        InContextAgent(model, s, max_context=1024, max_episode_steps=1000)
    InContextAgent(model, s, max_context=4 * (2 * MAX_STEPS + 10), max_episode_steps=MAX_STEPS)


def test_no_context_equals_fresh_context_per_episode(tiny_model):
    model, _, s = tiny_model("compact", seed=4)
    agent = InContextAgent(model, s, max_context=256, max_episode_steps=MAX_STEPS)
    result = agent.play(MAPS, SCHEDULE, seed=5, keep_context=False, record_q=True)
    ref = reference_play(model, s, MAPS, SCHEDULE, seed=5, max_steps=MAX_STEPS, keep_context=False)
    _assert_same_play(result, ref)
    # And the context matters: the first episode is the same either way, the first decision of
    # the second one is not.
    kept = reference_play(model, s, MAPS, SCHEDULE, seed=5, max_steps=MAX_STEPS)
    first, second = ref[1][0][0], ref[1][0][1]  # episodes 0 and 1 of map 0
    n1 = len(first.actions)  # decisions in episode 0 of map 0
    assert kept[1][0][0] == first and kept[1][0][1].observations[0] == second.observations[0]
    assert not torch.allclose(kept[2][0][n1], ref[2][0][n1], atol=1e-4)


def test_non_stationary_switch_matches_reference(tiny_model):
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


def test_prefilled_context_matches_reference(tiny_model):
    """Behaviour stitching: each map's context starts with its own given episodes; with a window
    that cannot keep them all, they are dropped (oldest first) like any other episode."""
    model, _, s = tiny_model("compact", seed=6)
    goal = s.encode(Episode([2, 6, 10], [1, 1], [0.0, 1.0], True, False)).ids.tolist()
    hole = s.encode(Episode([0, 1, 2, 3], [2, 2, 2], [0.0, 0.0, 0.0], True, False)).ids.tolist()
    # Map 0 both episodes, map 1 one, map 2 none, the rest both in the other order.
    prefill = [[goal, hole], [hole], []] + [[hole, goal]] * (len(MAPS) - 3)
    with pytest.raises(ValueError, match="prefill has 1 contexts"):
        InContextAgent(model, s, max_context=4096, max_episode_steps=MAX_STEPS).play(MAPS, SCHEDULE, 13,
                                                                                     prefill=[[goal]])
    for window in (4096, 2 * (2 * MAX_STEPS + 3) + 4):
        agent = InContextAgent(model, s, max_context=window, max_episode_steps=MAX_STEPS)
        result = agent.play(MAPS, SCHEDULE, seed=13, prefill=prefill, record_q=True)
        ref = reference_play(model, s, MAPS, SCHEDULE, seed=13, max_steps=MAX_STEPS, max_context=window,
                             prefill=prefill)
        _assert_same_play(result, ref)
        # The prefilled episodes are context, not episodes of the trial.
        assert all(len(eps) == len(SCHEDULE) for eps in result.episodes)
    # The prefill is in the context: the first decision differs from an empty context's.
    empty = agent.play(MAPS, SCHEDULE, seed=13, record_q=True)
    assert not np.allclose(empty.q_values[0][0], result.q_values[0][0], atol=1e-4)


def test_many_maps_finishing_at_different_times_match_reference(tiny_model):
    """Eight maps whose trials end at different calls: finished maps leave the batch (several
    times), the window forces re-encodings, and every map still plays exactly as alone."""
    maps = make_splits(0, 0).heldout[:8]
    model, _, s = tiny_model("compact", seed=8)
    window = 2 * (2 * MAX_STEPS + 3) + 10
    agent = InContextAgent(model, s, max_context=window, max_episode_steps=MAX_STEPS)
    schedule = [0.0, 0.2, 0.6, 1.0, 1.0]
    result = agent.play(maps, schedule, seed=21, record_q=True)
    assert result.reencodes > 0
    lengths = [sum(len(e.actions) for e in eps) for eps in result.episodes]
    assert len(set(lengths)) > 3  # trials of different lengths
    ref = reference_play(model, s, maps, schedule, seed=21, max_steps=MAX_STEPS, max_context=window)
    _assert_same_play(result, ref)


def test_actions_replay_to_the_trajectories(tiny_model):
    model, _, s = tiny_model("compact", seed=9)
    agent = InContextAgent(model, s, max_context=512, max_episode_steps=MAX_STEPS)
    result = agent.play(MAPS, SCHEDULE, seed=2)
    for i, rows in enumerate(MAPS):
        assert len(result.trajectories[i]) == len(result.actions[i]) == len(SCHEDULE)
        for k, (tiles, acts) in enumerate(zip(result.trajectories[i], result.actions[i], strict=True)):
            e = result.episodes[i][k]
            assert (tiles, acts) == (e.observations, e.actions)
            assert len(acts) == len(tiles) - 1
            assert e.map_rows == rows
            assert _replay(e, MAX_STEPS) == result.returns[i, k]


def test_episodes_are_records_that_replay_with_the_maps_keys(tiny_model):
    """``TrialResult.episodes[map][k]`` is an ``Episode``: its observations, actions and rewards
    replay in gymnasium's FrozenLake to the trial's returns; ``map_id`` is the map's key (its index
    in the whole evaluation set), ``map_rows`` the map and ``learner_episode`` the episode's place."""
    model, _, s = tiny_model("compact", seed=10)
    agent = InContextAgent(model, s, max_context=512, max_episode_steps=MAX_STEPS)
    maps = [*MAPS, ("SFG", "FFF")]  # no holes: random walks reach the goal, so rewards are replayed too
    keys = [5, 11, 2, 0]
    result = agent.play(maps, SCHEDULE, seed=4, keys=keys)
    assert len(result.episodes) == len(maps)
    for i, (key, rows) in enumerate(zip(keys, maps, strict=True)):
        assert len(result.episodes[i]) == len(SCHEDULE)
        for k, e in enumerate(result.episodes[i]):
            assert isinstance(e, Episode)
            assert (e.map_id, e.map_rows, e.learner_episode) == (key, rows, k)
            assert len(e.observations) == len(e.actions) + 1 == len(e.rewards) + 1
            ret = _replay(e, MAX_STEPS)
            assert ret == e.ret == result.returns[i, k]
            assert e.success == (result.returns[i, k] > 0)
    assert sum(e.success for eps in result.episodes for e in eps) > 0  # a goal was reached somewhere
    # A map's key seeds its draws: in another batch and place, under the same key, a map plays the same.
    alone = agent.play([maps[2], maps[0]], SCHEDULE, seed=4, keys=[2, 5])
    assert alone.trajectories[0] == result.trajectories[2] and alone.trajectories[1] == result.trajectories[0]


def test_non_stationary_episodes_name_the_map_they_were_played_on(tiny_model):
    """After the switch a map's episodes are played on (and record) the new map, under the same key."""
    model, _, s = tiny_model("compact", seed=5)
    agent = InContextAgent(model, s, max_context=512, max_episode_steps=MAX_STEPS)
    switch = [MAPS[2], MAPS[0], MAPS[1]]
    schedule = [0.0, 0.5, 1.0]
    keys = [7, 8, 9]
    result = agent.play(MAPS, schedule, seed=9, switch_to=switch, keys=keys)
    for i in range(len(MAPS)):
        eps = result.episodes[i]
        assert len(eps) == 2 * len(schedule)
        for k, e in enumerate(eps):
            played_on = MAPS[i] if k < len(schedule) else switch[i]
            assert (e.map_id, e.map_rows, e.learner_episode) == (keys[i], played_on, k)
            assert _replay(e, MAX_STEPS) == result.returns[i, k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_cache_writes_each_rows_new_columns_at_its_own_length(dtype):
    cache = _RaggedCache(rows=3, capacity=8)
    cache.commit(torch.tensor([0, 2, 5]))
    positions = cache.prepare(2)
    assert positions.tolist() == [[0, 1], [2, 3], [5, 6]]
    keys = torch.randn(3, 2, 2, 4).to(dtype)  # [rows, kv_heads, new, head_dim]
    k, v = cache.update(keys, -keys, layer_idx=0)
    assert k.dtype == dtype and k.shape == (3, 2, 7, 4)  # the widest row's length plus the new columns
    for row, start in enumerate([0, 2, 5]):
        assert torch.equal(k[row, :, start:start + 2], keys[row])
        assert torch.equal(v[row, :, start:start + 2], -keys[row])
        rest = torch.ones(7, dtype=torch.bool)
        rest[start:start + 2] = False
        assert not k[row, :, rest].any()  # nothing else written


def test_ragged_cache_keeps_rows_by_moving_the_fewest():
    cache = _RaggedCache(rows=5, capacity=4)
    cache.commit(torch.tensor([1, 2, 3, 4, 0]))
    cache.prepare(1)
    keys = torch.arange(5.0)[:, None, None, None].expand(5, 1, 1, 2).clone()  # row r holds r
    cache.update(keys, keys, layer_idx=0)
    order = cache.fill_order([True, False, True, False, True])
    assert order == [0, 4, 2]  # row 1's place taken by the last row; rows 0 and 2 stay
    cache.keep_rows(order)
    assert cache.k[0].shape[0] == 3 and cache.lengths.tolist() == [1, 0, 3]
    assert cache.k[0][:, 0, :, 0].amax(1).tolist() == [0.0, 4.0, 2.0]
    cache.keep_rows([2, 0])  # any other order: a gathered copy
    assert cache.lengths.tolist() == [3, 1] and cache.v[0][:, 0, :, 0].amax(1).tolist() == [2.0, 0.0]


@pytest.mark.parametrize("family", ["key_to_door", "dark_room"])
def test_drafted_steps_play_as_one_step_per_call_in_other_families(tiny_backbone, family):
    """Dark Key-to-Door pays inside an episode (reward tokens in a drafted step) and, like Dark Room,
    copies its environments with the default ``fork_env``: drafted play takes the same actions,
    returns and Q-values as one step per call, in fewer calls."""
    fam = DarkKeyToDoor(size=5, horizon=20) if family == "key_to_door" else DarkRoom(size=5, train_goals=20, horizon=20)
    tasks = fam.splits(seed=0, n_train=4).heldout[:3]
    torch.manual_seed(2)
    spec = tiny_backbone("compact_outcome", max_tiles=fam.largest_observations("heldout"),
                         max_position_embeddings=2048)
    model, tok = spec.build(fam.actions, fam.reward_values)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.eval()
    s = Serializer(tok, "compact_outcome", spec.max_tiles, fam.actions, fam.reward_values)
    schedule = [0.0, 0.5, 1.0, 1.0, 1.0]
    plays = [InContextAgent(model, s, max_context=1024, max_episode_steps=20, env=fam, draft_budget=budget)
             .play(tasks, schedule, seed=3, record_q=True) for budget in (0, 256)]
    one, drafted = plays
    assert np.array_equal(one.returns, drafted.returns) and one.actions == drafted.actions
    assert one.episodes == drafted.episodes
    for a, b in zip(one.q_values, drafted.q_values, strict=True):
        torch.testing.assert_close(torch.as_tensor(np.stack(b)), torch.as_tensor(np.stack(a)), rtol=0, atol=1e-4)
    assert drafted.forward_calls < one.forward_calls / 2 and drafted.drafts_kept > 0
    if family == "key_to_door":
        assert (one.returns > 0).any()  # some drafted or played step paid inside an episode
