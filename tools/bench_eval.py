"""Benchmark of the in-context agent against the authors' way of evaluating.

Plays the paper protocol (50 held-out maps x 30 episodes, the paper's schedule, seed 1234, 100-step
limit, the trained ``seq_len`` as context window) on a checkpoint twice:

* **fast**: ``InContextAgent``, all maps in lock-step, KV cache, re-encoding a map only when its
  context must drop its oldest episodes, drafted steps checked several to a call
  (``--draft-budget``; 0: one step per call);
* **reference** (written here, independent of the agent): one map at a time, and before every
  action the whole context is encoded from scratch with a plain forward pass (no cache, no
  padding). It applies the same context-window policy: while the context is longer than the
  window, drop its oldest whole episode.

Both draw from the same per-map generators in the same order, so they must take identical
actions; the script fails (exit 1) on the first difference. It prints and writes (``--out``) wall
and CPU seconds, decisions, and the speed-up.

    OMP_NUM_THREADS=1 python tools/bench_eval.py runs/quickstart/version_0/checkpoints/last.ckpt
    # quick check: the reference on the first 3 maps only (the speed-up is then extrapolated)
    OMP_NUM_THREADS=1 python tools/bench_eval.py CKPT --ref-maps 3

With ``--ref-maps N`` < ``--maps`` the full-protocol reference time is *extrapolated* two ways,
which bracket it: by decisions (reference seconds per decision on the N maps x decisions of all
maps; low when the N maps' contexts are shorter than average, as the reference's cost grows with
the context) and by context tokens (seconds per encoded token x tokens the reference would encode
on all maps, from the fast run's actions and the window policy; high when the N maps' contexts are
shorter, as each call also has a fixed cost). The pass/fail check then uses the lower bound, and
the output says ``"reference_extrapolated": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from icrl_lightning.agent import InContextAgent, draw_action
from icrl_lightning.checkpoints import load_run
from icrl_lightning.checks import InputError
from icrl_lightning.envs.frozen_lake import make_env, paper_schedule


@torch.inference_mode()
def reference_play(network, serializer, maps, schedule, seed: int, max_steps: int, max_context: int):
    """The authors' evaluator: one map at a time, the full context re-encoded for every action.
    Returns (returns [maps, episodes], actions per map and episode, decisions)."""
    decoder = network.get_decoder()
    head = network.get_output_embeddings().weight[torch.as_tensor(serializer.action_token_ids)]
    device = head.device
    returns = np.zeros((len(maps), len(schedule)))
    actions: list[list[list[int]]] = []
    decisions = 0
    for i, rows in enumerate(maps):
        rng = np.random.default_rng([seed, i])
        env = make_env(rows, max_steps)
        episodes: list[list[int]] = []
        map_actions: list[list[int]] = []
        for k, p in enumerate(schedule):
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            episodes.append(list(serializer.begin(int(obs))))
            map_actions.append([])
            done, total = False, 0.0
            while not done:
                while sum(len(e) for e in episodes) > max_context:  # drop the oldest whole episode
                    episodes.pop(0)
                context = torch.tensor([[t for e in episodes for t in e]], device=device)
                hidden = decoder(input_ids=context, use_cache=False).last_hidden_state[0, -1]
                q = (hidden @ head.T).float()
                a = draw_action(rng, p, lambda: q.argmax())
                decisions += 1
                nxt, r, term, trunc, _ = env.step(a)
                done = term or trunc
                total += r
                map_actions[-1].append(a)
                episodes[-1] += serializer.after_action(a, int(nxt), float(r), done, bool(trunc and not term))
            if total <= 0:
                serializer.mark_failed(episodes[-1])  # outcome-tagged formats (a no-op otherwise)
            returns[i, k] = total
        env.close()
        actions.append(map_actions)
    return returns, actions, decisions


def decision_context_lengths(serializer, episodes_by_map, window: int) -> list[int]:
    """Per map, the summed context length (tokens) over all its decisions: what the reference
    encodes. Rebuilt from a run's episodes (``TrialResult.episodes``) with the same window policy."""
    out = []
    for played in episodes_by_map:
        episodes, total = [], 0
        for e in played:
            episodes.append(list(serializer.begin(e.observations[0])))
            n = len(e.actions)
            for t, a in enumerate(e.actions):
                while sum(len(x) for x in episodes) > window:
                    episodes.pop(0)
                total += sum(len(x) for x in episodes)
                done = t == n - 1
                episodes[-1] += serializer.after_action(a, e.observations[t + 1], e.rewards[t], done,
                                                        e.truncated and done)
        out.append(total)
    return out


