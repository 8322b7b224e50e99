"""Episodes -> token ids: the paper's exact Llama 3 text, the compact format, Q positions."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from icrl_lightning.backbones import build_tokenizer
from icrl_lightning.envs import ACTIONS
from icrl_lightning.episodes import Episode
from icrl_lightning.serialize import EncodedEpisode, Serializer

# observations [0, 1, 5], actions right, down, reward 1.0 on the last step, terminated.
OBS, ACTS, REWS = [0, 1, 5], [2, 1], [0.0, 1.0]

LLAMA3_TEXT = (
    "<|begin_of_text|>"
    "<|start_header_id|>observation<|end_header_id|>0<|eot_id|>"
    "<|start_header_id|>action<|end_header_id|>right<|eot_id|>"
    "<|start_header_id|>observation<|end_header_id|>1<|eot_id|>"
    "<|start_header_id|>action<|end_header_id|>down<|eot_id|>"
    "<|start_header_id|>observation<|end_header_id|>5<|eot_id|>"
    "<|start_header_id|>reward<|end_header_id|>1.0<|eot_id|>"
    "<|end_of_text|>"
)
COMPACT_TOKENS = ["<ep>", "o0", "right", "o1", "down", "o5", "r1.0", "</ep>"]

# The ids of the tiny word-level tokenizers are part of every saved checkpoint: pin them so a
# change of vocabulary layout is a deliberate one.
LLAMA3_IDS = [2, 4, 77, 5, 7, 6, 4, 78, 5, 73, 6, 4, 77, 5, 8, 6, 4, 78, 5, 72, 6, 4, 77, 5, 12, 6,
              4, 79, 5, 75, 6, 3]
COMPACT_IDS = [2, 5, 71, 6, 70, 10, 73, 3]


def _tokens(s: Serializer, ids) -> list[str]:
    return s._tokenizer.convert_ids_to_tokens([int(i) for i in ids])


@pytest.fixture(scope="module")
def llama3():
    return Serializer(build_tokenizer("llama3"), "llama3")


def _encode(s: Serializer, obs, acts, rews, terminated: bool, truncated: bool) -> EncodedEpisode:
    return s.encode(Episode(obs, acts, rews, terminated, truncated))


def test_llama3_exact_text_and_ids(llama3):
    enc = _encode(llama3, OBS, ACTS, REWS, terminated=True, truncated=False)
    toks = _tokens(llama3, enc.ids)
    assert "".join(toks) == LLAMA3_TEXT
    assert enc.ids.tolist() == LLAMA3_IDS
    assert "<unk>" not in toks
    assert enc.ids.dtype == np.int32
    assert enc.actions.tolist() == ACTS
    assert enc.rewards.tolist() == REWS


def test_llama3_q_positions(llama3):
    enc = _encode(llama3, OBS, ACTS, REWS, terminated=True, truncated=False)
    toks = _tokens(llama3, enc.ids)
    assert enc.q_pos.tolist() == [8, 18]
    for t, q in enumerate(enc.q_pos):
        assert toks[q] == "<|end_header_id|>"
        assert toks[q - 1] == "action"
        assert toks[q - 2] == "<|start_header_id|>"
        assert enc.ids[q + 1] == llama3.action_token_ids[ACTS[t]]
        assert toks[q + 1] == ACTIONS[ACTS[t]]


def test_llama3_one_token_per_field(llama3):
    tok = llama3._tokenizer
    for word in ["observation", "action", "reward", "edit", "1.0", *ACTIONS, *map(str, range(64))]:
        ids = tok.encode(word, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    assert llama3.pad_id == tok.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    assert _tokens(llama3, llama3.action_token_ids) == list(ACTIONS)


def test_llama3_step_costs_ten_tokens(llama3):
    for a in range(4):
        for o in (0, 7, 63):
            assert len(llama3.after_action(a, o, 0.0, done=False, truncated=False)) == 10
    # An episode one step longer is exactly ten tokens longer.
    short = _encode(llama3, [0, 1, 2], [2, 2], [0.0, 0.0], False, True)
    longer = _encode(llama3, [0, 1, 2, 3], [2, 2, 2], [0.0, 0.0, 0.0], False, True)
    assert len(longer) - len(short) == 10


def test_llama3_truncated_episode_has_edit_role(llama3):
    enc = _encode(llama3, [0, 1, 1], [2, 3], [0.0, 0.0], terminated=False, truncated=True)
    toks = _tokens(llama3, enc.ids)
    assert toks[-6:] == ["<|start_header_id|>", "edit", "<|end_header_id|>", "truncated", "<|eot_id|>",
                         "<|end_of_text|>"]
    # The edit comes after the last observation, and no reward is written for r == 0.
    assert toks[-11:-6] == ["<|start_header_id|>", "observation", "<|end_header_id|>", "1", "<|eot_id|>"]
    assert "reward" not in toks
    # A terminated episode has no edit.
    done = _encode(llama3, [0, 1, 1], [2, 3], [0.0, 0.0], terminated=True, truncated=False)
    assert "edit" not in _tokens(llama3, done.ids)
    assert len(enc) == len(done) + 5


def test_compact_exact_tokens_and_q_positions(compact):
    enc = _encode(compact, OBS, ACTS, REWS, terminated=True, truncated=False)
    toks = _tokens(compact, enc.ids)
    assert toks == COMPACT_TOKENS
    assert enc.ids.tolist() == COMPACT_IDS
    assert enc.q_pos.tolist() == [1, 3]
    for t, q in enumerate(enc.q_pos):
        assert toks[q] == f"o{OBS[t]}"
        assert enc.ids[q + 1] == compact.action_token_ids[ACTS[t]]
    assert compact.pad_id == compact._tokenizer.convert_tokens_to_ids("<pad>")


def test_compact_truncated(compact):
    enc = _encode(compact, [0, 1, 1], [2, 3], [0.0, 0.0], terminated=False, truncated=True)
    assert _tokens(compact, enc.ids) == ["<ep>", "o0", "right", "o1", "up", "o1", "<trunc>", "</ep>"]
    assert enc.q_pos.tolist() == [1, 3]


def test_compact_outcome_tags_failed_episodes():
    s = Serializer(build_tokenizer("compact_outcome"), "compact_outcome")
    won = _encode(s, OBS, ACTS, REWS, terminated=True, truncated=False)
    assert _tokens(s, won.ids) == COMPACT_TOKENS  # a success is written as in compact
    hole = _encode(s, [3, 3, 7, 11], [3, 1, 1], [0.0, 0.0, 0.0], terminated=True, truncated=False)
    assert _tokens(s, hole.ids) == ["<ep->", "x3", "up", "x3", "down", "x7", "down", "x11", "</ep>"]
    assert hole.q_pos.tolist() == [1, 3, 5]
    late = _encode(s, [0, 1, 1], [2, 3], [0.0, 0.0], terminated=False, truncated=True)
    assert _tokens(s, late.ids) == ["<ep->", "x0", "right", "x1", "up", "x1", "<trunc>", "</ep>"]
    # The agent writes an episode as a success while playing it and rewrites it in place once it failed.
    played = list(s.begin(3))
    for t, (a, o) in enumerate([(3, 3), (1, 7), (1, 11)]):
        played += s.after_action(a, o, 0.0, t == 2, False)
    assert _tokens(s, played)[:2] == ["<ep>", "o3"]
    s.mark_failed(played)
    assert played == hole.ids.tolist()
    assert _encode(pickle.loads(pickle.dumps(s)), [3, 3, 7, 11], [3, 1, 1], [0.0] * 3, True, False).ids.tolist() \
        == hole.ids.tolist()
    # Formats without outcome tags are untouched.
    plain = Serializer(build_tokenizer("compact"), "compact")
    ids = _encode(plain, [3, 3, 7, 11], [3, 1, 1], [0.0] * 3, True, False).ids.tolist()
    before = list(ids)
    plain.mark_failed(ids)
    assert ids == before and _tokens(plain, ids)[:2] == ["<ep>", "o3"]
    assert not plain.outcome_tags and s.outcome_tags


@pytest.mark.parametrize("fmt", ["llama3", "compact", "chatml", "compact_outcome"])
@pytest.mark.parametrize(
    ("obs", "acts", "rews", "term", "trunc"),
    [
        (OBS, ACTS, REWS, True, False),
        ([3, 3, 7, 11], [3, 1, 1], [0.0, 0.0, 0.0], True, False),  # fell into a hole
        ([0, 1, 1, 1], [2, 3, 3], [0.0, 0.0, 0.0], False, True),  # time limit
        ([4, 8], [1], [1.0], True, False),  # one step
    ],
)
def test_pieces_concatenate_to_episode(fmt, obs, acts, rews, term, trunc):
    s = Serializer(build_tokenizer(fmt), fmt)
    enc = _encode(s, obs, acts, rews, term, trunc)
    ids = list(s.begin(obs[0]))
    q_pos = [len(ids) - 1]
    for t in range(len(acts)):
        done = t == len(acts) - 1
        ids += s.after_action(acts[t], obs[t + 1], rews[t], done, trunc and done)
        if not done:
            q_pos.append(len(ids) - 1)
    if not any(r > 0 for r in rews):
        s.mark_failed(ids)  # outcome-tagged formats write a failed episode differently
    assert enc.ids.tolist() == ids
    assert enc.q_pos.tolist() == q_pos
    assert len(enc.q_pos) == len(acts)
    for t, q in enumerate(enc.q_pos):
        assert enc.ids[q + 1] == s.action_token_ids[acts[t]]
    assert s.pad_id not in ids or s.fmt.pad == s.fmt.episode_end


@pytest.mark.parametrize("fmt", ["llama3", "compact"])
def test_serializer_pickles(fmt):
    s = Serializer(build_tokenizer(fmt), fmt)
    eps = [(OBS, ACTS, REWS, True, False), ([0, 1, 1], [2, 3], [0.0, 0.0], False, True),
           ([63, 62, 48], [0, 3], [0.0, 0.0], True, False)]
    before = [_encode(s, *e) for e in eps]
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._tokenizer is None  # only the id tables travel
    for e, b in zip(eps, before, strict=True):
        a = _encode(s2, *e)
        assert np.array_equal(a.ids, b.ids)
        assert np.array_equal(a.q_pos, b.q_pos)
    assert np.array_equal(s2.action_token_ids, s.action_token_ids)
    assert s2.pad_id == s.pad_id
    with pytest.raises(KeyError, match="max_tiles"):
        s2.observation(64)  # outside the warmed-up cache, and no tokenizer to fall back on


def test_reward_text_is_rounded(llama3):
    toks = _tokens(llama3, llama3.reward(1.0))
    assert toks == ["<|start_header_id|>", "reward", "<|end_header_id|>", "1.0", "<|eot_id|>"]


def test_empty_episode_has_no_q_positions(compact):
    enc = _encode(compact, [5], [], [], False, False)
    assert enc.q_pos.tolist() == []
    assert len(enc.actions) == 0


def test_encode_an_episode_record(compact):
    """``Serializer.encode(episode)``: the tokens depend on the steps only; the encoded episode keeps
    the map, the tile of each action and whether it reached a goal (what ``conflicts`` reads)."""
    e = Episode(OBS, ACTS, REWS, True, False, map_id=7, map_rows=("SFFF", "FFFG"), learner_episode=12)
    enc = compact.encode(e)
    assert isinstance(enc, EncodedEpisode)
    assert _tokens(compact, enc.ids) == COMPACT_TOKENS
    assert enc.q_pos.tolist() == [1, 3]
    assert enc.map_id == 7 and enc.success is True
    assert enc.tiles.tolist() == e.tiles == [0, 1]
    assert enc.actions.tolist() == ACTS and enc.rewards.tolist() == REWS
    assert (enc.ids.dtype, enc.q_pos.dtype, enc.actions.dtype, enc.rewards.dtype, enc.tiles.dtype) == \
        (np.int32, np.int32, np.int64, np.float32, np.int64)
    assert len(enc) == len(COMPACT_TOKENS)
    # Only the steps decide the tokens: map, rows and place in the run do not.
    bare = compact.encode(Episode(OBS, ACTS, REWS, True))
    assert bare.ids.tolist() == enc.ids.tolist() and bare.q_pos.tolist() == enc.q_pos.tolist()
    assert bare.map_id == -1
    # A failure: success False, tiles of every action (not the final state).
    hole = compact.encode(Episode([3, 3, 7, 11], [3, 1, 1], [0.0] * 3, True, map_id=2))
    assert hole.success is False and hole.map_id == 2 and hole.tiles.tolist() == [3, 3, 7]
    # truncated=True writes the edit marker; the same steps terminated do not.
    trunc = compact.encode(Episode([0, 1, 1], [2, 3], [0.0, 0.0], False, True))
    assert _tokens(compact, trunc.ids)[-2:] == ["<trunc>", "</ep>"]
    assert "<trunc>" not in _tokens(compact, compact.encode(Episode([0, 1, 1], [2, 3], [0.0, 0.0], True)).ids)


def test_encoded_episode_is_frozen(compact):
    enc = compact.encode(Episode(OBS, ACTS, REWS, True, map_id=1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        enc.map_id = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        enc.ids = np.zeros(3, dtype=np.int32)
    assert {f.name for f in dataclasses.fields(EncodedEpisode)} == {"ids", "q_pos", "actions", "rewards", "tiles",
                                                                    "map_id", "success"}


@pytest.mark.parametrize("fmt", ["llama3", "compact", "chatml", "compact_outcome"])
def test_max_id_is_the_largest_id_written(fmt):
    s = Serializer(build_tokenizer(fmt), fmt)
    written = [s.pad_id, *s.action_token_ids.tolist(), *s.begin(0), *s.ending(True), *s.ending(False),
               *s.reward(1.0), *[t for i in range(s.max_tiles) for t in s.observation(i)]]
    if s.outcome_tags:
        ids = list(s.begin(63))
        s.mark_failed(ids)
        written += ids
    assert s.max_id == max(written)
    # The tiny word-level tokenizers hold exactly what their format writes: the largest id is the last.
    assert s.max_id == len(s._tokenizer) - 1
    assert pickle.loads(pickle.dumps(s)).max_id == s.max_id
    enc = _encode(s, [63, 62, 48], [0, 3], [0.0, 0.0], True, False)
    assert int(enc.ids.max()) <= s.max_id


def test_piece_is_the_text_level_encoding(compact):
    assert compact.piece("<ep>") == (compact._tokenizer.convert_tokens_to_ids("<ep>"),)
    assert compact.piece("o5 right") == tuple(compact._tokenizer.convert_tokens_to_ids(["o5", "right"]))
    assert compact.piece("o5") is compact.piece("o5")  # tokenized once, then cached


def test_tile_outside_vocabulary_is_an_error():
    s = Serializer(build_tokenizer("compact", max_tiles=16), "compact", max_tiles=16)
    with pytest.raises((KeyError, ValueError)):
        s.observation(20)  # e.g. a 5x5 map (25 tiles) with max_tiles=16


# --- real tokenizers (tools/fetch_models.py puts them in data/models/; skipped when absent) -----------
LLAMA3_TOKENIZER = "data/models/llama3-tokenizer/tokenizer.json"  # under the repository root

# A Figure-2-style episode on the 4x4 map SFFF/FHFH/FFFH/HFFG: right, right, down, down, down, right
# to the goal (reward 1.0), then one that hits the 100-step limit (here: 2 steps, truncated).
FIG2 = ([0, 1, 2, 6, 10, 14, 15], [2, 2, 1, 1, 1, 2], [0.0] * 5 + [1.0])
BOT, EOT_TEXT, SH, EH, EOT = 128000, 128001, 128006, 128007, 128009
OBS_ID, ACT_ID, REW_ID, EDIT_ID = 79060, 1335, 50107, 3671
LEFT, DOWN, RIGHT, UP = 2414, 2996, 1315, 455
TILE = {0: 15, 1: 16, 2: 17, 6: 21, 10: 605, 14: 975, 15: 868}


def _authors_text(obs, acts, rews, truncated: bool) -> str:
    """The authors' format written out as one string (SPEC "Serialization")."""
    def block(role, value):
        return f"<|start_header_id|>{role}<|end_header_id|>{value}<|eot_id|>"
    text = "<|begin_of_text|>" + block("observation", obs[0])
    for t, a in enumerate(acts):
        text += block("action", ACTIONS[a]) + block("observation", obs[t + 1])
        if rews[t] != 0:
            text += block("reward", round(rews[t], 2))
    if truncated:
        text += block("edit", "truncated")
    return text + "<|end_of_text|>"


