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
from transformers import DynamicCache

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


class _Context:
    """One map's token history: closed episodes plus the one being played."""

    def __init__(self):
        self.episodes: list[list[int]] = [[]]
        self.cached = 0  # tokens already in the KV cache

    def __len__(self) -> int:
        return sum(len(e) for e in self.episodes)

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
            raise ValueError(f"max_context={max_context} tokens cannot hold one longest episode ({longest} tokens "
                             f"at {max_episode_steps} steps) plus the next: raise it to at least {2 * longest}")

    def _longest_episode_tokens(self) -> int:
        s, n = self.s, self.max_episode_steps
        step = max(len(s.after_action(a, o, 0.0, False, False)) for a in range(4) for o in (0, s.max_tiles - 1))
        return len(s.begin(s.max_tiles - 1)) + n * step + len(s.reward(1.0)) + len(s.ending(True))

    # --- model calls ----------------------------------------------------------------------------
    def _head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight[torch.as_tensor(self.s.action_token_ids)]

    @torch.no_grad()
    def _forward(self, chunks: list[list[int]], state: dict) -> torch.Tensor:
        """Append ``chunks[i]`` to map i's cache; Q-values at each map's last new token."""
        dev = self._head().device
        width = max(1, max(len(c) for c in chunks))
        ids = torch.full((len(chunks), width), self.s.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = torch.as_tensor(c)
            new_mask[i, : len(c)] = 1
        pos = state["positions"][:, None] + torch.arange(width)[None, :]
        mask = torch.cat([state["mask"], new_mask], dim=1)
        out = self.model.get_decoder()(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
            past_key_values=state["cache"], use_cache=True)
        state["mask"] = mask
        lengths = torch.as_tensor([len(c) for c in chunks])
        state["positions"] = state["positions"] + lengths
        last = (lengths - 1).clamp(min=0)
        hidden = out.last_hidden_state[torch.arange(len(chunks)), last.to(dev)]
        return (hidden @ self._head().T).float().cpu()

    @staticmethod
    def _fresh_state(n: int) -> dict:
        return {"cache": DynamicCache(), "mask": torch.zeros((n, 0), dtype=torch.long),
                "positions": torch.zeros(n, dtype=torch.long)}

    # --- the trial --------------------------------------------------------------------------------
    def play(
        self,
        maps: list[Map],
        schedule: list[float],
        seed: int,
        keep_context: bool = True,
        switch_to: list[Map] | None = None,
        record: bool = False,
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
        obs = np.zeros(n_maps, dtype=int)
        ep_return = np.zeros(n_maps)
        active = np.ones(n_maps, dtype=bool)

        def start_episode(i: int) -> None:
            k = episode[i]
            if k % n_eps == 0 and k > 0:  # non-stationary switch: a new map, same context
                envs[i].close()
                envs[i] = make_env(phases[k // n_eps][i], self.max_episode_steps)
            o, _ = envs[i].reset(seed=int(rngs[i].integers(2**31)))
            obs[i] = o
            ep_return[i] = 0.0
            trajs[i].append([int(o)])
            if not keep_context:
                ctx[i].episodes = [[]]
                ctx[i].cached = 0
                reset_cache_row(i)
            ctx[i].episodes[-1] += self.s.begin(int(o))

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
            if any(len(c) > self.max_context for c in ctx):
                for c in ctx:
                    while len(c) > self.max_context:
                        c.episodes.pop(0)  # the open episode fits by the check in __init__
                state = self._fresh_state(n_maps)
                for c in ctx:
                    c.cached = 0
                result.reencodes += 1
            chunks = []
            for i, c in enumerate(ctx):
                toks = c.tokens()
                chunks.append(toks[c.cached:] if active[i] else [])
                c.cached = len(toks)
            q = self._forward(chunks, state)
            result.forward_calls += 1
            for i in np.flatnonzero(active):
                k = episode[i]
                a = draw_action(rngs[i], schedule[k % n_eps], lambda: q[i].argmax())
                o2, r, term, trunc, _ = envs[i].step(a)
                done = term or trunc
                ep_return[i] += r
                trajs[i][-1].append(int(o2))
                ctx[i].episodes[-1] += self.s.after_action(a, int(o2), float(r), done, bool(trunc and not term))
                if done:
                    returns[i, k] = ep_return[i]
                    ctx[i].episodes.append([])
                    episode[i] += 1
                    if episode[i] == total:
                        active[i] = False
                    else:
                        start_episode(i)
        for e in envs:
            e.close()
        return result