def first_difference(fast: list[list[list[int]]], ref: list[list[list[int]]]) -> str | None:
    for i, (fm, rm) in enumerate(zip(fast, ref, strict=True)):
        for k, (fe, re_) in enumerate(zip(fm, rm, strict=True)):
            if fe != re_:
                t = next((t for t, (x, y) in enumerate(zip(fe, re_, strict=False)) if x != y), min(len(fe), len(re_)))
                return f"map {i}, episode {k}, step {t}: fast {fe[t:t + 5]} vs reference {re_[t:t + 5]}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--maps", type=int, default=50, help="evaluation maps of the fast run (paper: 50)")
    ap.add_argument("--ref-maps", type=int, default=None,
                    help="run the reference on the first N maps only (default: all --maps)")
    ap.add_argument("--eval-split", default="heldout", choices=("heldout", "ood"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--max-context", type=int, default=0, help="context window; 0 = the trained seq_len")
    ap.add_argument("--draft-budget", type=int, default=None,
                    help="the agent's draft_budget: most tokens (rows x width) of a call with drafted steps; "
                         "0 = one step per call (default: the agent's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or torch's)")
    ap.add_argument("--min-speedup", type=float, default=20.0, help="fail below this speed-up")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        # load_run hands the serializer over, which refuses maps bigger than the model's tokenizer writes
        module, data = load_run(args.checkpoint, eval_split=args.eval_split, eval_maps=args.maps)
        data.setup("validate")
        maps = data.eval_maps
        network, serializer = module.acting_network(), module.serializer
        window = args.max_context or module.hparams.seq_len
        schedule = paper_schedule()
        drafts = {} if args.draft_budget is None else {"draft_budget": args.draft_budget}
        agent = InContextAgent(network, serializer, window, args.max_steps, **drafts)
    except InputError as err:  # a missing or unreadable checkpoint, a too-small window: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(maps)} maps x {len(schedule)} episodes, window {window} tokens, {torch.get_num_threads()} thread(s)")

    wall, cpu = time.perf_counter(), time.process_time()
    fast = agent.play(maps, schedule, args.seed)
    fast_wall, fast_cpu = time.perf_counter() - wall, time.process_time() - cpu
    decisions = [sum(len(e.actions) for e in m) for m in fast.episodes]
    print(f"fast: {fast_wall:.1f} s wall, {fast_cpu:.1f} s CPU, {sum(decisions)} decisions, "
          f"{fast.forward_calls} calls, {fast.reencodes} re-encodings, {fast.drafts_kept} of {fast.drafted} "
          f"drafted steps kept")

    n_ref = min(args.ref_maps or len(maps), len(maps))
    wall, cpu = time.perf_counter(), time.process_time()
    ref_returns, ref_actions, ref_decisions = reference_play(network, serializer, maps[:n_ref], schedule, args.seed,
                                                             args.max_steps, window)
    ref_wall, ref_cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"reference ({n_ref} maps): {ref_wall:.1f} s wall, {ref_cpu:.1f} s CPU, {ref_decisions} decisions")

    diff = first_difference(fast.actions[:n_ref], ref_actions)
    same_returns = bool(np.array_equal(fast.returns[:n_ref], ref_returns))
    extrapolated = n_ref < len(maps)
    tokens = decision_context_lengths(serializer, fast.episodes, window)
    by_decisions = sum(decisions) / max(sum(decisions[:n_ref]), 1) if extrapolated else 1.0
    by_tokens = sum(tokens) / max(sum(tokens[:n_ref]), 1) if extrapolated else 1.0
    scale = min(by_decisions, by_tokens)
    result = {
        "checkpoint": args.checkpoint, "maps": len(maps), "episodes": len(schedule), "window": window,
        "seed": args.seed, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "fast": {"wall_s": fast_wall, "cpu_s": fast_cpu, "decisions": sum(decisions), "calls": fast.forward_calls,
                 "reencodes": fast.reencodes, "retags": fast.retags,
                 "draft_budget": agent.draft_budget, "drafted": fast.drafted, "drafts_kept": fast.drafts_kept,
                 "mean_return": float(fast.returns.mean()),
                 "last10": float(fast.returns[:, -10:].mean())},
        "reference": {"maps": n_ref, "wall_s": ref_wall, "cpu_s": ref_cpu, "decisions": ref_decisions,
                      "context_tokens": sum(tokens[:n_ref]), "mean_return": float(ref_returns.mean())},
        "all_maps_context_tokens": sum(tokens),
        "reference_extrapolated": extrapolated,
        "reference_full_wall_s": ref_wall * scale, "reference_full_cpu_s": ref_cpu * scale,
        "reference_full_wall_s_upper": ref_wall * max(by_decisions, by_tokens),
        "speedup_wall": ref_wall * scale / fast_wall, "speedup_cpu": ref_cpu * scale / fast_cpu,
        "speedup_wall_upper": ref_wall * max(by_decisions, by_tokens) / fast_wall,
        "identical_actions": diff is None, "identical_returns": same_returns, "first_difference": diff,
    }
    if extrapolated:
        print(f"reference on all {len(maps)} maps, extrapolated from {n_ref}: {ref_wall * by_decisions:.0f} s wall "
              f"by decisions (x{by_decisions:.1f}), {ref_wall * by_tokens:.0f} s by context tokens (x{by_tokens:.1f})")
        print(f"speed-up between {result['speedup_wall']:.1f}x and {result['speedup_wall_upper']:.1f}x wall")
    print(f"speed-up: {result['speedup_wall']:.1f}x wall, {result['speedup_cpu']:.1f}x CPU; "
          f"identical actions: {diff is None}" + (f" (first difference: {diff})" if diff else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    ok = diff is None and same_returns and result["speedup_wall"] >= args.min_speedup
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