@pytest.fixture(scope="module")
def real_llama3(repo_root):
    from transformers import PreTrainedTokenizerFast

    path = repo_root / LLAMA3_TOKENIZER
    if not path.exists():
        pytest.skip("Llama 3 tokenizer not fetched: python tools/fetch_models.py --only llama3")
    return Serializer(PreTrainedTokenizerFast(tokenizer_file=str(path)), "llama3")


def test_paper_episode_has_the_authors_token_ids(real_llama3):
    s = real_llama3
    obs, acts, rews = FIG2
    enc = _encode(s, obs, acts, rews, terminated=True, truncated=False)
    # Pinned ids: one token per header, role, tile index and action word.
    expected = [BOT, SH, OBS_ID, EH, TILE[0], EOT]
    for t, a in enumerate(acts):
        expected += [SH, ACT_ID, EH, (LEFT, DOWN, RIGHT, UP)[a], EOT, SH, OBS_ID, EH, TILE[obs[t + 1]], EOT]
    expected += [SH, REW_ID, EH, 16, 13, 15, EOT, EOT_TEXT]  # "1.0" is three tokens: 1 . 0
    assert enc.ids.tolist() == expected
    # ... which is exactly the authors' text tokenized in one go.
    whole = s._tokenizer.encode(_authors_text(obs, acts, rews, False), add_special_tokens=False)
    assert enc.ids.tolist() == whole
    # Q positions: the <|end_header_id|> of each action header; the next token is the action word.
    assert enc.q_pos.tolist() == [9 + 10 * t - 1 for t in range(len(acts))]
    assert [int(enc.ids[q]) for q in enc.q_pos] == [EH] * len(acts)
    assert [int(enc.ids[q + 1]) for q in enc.q_pos] == [(LEFT, DOWN, RIGHT, UP)[a] for a in acts]
    assert s.action_token_ids.tolist() == [LEFT, DOWN, RIGHT, UP]
    assert len(s.after_action(2, 14, 0.0, False, False)) == 10  # a step costs 10 tokens (SPEC)


