"""Episodes -> token ids, with the positions whose logits are the Q-values.

An episode is built from two kinds of pieces, which the in-context agent appends one at a time
as it acts, so training sequences and evaluation contexts are the same tokens by construction:

* ``begin(obs0)``: episode start, the first observation, then the action header;
* ``after_action(a, next_obs, r, done, truncated)``: the action word, the next observation,
  the reward when it is nonzero, and either the next action header or (the episode over) the
  edit marker on truncation and the episode end.

The last token of every piece that ends in an action header is an *action position*: its logits
at the four action tokens are Q(context, .). Every distinct piece of text is tokenized once and
cached as ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from icrl_lightning.envs.frozen_lake import ACTIONS, FrozenLake
from icrl_lightning.episodes import Episode


@dataclass(frozen=True)
class Format:
    """How the roles observation / action / reward / edit are written for one model family."""

    name: str
    episode_start: str
    episode_end: str
    pad: str
    role_prefix: str  # "{role}" is replaced by the role word
    role_suffix: str
    observation: str = "{}"  # "{}" is replaced by the tile index
    reward: str = "{}"  # "{}" is replaced by round(r, 2)
    truncation: str = "truncated"
    # Other names of the pad token in the same family, tried in order when ``pad`` is not one token
    # of the tokenizer (the Llama 3.0 tokenizer calls id 128004 <|reserved_special_token_2|>).
    pad_alternatives: tuple[str, ...] = ()
    # Outcome tags: when set, an episode that did not reach a goal is written with ``failure_start``
    # instead of ``episode_start`` and its observations with ``failure_observation`` ("{}" = tile),
    # so the plain start and observations also mean "this episode reached a goal". The evaluation
    # agent writes every episode it plays as a success (it aims for a goal) and rewrites it once it
    # has failed, so later episodes see each earlier episode's outcome at every one of its tokens
    # instead of only at its end. Each tagged piece must be as many tokens as the untagged one.
    failure_start: str = ""
    failure_observation: str = ""
    roles: dict[str, str] = field(default_factory=lambda: {r: r for r in ("observation", "action", "reward", "edit")})

    def header(self, role: str) -> str:
        return self.role_prefix.replace("{role}", self.roles[role])


# SPEC "Serialization": the authors' exact format with Llama 3 special tokens, no newlines.
LLAMA3 = Format(
    name="llama3",
    episode_start="<|begin_of_text|>",
    episode_end="<|end_of_text|>",
    pad="<|finetune_right_pad_id|>",
    role_prefix="<|start_header_id|>{role}<|end_header_id|>",
    role_suffix="<|eot_id|>",
    pad_alternatives=("<|reserved_special_token_2|>",),
)
# The same roles in ChatML (SmolLM2, Qwen): ``<|im_start|>role\nvalue<|im_end|>\n``, the chat
# template's layout. The action word follows the newline of its header, so it is written without
# a leading space: with SmolLM2's tokenizer "left", "down", "right", "up" are one token each
# (" left" is another single token, but not the one a chat turn starts with). Tile indices may
# be several tokens (SmolLM2 splits digits); only the action word must be one.
CHATML = Format(
    name="chatml",
    episode_start="",
    episode_end="<|endoftext|>",
    pad="<|endoftext|>",
    role_prefix="<|im_start|>{role}\n",
    role_suffix="<|im_end|>\n",
)
# One token per observation, action and nonzero reward, plus episode delimiters: for small
# models trained from scratch, where the header tokens would only cost compute.
COMPACT = Format(
    name="compact",
    episode_start="<ep>",
    episode_end="</ep>",
    pad="<pad>",
    role_prefix="",
    role_suffix="",
    observation="o{}",
    reward="r{}",
    truncation="<trunc>",
)
# The compact format with outcome tags (not in the paper): an episode that reached a goal (and the
# one being played) is written as in ``compact``; one that did not starts with ``<ep->`` and writes
# its tiles as ``x{tile}``. A causal model cannot see at a past step whether that episode succeeded
# (the reward comes later); here every token says so, and a tile of a failed episode is not the
# same token as that tile in a success, so copying "what was done here before" copies successes.
COMPACT_OUTCOME = replace(COMPACT, name="compact_outcome", failure_start="<ep->", failure_observation="x{}")
FORMATS = {f.name: f for f in (LLAMA3, CHATML, COMPACT, COMPACT_OUTCOME)}

REWARD_VALUES = FrozenLake.reward_values  # the rewards Frozen Lake can give that are not zero


def reward_text(reward: float) -> str:
    return str(round(float(reward), 2))


def format_vocabulary(fmt: Format, max_tiles: int = 64, actions: tuple[str, ...] = ACTIONS,
                      reward_values: tuple[float, ...] = REWARD_VALUES) -> tuple[list[str], list[str]]:
    """(special tokens, words) a tokenizer made in code needs to write ``fmt`` with one token per
    field; tiles ``0 .. max_tiles-1``, the family's ``actions`` and nonzero ``reward_values``
    (defaults: Frozen Lake's)."""
    specials = [fmt.pad, fmt.episode_start, fmt.episode_end, fmt.failure_start]
    words = [fmt.observation.format(i) for i in range(max_tiles)] + list(actions)
    if fmt.failure_observation:
        words += [fmt.failure_observation.format(i) for i in range(max_tiles)]
    words += [fmt.reward.format(reward_text(r)) for r in reward_values] + [fmt.truncation]
    if fmt.role_prefix:
        head, _, tail = fmt.role_prefix.partition("{role}")
        specials += [head, tail, fmt.role_suffix]
        words += list(fmt.roles.values())
    else:
        specials.append(fmt.truncation)
        words.remove(fmt.truncation)
    return [s for s in dict.fromkeys(specials) if s], words


class Serializer:
    """Token ids of the pieces of ``fmt`` for one tokenizer and one problem family's vocabulary:
    observations ``0 .. max_tiles-1``, the action words ``actions`` (action ``a`` is
    ``actions[a]``) and the nonzero ``reward_values`` (defaults: Frozen Lake's). Holds only small
    id tables, so it pickles cheaply into DataLoader workers."""

    def __init__(self, tokenizer, fmt: Format | str, max_tiles: int = 64, actions: tuple[str, ...] = ACTIONS,
                 reward_values: tuple[float, ...] = REWARD_VALUES):
        self.fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
        self.max_tiles = max_tiles
        self.actions, self.reward_values = tuple(actions), tuple(reward_values)
        self._tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}
        self.pad_id = self._pad_id()
        self.action_token_ids = np.array([self._single(a, f"action word {a!r}") for a in self.actions])
        self.action_header = self.piece(self.fmt.header("action"))
        self.warm_up()
        self._failed_ids = self._failure_table()

    def __getstate__(self):
        # Workers get the id tables only; every piece was tokenized by warm_up().
        return {**self.__dict__, "_tokenizer": None}

    def piece(self, text: str) -> tuple[int, ...]:
        """The token ids of one piece of text (tokenized once, then cached)."""
        ids = self._cache.get(text)
        if ids is None:
            if self._tokenizer is None:
                raise KeyError(f"piece {text!r} is not in this serializer's cache (tile >= max_tiles?)")
            ids = tuple(self._tokenizer.encode(text, add_special_tokens=False))
            unk = getattr(self._tokenizer, "unk_token_id", None)
            # Some tokenizers reuse a real special token as unk (SmolLM2: <|endoftext|>): only an
            # unk that the text did not spell out is an unknown piece.
            if unk is not None and unk in ids and str(self._tokenizer.unk_token) not in text:
                raise KeyError(f"format {self.fmt.name}: {text!r} is not in the tokenizer's vocabulary "
                               f"(a tile >= max_tiles={self.max_tiles}?)")
            self._cache[text] = ids
        return ids

    def _pad_id(self) -> int:
        for pad in (self.fmt.pad, *self.fmt.pad_alternatives):
            try:
                ids = self.piece(pad)
            except KeyError:  # not in a word-level vocabulary
                continue
            if len(ids) == 1:
                return ids[0]
        names = [self.fmt.pad, *self.fmt.pad_alternatives]
        raise ValueError(f"format {self.fmt.name}: no pad token among {names} is one token of this tokenizer")

    def _single(self, text: str, what: str) -> int:
        ids = self.piece(text)
        if len(ids) != 1:
            raise ValueError(f"format {self.fmt.name}: {what} must be one token, got ids {list(ids)}")
        return ids[0]

    def warm_up(self) -> Serializer:
        """Tokenize every piece an episode can need (tiles below ``max_tiles``)."""
        for i in range(self.max_tiles):
            self.observation(i)
        for a in range(len(self.actions)):
            self.action(a)
        for r in self.reward_values:
            self.reward(r)
        self.ending(truncated=True)
        self.ending(truncated=False)
        self.piece(self.fmt.episode_start)
        return self  # the outcome-tagged pieces are tokenized by _failure_table

    def _failure_table(self) -> dict[int, int]:
        """id in a success -> id in a failure, for the outcome-tagged pieces (token by token)."""
        f = self.fmt
        pairs = [(f.episode_start, f.failure_start)] if f.failure_start else []
        if f.failure_observation:
            pairs += [(f.observation.format(i), f.failure_observation.format(i)) for i in range(self.max_tiles)]
        table: dict[int, int] = {}
        for plain, failed in pairs:
            a, b = self.piece(plain), self.piece(failed)
            if len(a) != len(b):
                raise ValueError(f"format {f.name}: {failed!r} must be as many tokens as {plain!r} "
                                 f"(got {list(b)} and {list(a)})")
            table.update((x, y) for x, y in zip(a, b, strict=True) if x != y)
        return table

    @property
    def max_id(self) -> int:
        """The largest token id this serializer writes (pad included)."""
        return max([self.pad_id, *(max(ids) for ids in self._cache.values() if ids)])

    def untag_table(self) -> np.ndarray | None:
        """``table[id]``: the id a token of a failed episode has in the episode as it was played,
        untagged (``mark_failed`` undone; every other id maps to itself); None without outcome tags."""
        if not self._failed_ids:
            return None
        table = np.arange(self.max_id + 1, dtype=np.int32)  # the failure pieces are in the cache too
        for plain, failed in self._failed_ids.items():
            table[failed] = plain
        return table

    def observation_ids(self) -> np.ndarray:
        """``[k, max_tiles]``: the one token id of each observation as written in a success (row 0)
        and, for outcome-tagged formats, in a failure (row 1); what ``data.permute_observations``
        permutes. ValueError for a format that writes an observation as several tokens."""
        plain = [self.observation(i) for i in range(self.max_tiles)]
        if any(len(ids) != 1 for ids in plain):
            raise ValueError(f"format {self.fmt.name} writes an observation as several tokens; "
                             "permuting observations needs one token each (compact, compact_outcome)")
        rows = [[ids[0] for ids in plain]]
        if any(ids[0] in self._failed_ids for ids in plain):
            rows.append([self._failed_ids.get(ids[0], ids[0]) for ids in plain])
        return np.asarray(rows, dtype=np.int64)

    @property
    def outcome_tags(self) -> bool:
        """Whether a failed episode is written differently from a success (``Format.failure_*``)."""
        return bool(self._failed_ids)

    def mark_failed(self, episode_ids) -> None:
        """Rewrite, in place, the ids of an episode that did not reach a goal (outcome-tagged
        formats; a no-op otherwise). Lengths and positions do not change."""
        table = self._failed_ids
        if table:
            for j, t in enumerate(episode_ids):
                episode_ids[j] = table.get(int(t), t)

    def _role(self, role: str, value: str) -> tuple[int, ...]:
        f = self.fmt
        return self.piece(f.header(role) + value + f.role_suffix) if f.role_prefix else self.piece(value)

    def observation(self, obs: int) -> tuple[int, ...]:
        return self._role("observation", self.fmt.observation.format(int(obs)))

    def reward(self, reward: float) -> tuple[int, ...]:
        return self._role("reward", self.fmt.reward.format(reward_text(reward)))

    def action(self, action: int) -> tuple[int, ...]:
        # The header was appended already (it ends the previous piece): value + suffix only.
        return self.piece(self.actions[action] + self.fmt.role_suffix)

    def ending(self, truncated: bool) -> tuple[int, ...]:
        ids = self._role("edit", self.fmt.truncation) if truncated else ()
        return ids + self.piece(self.fmt.episode_end)

    def longest_episode_tokens(self, steps: int, max_obs: int, rewards_per_episode: int | None = 1) -> int:
        """Tokens of the longest episode of ``steps`` steps on observations below ``max_obs``
        (and ``max_tiles``): every step on the largest observation, the family's most nonzero
        rewards (``None``: one per step) at its end, and a termination or a truncation marker,
        whichever is longer."""
        tile = min(max_obs, self.max_tiles) - 1
        rewarded = min(steps, rewards_per_episode or steps)
        longest = 0
        for r in (0.0, *self.reward_values):
            rewards = [0.0] * steps if r == 0.0 else [0.0] * (steps - rewarded) + [r] * rewarded
            for trunc in (False, True):
                episode = Episode([tile] * (steps + 1), [0] * steps, rewards, not trunc, trunc)
                longest = max(longest, len(self.encode(episode)))
        return longest

    # --- the two pieces ---------------------------------------------------------------------
    def begin(self, obs0: int) -> list[int]:
        return [*self.piece(self.fmt.episode_start), *self.observation(obs0), *self.action_header]

    def after_action(self, action: int, next_obs: int, reward: float, done: bool, truncated: bool) -> list[int]:
        ids = [*self.action(action), *self.observation(next_obs)]
        if reward != 0:
            ids += self.reward(reward)
        ids += self.ending(truncated) if done else self.action_header
        return ids

    def encode(self, episode: Episode) -> EncodedEpisode:
        """The episode's token ids and, for each action, the position that predicts it. In an
        outcome-tagged format an episode without reward is rewritten by ``mark_failed``."""
        e = episode
        ids = self.begin(e.observations[0])
        q_pos = [len(ids) - 1]
        n = len(e.actions)
        for t in range(n):
            done = t == n - 1
            ids += self.after_action(e.actions[t], e.observations[t + 1], e.rewards[t], done, e.truncated and done)
            if not done:
                q_pos.append(len(ids) - 1)
        if n == 0:  # an episode with no action is only its first observation
            q_pos = []
        success = any(r > 0 for r in e.rewards)
        if not success:
            self.mark_failed(ids)
        return EncodedEpisode(
            ids=np.asarray(ids, dtype=np.int32),
            q_pos=np.asarray(q_pos, dtype=np.int32),
            actions=np.asarray(e.actions, dtype=np.int64),
            rewards=np.asarray(e.rewards, dtype=np.float32),
            tiles=np.asarray(e.observations[:n], dtype=np.int64),
            map_id=e.map_id,
            success=success,
        )


@dataclass(frozen=True)
class EncodedEpisode:
    """An ``Episode`` as tokens: what the replay stream packs."""

    ids: np.ndarray  # int32 [n_tokens]
    q_pos: np.ndarray  # int32 [n_actions]: position whose logits predict each action
    actions: np.ndarray  # int64 [n_actions]
    rewards: np.ndarray  # float32 [n_actions]
    tiles: np.ndarray  # int64 [n_actions]: the tile each action was taken on
    map_id: int = -1  # the map it was played on (-1: unknown)
    success: bool = False  # reached a goal

    def __len__(self) -> int:
        return len(self.ids)
