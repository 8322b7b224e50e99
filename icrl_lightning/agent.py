"""Acting from a growing context with a KV cache, batched over many maps in lock-step.

Each map's context is kept as a list of episodes of token ids. Every lock-step call appends only
the tokens that are new for each map (the action just taken, the next observation, the next
action header; right-padded to a common width and masked), reads the Q-values at each map's last
token, and never re-encodes the history, except when a context must shrink to fit the window.

Context window policy: when a map's context would exceed ``max_context`` tokens, its oldest
*whole* episodes are dropped and the batch is re-encoded from the trimmed contexts. The episode
being played is never cut; a window too small for one longest episode is refused up front.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from icrl_lightning.envs.frozen_lake import Map, make_env
from icrl_lightning.serialize import Serializer


@dataclass
class TrialResult:
    """Returns ``[maps, episodes]`` and, per map and episode, the tiles visited."""

    returns: np.ndarray
    trajectories: list[list[list[int]]] = field(default_factory=list)
    forward_calls: int = 0
    reencodes: int = 0


def draw_action(rng: np.random.Generator, greedy_prob: float, greedy) -> int:
    """The exploration rule of SPEC: with probability ``greedy_prob`` the greedy action, else a
    uniform one. Every agent draws in this order, so equal seeds give equal exploration."""
    if rng.random() < greedy_prob:
        return int(greedy())
    return int(rng.integers(4))


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer with spare capacity: appending writes in place (amortised O(new tokens))
    instead of ``DynamicLayer``'s copy of the whole cache on every call."""

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._k, self._v, self.length = keys[..., :0, :], values[..., :0, :], 0
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.assign(key_states[..., :0, :], value_states[..., :0, :])
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            cap = max(64, 2 * end)  # doubling: each column is copied O(1) times on average
            spare = cap - self.length
            self._k, self._v = (
                torch.cat([t[..., : self.length, :], t.new_zeros((*t.shape[:2], spare, t.shape[-1]))], dim=-2)
                for t in (self._k, self._v)
            )
        self._k[..., self.length:end, :] = key_states
        self._v[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values


def _new_cache() -> Cache:
    return Cache(layer_class_to_replicate=_GrowingLayer)


class _Context:
    """One map's token history: closed episodes plus the one being played, and the tokens not yet
    in the KV cache."""

    def __init__(self):
        self.episodes: list[list[int]] = [[]]
        self.length = 0
        self.pending: list[int] = []

    def __len__(self) -> int:
        return self.length

    def add(self, ids: list[int]) -> None:
        self.episodes[-1] += ids
        self.pending += ids
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
    """Plays maps with a causal LM whose action-token logits are Q-values.

    Args:
        model: a causal LM (``LlamaForCausalLM`` or peft-wrapped) with ``get_decoder()`` and
            ``get_output_embeddings()``.
        serializer: the format's token pieces.
        max_context: longest context in tokens (usually the trained sequence length).
        max_episode_steps: episode time limit (to refuse a window smaller than one episode).
    """

    def __init__(self, model, serializer: Serializer, max_context: int, max_episode_steps: int = 100):
        self.model, self.s = model, serializer
        self.max_context, self.max_episode_steps = max_context, max_episode_steps
        longest = self._longest_episode_tokens()
        if max_context < 2 * longest:
            raise ValueError(f"evaluation max_context={max_context} tokens (0 = data.seq_len) cannot hold one "
                             f"longest episode ({longest} tokens at {max_episode_steps} steps) plus the next: "
                             f"raise it to at least {2 * longest}")

    def _longest_episode_tokens(self) -> int:
        s, n = self.s, self.max_episode_steps
        step = max(len(s.after_action(a, o, 0.0, False, False)) for a in range(4) for o in (0, s.max_tiles - 1))
        return len(s.begin(s.max_tiles - 1)) + n * step + len(s.reward(1.0)) + len(s.ending(True))

    # --- model calls ----------------------------------------------------------------------------
    def _head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight[torch.as_tensor(self.s.action_token_ids)]

    def _decode(self, chunks: list[list[int]], cache: Cache, mask: torch.Tensor, positions: torch.Tensor):
        """Run ``chunks`` (right-padded) through the decoder after ``cache``; returns the Q-values at
        each row's last real token and the chunk's own mask."""
        dev = self._head().device
        width = max(1, max(len(c) for c in chunks))
        ids = torch.full((len(chunks), width), self.s.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = torch.as_tensor(c)
            new_mask[i, : len(c)] = 1
        pos = positions[:, None] + torch.arange(width)[None, :]
        out = self.model.get_decoder()(
            input_ids=ids.to(dev), attention_mask=torch.cat([mask, new_mask], dim=1).to(dev),
            position_ids=pos.to(dev), past_key_values=cache, use_cache=True)
        last = (torch.as_tensor([len(c) for c in chunks]) - 1).clamp(min=0)
        hidden = out.last_hidden_state[torch.arange(len(chunks)), last.to(dev)]
        return (hidden @ self._head().T).float().cpu(), new_mask

    @torch.no_grad()
    def _forward(self, chunks: list[list[int]], state: dict) -> torch.Tensor:
        """Append ``chunks[i]`` to row i of the batch cache; Q-values at each row's last new token."""
        q, new_mask = self._decode(chunks, state["cache"], state["mask"], state["positions"])
        state["mask"] = torch.cat([state["mask"], new_mask], dim=1)
        state["positions"] = state["positions"] + new_mask.sum(1)
        return q

    @torch.no_grad()
    def _reencode(self, rows: list[int], contexts: list[list[int]], state: dict) -> torch.Tensor:
        """Encode ``rows`` afresh from ``contexts`` (positions from 0) and write them over the first
        columns of their own cache rows, masking the rest of those rows. Only these rows are
        recomputed and the cache does not widen (but where a context is wider than the cache)."""
        n = len(rows)
        fresh = _new_cache()
        empty = torch.zeros((n, 0), dtype=torch.long)
        q, fresh_mask = self._decode(contexts, fresh, empty, torch.zeros(n, dtype=torch.long))
        width, cache = fresh_mask.shape[1], state["cache"]
        short = width - state["mask"].shape[1]
        if short > 0:
            for layer in cache.layers:
                k, v = layer.keys, layer.values
                layer.update(k.new_zeros((*k.shape[:2], short, k.shape[3])),
                             v.new_zeros((*v.shape[:2], short, v.shape[3])))
            state["mask"] = torch.cat([state["mask"], state["mask"].new_zeros((state["mask"].shape[0], short))], dim=1)
        idx = torch.as_tensor(rows)
        for layer, new in zip(cache.layers, fresh.layers, strict=True):
            layer.keys[idx.to(new.keys.device), :, :width] = new.keys
            layer.values[idx.to(new.keys.device), :, :width] = new.values
        state["mask"][idx] = 0
        state["mask"][idx, :width] = fresh_mask
        state["positions"][idx] = fresh_mask.sum(1)
        return q

    @staticmethod
    def _compact(state: dict) -> None:
        """Drop cache columns no row can see (masked), keeping each row's visible ones in order."""
        keep = state["mask"].bool()
        width = int(keep.sum(1).max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        for layer in state["cache"].layers:
            k, v = layer.keys, layer.values
            o = order.to(k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            layer.assign(k.gather(2, o), v.gather(2, o))
        state["mask"] = keep.gather(1, order).long()

    @staticmethod
    def _fresh_state(n: int) -> dict:
        return {"cache": _new_cache(), "mask": torch.zeros((n, 0), dtype=torch.long),
                "positions": torch.zeros(n, dtype=torch.long)}

    # --- the trial --------------------------------------------------------------------------------
    def play(
        self,
        maps: list[Map],
        schedule: list[float],
        seed: int,
        keep_context: bool = True,
        switch_to: list[Map] | None = None,
    ) -> TrialResult:
        """One trial per map, all in lock-step: ``len(schedule)`` episodes, episode ``k`` taking the
        greedy action with probability ``schedule[k]``. ``keep_context=False`` starts every episode
        from an empty context. ``switch_to`` (non-stationary scenario) replaces each map by another
        after ``len(schedule)`` episodes and plays the schedule again, context kept."""
        n_maps, n_eps = len(maps), len(schedule)
        phases = [maps] if switch_to is None else [maps, switch_to]
        total = n_eps * len(phases)
        rngs = [np.random.default_rng([seed, i]) for i in range(n_maps)]
        envs = [make_env(m, self.max_episode_steps) for m in maps]
        ctx = [_Context() for _ in range(n_maps)]
        returns = np.zeros((n_maps, total))
        trajs: list[list[list[int]]] = [[] for _ in range(n_maps)]
        episode = np.zeros(n_maps, dtype=int)
        ep_return = np.zeros(n_maps)
        active = np.ones(n_maps, dtype=bool)

        def start_episode(i: int) -> None:
            k = episode[i]
            if k % n_eps == 0 and k > 0:  # non-stationary switch: a new map, same context
                envs[i].close()
                envs[i] = make_env(phases[k // n_eps][i], self.max_episode_steps)
            o, _ = envs[i].reset(seed=int(rngs[i].integers(2**31)))
            ep_return[i] = 0.0
            trajs[i].append([int(o)])
            if not keep_context:
                ctx[i].clear()
                reset_cache_row(i)
            ctx[i].add(self.s.begin(int(o)))

        state = self._fresh_state(n_maps)

        def reset_cache_row(i: int) -> None:
            # An empty context for map i: hide its cached tokens and restart its positions.
            # RoPE scores depend only on position differences, so this equals a fresh context.
            state["mask"][i] = 0
            state["positions"][i] = 0

        for i in range(n_maps):
            start_episode(i)
        result = TrialResult(returns=returns, trajectories=trajs)
        while active.any():
            over = [i for i in np.flatnonzero(active) if len(ctx[i]) > self.max_context]
            for i in over:
                ctx[i].drop_oldest(self.max_context)  # the open episode fits by the check in __init__
            chunks = [c.pending if active[i] and i not in over else [] for i, c in enumerate(ctx)]
            for c in ctx:
                c.pending = []
            q = self._forward(chunks, state)
            if over:
                q[over] = self._reencode(over, [ctx[i].tokens() for i in over], state)
                result.reencodes += len(over)
            if state["mask"].shape[1] > 2 * self.max_context:
                self._compact(state)
            result.forward_calls += 1
            for i in np.flatnonzero(active):
                k = episode[i]
                a = draw_action(rngs[i], schedule[k % n_eps], lambda: q[i].argmax())
                o2, r, term, trunc, _ = envs[i].step(a)
                done = term or trunc
                ep_return[i] += r
                trajs[i][-1].append(int(o2))
                ctx[i].add(self.s.after_action(a, int(o2), float(r), done, bool(trunc and not term)))
                if done:
                    returns[i, k] = ep_return[i]
                    ctx[i].close_episode()
                    episode[i] += 1
                    if episode[i] == total:
                        active[i] = False
                    else:
                        start_episode(i)
        for e in envs:
            e.close()
        return result