def test_paper_truncated_episode_and_pad(real_llama3):
    s = real_llama3
    obs, acts, rews = [0, 1, 1], [2, 3], [0.0, 0.0]
    enc = _encode(s, obs, acts, rews, terminated=False, truncated=True)
    whole = s._tokenizer.encode(_authors_text(obs, acts, rews, True), add_special_tokens=False)
    assert enc.ids.tolist() == whole
    assert enc.ids.tolist()[-7:] == [SH, EDIT_ID, EH, 376, 39107, EOT, EOT_TEXT]  # "truncated": two tokens
    # This (Llama 3.0) tokenizer names id 128004 <|reserved_special_token_2|>; Llama 3.1 calls it
    # <|finetune_right_pad_id|>: the pad id is the same.
    assert s.pad_id == 128004
    for tile in range(64):
        assert len(s._tokenizer.encode(str(tile), add_special_tokens=False)) == 1


def test_pad_falls_back_to_the_family_alternative():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from icrl_lightning.serialize import LLAMA3, format_vocabulary

    specials, words = format_vocabulary(LLAMA3)
    specials = ["<|reserved_special_token_2|>" if t == LLAMA3.pad else t for t in specials]
    vocab = {t: i for i, t in enumerate(["<unk>", *specials, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(specials)
    s = Serializer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"), "llama3")
    assert s.pad_id == vocab["<|reserved_special_token_2|>"]


def test_unk_that_is_a_real_special_token_is_accepted():
    # SmolLM2's tokenizer uses <|endoftext|> (the ChatML episode end) as its unk token.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from icrl_lightning.serialize import CHATML, format_vocabulary

    specials, words = format_vocabulary(CHATML)
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *[t for t in specials if t != "<|endoftext|>"], *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(specials)
    s = Serializer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>"), "chatml")
    assert s.ending(truncated=False) == (0,)
    with pytest.raises(KeyError, match="not in the tokenizer"):
        s.piece("observation_unknown_word")


def test_untag_table_undoes_the_failure_tags():
    s = Serializer(build_tokenizer("compact_outcome"), "compact_outcome")
    e = Episode([0, 1, 5, 9], [2, 1, 1], [0.0, 0.0, 0.0], True, False)
    failed = s.encode(e).ids
    # What the agent writes while it plays the episode, before it knows the outcome.
    played = list(s.begin(0))
    for t, a in enumerate(e.actions):
        played += s.after_action(a, e.observations[t + 1], 0.0, t == len(e.actions) - 1, False)
    assert len(played) == len(failed) and not np.array_equal(played, failed)
    table = s.untag_table()
    assert np.array_equal(table[failed], played)
    assert np.array_equal(table[np.asarray(played)], played)  # untagged tokens map to themselves
    assert Serializer(build_tokenizer("compact"), "compact").untag_table() is None
