"""Acting from a growing context with a KV cache, batched over many maps in lock-step.

Each map's context is kept as a list of episodes of token ids. Every lock-step call appends only
the tokens that are new for each map (the action just taken, the next observation, the next
action header), reads the Q-values at each map's last token, and never re-encodes the history,
except when a context must shrink to fit the window.

The KV cache is *ragged*: row ``i`` holds its map's tokens in columns ``0 .. length[i]-1`` and a
call writes each row's new tokens at that row's own offset, so rows that append fewer tokens leave
no padded gaps, a token's RoPE position is its column, and a row is reset (no-context play) or
re-encoded (context window) by rewriting it from column 0. Rows of maps that finished their trial
are dropped from the batch, so late calls cost only the maps still playing, and a call appends at
most one ordinary step's tokens per map (a map that also closes an episode and opens the next
finishes writing in the next call), so no call is widened by the few maps at an episode boundary.

Drafted steps (speculative decoding, exact): after a map acts, the agent drafts its next moves
without the model, on a copy of its environment and random generator: a random move where the
exploration rule will draw one, and where it will act greedily, the action the map last took from
that observation (a loop or the previous episode replayed). The next call appends the drafts' tokens
behind the step's and reads the Q-values after each; a draft is kept while the model's greedy
action equals it, and at the first that differs the row's cache is cut back and play goes on from
there, so the actions are those of playing one step per call. A looping greedy episode then costs a
few calls instead of one per step. Drafts stop before an episode's last step and never overrun the
window, and a call's rows x width stays within ``draft_budget`` tokens, so the many-row calls
early in a trial stay one step wide.

Context window policy: before a map's new tokens are appended, if its context would exceed
``max_context`` tokens, its oldest *whole* episodes are dropped until it fits and only that map
is re-encoded (positions restart at 0). The episode being played is never cut; a window too small
for two longest episodes is refused up front.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache

from icrl_lightning.checks import InputError
from icrl_lightning.envs.family import ProblemFamily, Task, copy_generator
from icrl_lightning.envs.frozen_lake import FrozenLake
from icrl_lightning.episodes import Episode
from icrl_lightning.qlearning import action_q_values
from icrl_lightning.serialize import Serializer


@dataclass
class TrialResult:
    """What a lock-step trial produced: per map, the ``Episode`` records it played (``map_id`` = the
    map's key, ``map_rows`` = the map it was played on), ``returns[map, episode]``,
    ``reencodes`` (whole contexts encoded afresh: the context window), ``retags`` (failed episodes
    re-appended with outcome tags), ``longest_context`` (the most tokens any map had in its context
    when it acted), ``drafted`` / ``drafts_kept`` (drafted steps sent to the model / kept because
    the model chose them: the module docstring) and
    ``q_values`` (per map, the Q row of every decision; only with ``play(..., record_q=True)``)."""

    returns: np.ndarray
    episodes: list[list[Episode]] = field(default_factory=list)
    forward_calls: int = 0
    reencodes: int = 0
    retags: int = 0
    longest_context: int = 0
    drafted: int = 0
    drafts_kept: int = 0
    q_values: list[list[np.ndarray]] | None = None

    @property
    def trajectories(self) -> list[list[list[int]]]:
        """Per map and episode, the tiles visited (the first is the start tile)."""
        return [[list(e.observations) for e in eps] for eps in self.episodes]

    @property
    def actions(self) -> list[list[list[int]]]:
        return [[list(e.actions) for e in eps] for eps in self.episodes]


def _cache_keyword(decoder) -> str:
    """The decoder's name for the KV-cache argument: ``cache`` (transformers >= 5.2x), else the
    older ``past_key_values`` (which newer versions still take, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _output_cache(out):
    return out["cache"] if "cache" in out else out.past_key_values


def draw_action(rng: np.random.Generator, greedy_prob: float, greedy, n_actions: int = 4) -> int:
    """The exploration rule of SPEC: with probability ``greedy_prob`` the greedy action, else a
    uniform one of ``n_actions``. Every agent draws in this order, so equal seeds give equal
    exploration."""
    if rng.random() < greedy_prob:
        return int(greedy())
    return int(rng.integers(n_actions))


class _RaggedCache(Cache):
    """A KV cache whose rows have their own lengths (see the module docstring).

    Per call: ``prepare(new)`` returns each row's positions for ``new`` columns (its length onwards)
    and makes room; the decoder's layers then ``update`` (write the new keys/values at
    those columns); ``commit(counts)`` advances each row by its count of real tokens. Columns past a
    row's length (padding written by a wider row's call, or stale after a reset) are never visible:
    the agent's 4-D mask lets query ``j`` of row ``i`` see columns ``<= length[i] + j`` only."""

    def __init__(self, rows: int, capacity: int):
        super().__init__(layers=[])
        self.k: list[torch.Tensor] = []  # per layer [rows, kv_heads, capacity, head_dim]
        self.v: list[torch.Tensor] = []
        self.capacity = capacity
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.width = 0
        self._positions = torch.zeros((rows, 0), dtype=torch.long)
        self._index: dict[torch.device, torch.Tensor] = {}

    def prepare(self, new: int) -> torch.Tensor:
        self.width = int(self.lengths.max()) + new
        if self.width > self.capacity:
            self._grow(max(self.width, self.capacity + 64))
        self._positions = self.lengths[:, None] + torch.arange(new)[None, :]
        self._index = {}
        return self._positions

    def commit(self, counts: torch.Tensor) -> None:
        self.lengths += counts

    def _grow(self, capacity: int) -> None:
        self.k = [torch.cat([t, t.new_zeros((*t.shape[:2], capacity - t.shape[2], t.shape[3]))], 2) for t in self.k]
        self.v = [torch.cat([t, t.new_zeros((*t.shape[:2], capacity - t.shape[2], t.shape[3]))], 2) for t in self.v]
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.k):
            b, h, _, d = key_states.shape
            self.k.append(key_states.new_zeros((b, h, self.capacity, d)))
            self.v.append(value_states.new_zeros((b, h, self.capacity, d)))
        dev = key_states.device
        if dev not in self._index:
            rows = torch.arange(len(self._positions), device=dev)[:, None]
            self._index[dev] = (rows, slice(None), self._positions.to(dev))
        # Advanced indexing writes [rows, new, heads, dim] at (row, :, position): the same values as
        # scatter_ along dim 2, which on CPU costs about 30 ms per call in bf16 (it walks the whole
        # cache) against well under 1 ms here.
        index = self._index[dev]
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[index] = key_states.transpose(1, 2)
        v[index] = value_states.transpose(1, 2)
        return k[:, :, : self.width], v[:, :, : self.width]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.width

    def gather(self, rows: list[int], lengths: list[int], width: int) -> _RaggedCache:
        """A cache of ``rows`` (copies of their first ``lengths[j]`` columns, room for ``width``)."""
        sub = _RaggedCache(len(rows), width)
        index = torch.as_tensor(rows)
        sub.k = [t[index.to(t.device), :, :width] for t in self.k]
        sub.v = [t[index.to(t.device), :, :width] for t in self.v]
        sub.lengths = torch.as_tensor(lengths, dtype=torch.long)
        return sub

    def scatter(self, sub: _RaggedCache, rows: list[int], starts: list[int]) -> None:
        """Write back what calls on ``sub`` (from ``gather(rows, starts, ...)``) appended to each row."""
        for j, (row, start) in enumerate(zip(rows, starts, strict=True)):
            end = int(sub.lengths[j])
            for t, u in zip(self.k + self.v, sub.k + sub.v, strict=True):
                t[row, :, start:end] = u[j, :, start:end]
            self.lengths[row] = end

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only ``rows`` of the batch (in that order). Where every row that moves comes from past
        the new batch's end (``fill_order``), it is copied into its place and the batch is a view of
        its first rows: the cost is the rows moved, not the whole cache."""
        n = len(rows)
        if all(src == dst or src >= n for dst, src in enumerate(rows)):
            for t in self.k + self.v:
                for dst, src in enumerate(rows):
                    if src != dst:
                        t[dst] = t[src]
            self.k = [t[:n] for t in self.k]
            self.v = [t[:n] for t in self.v]
        else:
            index = torch.as_tensor(rows)
            self.k = [t[index.to(t.device)] for t in self.k]
            self.v = [t[index.to(t.device)] for t in self.v]
        self.lengths = self.lengths[torch.as_tensor(rows, dtype=torch.long)]

    @staticmethod
    def fill_order(keep: list[bool]) -> list[int]:
        """The rows to keep (``keep[r]``), each dropped row's place taken by a kept row from the end, so
        that ``keep_rows`` moves as few rows as there are places to fill."""
        n = sum(keep)
        order = list(range(n))
        holes = [r for r in range(n) if not keep[r]]
        movers = [r for r in range(n, len(keep)) if keep[r]]
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        return order

    def write_row(self, row: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Replace ``row`` by one sequence's keys and values (``[1, kv_heads, length, head_dim]`` per
        layer, positions from 0)."""
        length = layers[0][0].shape[2]
        if length > self.capacity:
            self._grow(length)
        if not self.k:  # no call has run on this cache yet
            n = len(self.lengths)
            self.k = [k.new_zeros((n, k.shape[1], self.capacity, k.shape[3])) for k, _ in layers]
            self.v = [v.new_zeros((n, v.shape[1], self.capacity, v.shape[3])) for _, v in layers]
        for t, s, (k, v) in zip(self.k, self.v, layers, strict=True):
            t[row, :, :length] = k[0]
            s[row, :, :length] = v[0]
        self.lengths[row] = length


@contextmanager
def _last_position_only(decoder):
    """While encoding one unpadded sequence, compute the last layer's output projection and MLP for
    the last position only: every other position needs only that layer's keys and values (made
    before them), and the residual sums broadcast the one row. About a fifth of the work of a
    re-encoding. Decoders without Llama's ``layers[-1].self_attn.o_proj`` / ``layers[-1].mlp`` are
    left alone."""
    last = getattr(decoder, "layers", [None])[-1]
    o_proj = getattr(getattr(last, "self_attn", None), "o_proj", None)
    mlp = getattr(last, "mlp", None)
    if not isinstance(o_proj, torch.nn.Module) or not isinstance(mlp, torch.nn.Module):
        yield
        return

    def keep_last(module, args):
        return (args[0][:, -1:], *args[1:])

    handles = [o_proj.register_forward_pre_hook(keep_last), mlp.register_forward_pre_hook(keep_last)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Context:
    """One map's token history: closed episodes plus the one being played, and the tokens not yet
    in the KV cache."""

    def __init__(self):
        self.episodes: list[list[int]] = [[]]
        self.length = 0
        self.pending: list[int] = []

    def __len__(self) -> int:
        return self.length

    def add(self, ids) -> None:
        self.episodes[-1] += ids
        self.pending += ids
        self.length += len(ids)

    def add_cached(self, ids) -> None:
        """Tokens already in the KV cache (a checked draft)."""
        self.episodes[-1] += ids
        self.length += len(ids)

    def close_episode(self) -> None:
        self.episodes.append([])

    def clear(self) -> None:
        self.episodes, self.length, self.pending = [[]], 0, []

    def drop_oldest(self, limit: int) -> None:
        """Drop whole closed episodes, oldest first, until at most ``limit`` tokens remain."""
        while self.length > limit and len(self.episodes) > 1:
            self.length -= len(self.episodes.pop(0))

    def tokens(self) -> list[int]:
        return [t for e in self.episodes for t in e]


class InContextAgent:
    """Plays tasks (maps) with a causal LM whose action-token logits are Q-values.

    Args:
        model: a causal LM (``LlamaForCausalLM`` or peft-wrapped) with ``get_decoder()`` and
            ``get_output_embeddings()``; ``sdpa`` or ``eager`` attention (the agent passes its own
            4-D attention mask).
        serializer: the format's token pieces.
        max_context: longest context in tokens (usually the trained sequence length).
        max_episode_steps: episode time limit (to refuse a window smaller than two episodes).
        env: the problem family whose tasks are played (default Frozen Lake); its actions are the
            serializer's.
        draft_budget: most tokens (rows x width) of a call with drafted steps (module docstring);
            0 plays one step per call. The actions are the same either way.
    """

    def __init__(self, model, serializer: Serializer, max_context: int, max_episode_steps: int = 100,
                 env: ProblemFamily | None = None, draft_budget: int = 256):
        self.model, self.s = model, serializer
        self.draft_budget = draft_budget
        self.env = env or FrozenLake()
        self.n_actions = len(serializer.actions)
        if self.n_actions != self.env.n_actions:
            raise InputError(f"the serializer writes {self.n_actions} actions, the {type(self.env).__name__} family "
                             f"has {self.env.n_actions}")
        self.max_context, self.max_episode_steps = max_context, max_episode_steps
        longest = self._longest_episode_tokens()
        if max_context < 2 * longest:
            raise InputError(f"evaluation max_context={max_context} tokens (0 = data.seq_len) cannot hold one "
                             f"longest episode ({longest} tokens at {max_episode_steps} steps) plus the next: "
                             f"raise it to at least {2 * longest}")

    def _longest_episode_tokens(self) -> int:
        return self.s.longest_episode_tokens(self.max_episode_steps, self.s.max_tiles, self.env.rewards_per_episode)

    def _step_tokens(self) -> int:
        """Tokens of an ordinary step (action, next observation, next action header)."""
        s = self.s
        return min(len(s.after_action(a, o, 0.0, False, False)) for a in range(self.n_actions)
                   for o in (0, s.max_tiles - 1))

    # --- model calls ----------------------------------------------------------------------------
    @staticmethod
    def _mask(positions: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, new, width], additive: query ``j`` of row ``i`` sees columns ``0 .. positions[i, j]``.
        Additive (not boolean) so that eager attention can add it and SDPA need not convert it in
        every layer."""
        hidden = (torch.arange(width)[None, None, :] > positions[:, :, None])[:, None]
        return torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, torch.finfo(dtype).min)

    def _decode(self, chunks: list[list[int]], cache: _RaggedCache, head: torch.Tensor) -> torch.Tensor:
        """Append ``chunks[i]`` to row ``i`` of ``cache``; Q-values ``[rows, width, actions]`` at every new
        token (padding and rows with an empty chunk get meaningless values)."""
        dev = head.device
        counts = torch.as_tensor([len(c) for c in chunks])
        width = max(1, int(counts.max()))
        pad = self.s.pad_id
        ids = torch.as_tensor([c + [pad] * (width - len(c)) for c in chunks])
        positions = cache.prepare(width)
        mask = self._mask(positions, cache.width, head.dtype)
        decoder = self.model.get_decoder()
        out = decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                      use_cache=True, **{_cache_keyword(decoder): cache})
        cache.commit(counts)
        return action_q_values(out.last_hidden_state, head).cpu()

    def _reencode(self, tails: list[list[int]], head: torch.Tensor, cache: _RaggedCache, rows: list[int],
                  starts: list[int]) -> torch.Tensor:
        """Encode ``tails[j]`` into row ``rows[j]`` of ``cache`` from column ``starts[j]`` on, reading
        the row's first ``starts[j]`` columns as they are (0: the whole context afresh, positions from
        0); their Q-values at each tail's last token. Whole contexts one map at a time with the
        model's own causal attention (no padding); tails (retagged episodes) all in one call on a
        copy of their rows, whose new columns are then written back."""
        q = torch.empty((len(rows), self.n_actions))
        decoder, dev = self.model.get_decoder(), head.device
        part = [j for j, start in enumerate(starts) if start]  # a retag follows a call: the row has columns
        whole = [j for j, start in enumerate(starts) if not start]
        if part:
            width = max(starts[j] + len(tails[j]) for j in part)
            sub = cache.gather([rows[j] for j in part], [starts[j] for j in part], width)
            q_all = self._decode([tails[j] for j in part], sub, head)
            for n, j in enumerate(part):
                q[j] = q_all[n, len(tails[j]) - 1]
            cache.scatter(sub, [rows[j] for j in part], [starts[j] for j in part])
        with _last_position_only(decoder):
            for j in whole:
                out = decoder(input_ids=torch.as_tensor([tails[j]], device=dev), use_cache=True)
                cache.write_row(rows[j], [(layer.keys, layer.values) for layer in _output_cache(out).layers])
                q[j] = action_q_values(out.last_hidden_state[0, -1:], head)[0].cpu()
        return q

    # --- the trial --------------------------------------------------------------------------------
    @torch.inference_mode()
    def play(
        self,
        maps: list[Task],
        schedule: list[float],
        seed: int,
        keep_context: bool = True,
        switch_to: list[Task] | None = None,
        prefill: list[list[list[int]]] | None = None,
        record_q: bool = False,
        keys: list[int] | None = None,
    ) -> TrialResult:
        """One trial per map, all in lock-step: ``len(schedule)`` episodes, episode ``k`` taking the
        greedy action with probability ``schedule[k]``.

        Args:
            maps: the maps, one trial each.
            schedule: greedy probability of each episode.
            seed: map ``i`` draws its resets and exploration from ``default_rng([seed, i])``.
            keep_context: ``False`` starts every episode from an empty context (no-context baseline).
            switch_to: non-stationary scenario: after ``len(schedule)`` episodes map ``i`` is replaced
                by ``switch_to[i]`` and the schedule is played again, the context kept.
            prefill: per map, token ids of whole episodes put in its context before its first
                episode (behaviour stitching); they are ordinary closed episodes for the window policy.
            record_q: keep the Q row of every decision in ``TrialResult.q_values``.
            keys: map ``i`` draws from ``default_rng([seed, keys[i]])`` instead (its index in the whole
                evaluation set, so that a map plays the same whichever rank and batch position it gets).
        """
        n_maps, n_eps = len(maps), len(schedule)
        if switch_to is not None and len(switch_to) != n_maps:
            raise ValueError(f"switch_to has {len(switch_to)} maps for {n_maps} maps")
        phases = [maps] if switch_to is None else [maps, switch_to]
        total = n_eps * len(phases)
        rngs = [np.random.default_rng([seed, k]) for k in (range(n_maps) if keys is None else keys)]
        played_on = [list(m) for m in maps]  # the map each row plays now (switches in a non-stationary trial)
        envs = [self.env.make_env(m, self.max_episode_steps) for m in maps]
        ctx = [_Context() for _ in range(n_maps)]
        if prefill is not None and len(prefill) != n_maps:
            raise ValueError(f"prefill has {len(prefill)} contexts for {n_maps} maps")
        for c, episodes in zip(ctx, prefill or [[]] * n_maps, strict=True):
            for episode_ids in episodes:
                c.add(list(episode_ids))
                c.close_episode()
        returns = np.zeros((n_maps, total))
        result = TrialResult(returns=returns, episodes=[[] for _ in range(n_maps)],
                             q_values=[[] for _ in range(n_maps)] if record_q else None)
        # The episode being played, per map: tiles, actions, rewards (closed into an Episode at its end).
        tiles: list[list[int]] = [[] for _ in range(n_maps)]
        moves: list[list[int]] = [[] for _ in range(n_maps)]
        gains: list[list[float]] = [[] for _ in range(n_maps)]
        keys = list(range(n_maps)) if keys is None else list(keys)
        episode = np.zeros(n_maps, dtype=int)
        # Outcome tags: the column where a map's last episode starts once it failed and was retagged;
        # the cache is rolled back there and the episode re-appended (-1: nothing to retag).
        retag_from = np.full(n_maps, -1)
        ep_return = np.zeros(n_maps)
        active = np.ones(n_maps, dtype=bool)
        head = self.model.get_output_embeddings().weight[torch.as_tensor(self.s.action_token_ids)]
        cache = _RaggedCache(n_maps, self.max_context + 64)
        slots = list(range(n_maps))  # batch row -> map
        step = self._step_tokens()

        def start_episode(i: int, row: int) -> None:
            k = episode[i]
            if k % n_eps == 0 and k > 0:  # non-stationary switch: a new map, same context
                envs[i].close()
                envs[i] = self.env.make_env(phases[k // n_eps][i], self.max_episode_steps)
                played_on[i] = list(phases[k // n_eps][i])
            o, _ = envs[i].reset(seed=int(rngs[i].integers(2**31)))
            ep_return[i] = 0.0
            tiles[i], moves[i], gains[i] = [int(o)], [], []
            if not keep_context:
                # An empty context: the row restarts at column (= position) 0.
                ctx[i].clear()
                cache.lengths[row] = 0
            ctx[i].add(self.s.begin(int(o)))

        # Drafted steps (module docstring): per map, (action, tokens) of the moves drafted behind its
        # pending tokens, and per map the action it last took from each observation.
        drafts: dict[int, list[tuple[int, list[int]]]] = {}
        last_action: list[dict[int, int]] = [{} for _ in range(n_maps)]

        def take(i: int, row: int, a: int, drafted: list[int] | None = None) -> None:
            """Map ``i`` (batch row ``row``) plays ``a``; its tokens are new, or already in the cache
            (``drafted``: a checked draft's tokens, which they must equal)."""
            o2, rew, term, trunc, _ = envs[i].step(a)
            last_action[i][tiles[i][-1]] = a
            done = term or trunc
            ep_return[i] += rew
            tiles[i].append(int(o2))
            moves[i].append(a)
            gains[i].append(float(rew))
            ids = self.s.after_action(a, int(o2), float(rew), done, bool(trunc and not term))
            if drafted is not None:
                if done or ids != drafted:
                    raise RuntimeError(f"{type(self.env).__name__}.fork_env: a drafted step on a copy of the "
                                       "environment differs from the same step on the environment itself")
                ctx[i].add_cached(ids)
                return
            ctx[i].add(ids)
            if done:
                k = episode[i]
                returns[i, k] = ep_return[i]
                result.episodes[i].append(Episode(
                    tiles[i], moves[i], gains[i], bool(term), bool(trunc and not term), map_id=keys[i],
                    map_rows=tuple(played_on[i]), learner_episode=int(k)))
                if ep_return[i] <= 0 and keep_context and self.s.outcome_tags:
                    self.s.mark_failed(ctx[i].episodes[-1])
                    retag_from[i] = sum(len(e) for e in ctx[i].episodes[:-1])
                ctx[i].close_episode()
                episode[i] += 1
                if episode[i] == total:
                    active[i] = False
                else:
                    start_episode(i, row)

        def draft(i: int) -> None:
            """Draft map ``i``'s next moves behind its pending tokens, on copies of its environment and
            generator, within its share of the call's budget and the window; none before a retag."""
            room = min(self.draft_budget // len(slots) - len(ctx[i].pending), self.max_context - len(ctx[i]))
            if room < step or retag_from[i] >= 0:
                return
            rng, env, seen, memory = copy_generator(rngs[i]), None, last_action[i], {}
            p, o, steps = schedule[episode[i] % n_eps], tiles[i][-1], []
            while room >= step:
                if rng.random() < p:  # draw_action's order: greedy, or a uniform action
                    a = memory.get(o, seen.get(o))
                    if a is None:
                        break
                else:
                    a = int(rng.integers(self.n_actions))
                env = env or self.env.fork_env(envs[i])
                o2, rew, term, trunc, _ = env.step(a)
                ids = self.s.after_action(a, int(o2), float(rew), False, False)
                if term or trunc or len(ids) > room:
                    break
                steps.append((a, ids))
                room -= len(ids)
                memory[o], o = a, int(o2)
            if steps:
                drafts[i] = steps

        for i in range(n_maps):
            start_episode(i, i)
        while active.any():
            if not all(active[i] for i in slots):  # drop finished maps' rows from the batch
                live = cache.fill_order([bool(active[i]) for i in slots])
                cache.keep_rows(live)
                slots = [slots[r] for r in live]
            # Re-encoded rows: a context over the window (its oldest episodes dropped, all of it encoded
            # afresh), or one whose last episode was just retagged as failed (outcome-tagged formats:
            # rolled back to that episode's start and the rest re-appended).
            over = [r for r, i in enumerate(slots) if active[i] and len(ctx[i]) > self.max_context]
            tails = [r for r, i in enumerate(slots) if active[i] and retag_from[i] >= 0 and r not in over]
            for r in over:
                ctx[slots[r]].drop_oldest(self.max_context)  # the open episode fits by the check in __init__
            starts = {r: (0 if r in over else int(retag_from[slots[r]])) for r in over + tails}
            for r in starts:
                retag_from[slots[r]] = -1
            # A call appends at most one step's worth of tokens per row (plus its drafts): the few rows
            # that also close an episode and open the next finish writing in the next call(s) instead of
            # widening every row's call with padding. A row acts once all its tokens are in.
            chunks: list[list[int]] = []
            read_at: dict[int, int] = {}  # drafted row -> column of the chunk whose Q-values decide next
            for r, i in enumerate(slots):
                c = ctx[i]
                if not active[i] or r in starts:
                    drafts.pop(i, None)  # none are made for these rows; never send stale ones
                    chunks.append([])
                    if active[i]:
                        c.pending = []  # written by the re-encoding
                    continue
                if i in drafts:
                    result.drafted += len(drafts[i])
                    read_at[r] = len(c.pending) - 1
                    chunks.append(c.pending + [t for _, ids in drafts[i] for t in ids])
                    c.pending = []
                    continue
                chunks.append(c.pending[:step])
                c.pending = c.pending[step:]
            base = cache.lengths.clone()
            if any(chunks):
                q_all = self._decode(chunks, cache, head)
                last = torch.as_tensor([max(len(c) - 1, 0) for c in chunks])
                q = q_all[torch.arange(len(chunks)), last]
            else:
                q = torch.zeros((len(slots), self.n_actions))
            if starts:
                rows = list(starts)
                q[rows] = self._reencode([ctx[slots[r]].tokens()[starts[r]:] for r in rows], head, cache, rows,
                                         [starts[r] for r in rows])
                result.reencodes += len(over)
                result.retags += len(tails)
            result.forward_calls += 1
            for r, i in enumerate(slots):
                if not active[i] or ctx[i].pending:
                    continue
                steps, at = drafts.pop(i, []), read_at.get(r)
                q_row = q[r] if at is None else q_all[r, at]
                while True:
                    result.longest_context = max(result.longest_context, len(ctx[i]))
                    if record_q:
                        result.q_values[i].append(q_row.numpy().copy())
                    a = draw_action(rngs[i], schedule[episode[i] % n_eps], lambda: q_row.argmax(), self.n_actions)
                    if steps and a == steps[0][0]:  # the draft holds: its tokens are in the cache
                        drafted = steps.pop(0)[1]
                        take(i, r, a, drafted)
                        result.drafts_kept += 1
                        at += len(drafted)
                        q_row = q_all[r, at]
                        continue
                    if at is not None:  # cut the row back behind the last token read
                        cache.lengths[r] = base[r] + at + 1
                    take(i, r, a)
                    if active[i] and self.draft_budget and self.max_episode_steps > 1:  # (bandits: one pull)
                        draft(i)
                    break
        for e in envs:
            e.close()
        return result
