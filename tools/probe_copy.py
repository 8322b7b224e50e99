"""Does a checkpoint play what its context shows? A closed-loop probe for any problem family.

The greedy phase of the paper protocol can only use what the context shows, so an in-context
learner must at least play a rewarded episode its context holds. For each evaluation task this
probe puts one episode in the context, then plays ``--episodes`` fully greedy episodes (no
exploration noise) with the agent of the evaluation (``InContextAgent``), and reports the mean
return of each greedy episode and the share of them with any reward. Contexts:

  none      an empty context (the model's prior policy)
  oracle    one episode of the family's oracle (the best the task allows)
  random    one uniformly random episode that got some reward (Dark Key-to-Door: picked up the
            key), so the rewarded cell is shown by its reward only, as in the protocol's first
            episodes; tasks where no such episode turns up in ``--tries`` attempts get an empty one

The oracle's own return is printed for scale. Then, teacher-forced along the oracle's episode
itself (the context as above, the new episode always continuing on the oracle's path), the share of
steps where the model's greedy action is optimal, before the episode's first reward and after it;
on Dark Key-to-Door also the share of the steps before the key where the greedy action moves
towards the door (what an agent does that walks to where its context paid most, without the key).
Unlike ``tools/probe_exploitation.py`` (Frozen Lake, teacher-forced only), the closed-loop part
lets the model walk where its actions take it.

    python tools/probe_copy.py runs/key_to_door_quickstart/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from icrl_lightning import diagnostics
from icrl_lightning.agent import InContextAgent
from icrl_lightning.behaviour import play_episode
from icrl_lightning.checkpoints import load_run
from icrl_lightning.checks import exit_on_input_error
from icrl_lightning.envs.family import ProblemFamily, Task
from icrl_lightning.envs.key_to_door import DarkKeyToDoor
from icrl_lightning.episodes import Episode
from icrl_lightning.evaluation.scenarios import context_tokens

CONTEXTS = ("none", "oracle", "random")


def context_episodes(env: ProblemFamily, task: Task, rng: np.random.Generator, tries: int = 2000) -> dict:
    """The probe's context episodes of ``task``: ``{"none": [], "oracle": [one oracle episode],
    "random": [one rewarded uniformly random episode] or []}``."""
    game = env.make_env(task)
    best = env.oracle_actions(task)
    oracle = play_episode(game, lambda o: int(best[o]), rng, map_rows=tuple(task))
    random: list[Episode] = []
    for _ in range(tries):
        ep = play_episode(game, lambda o: int(rng.integers(env.n_actions)), rng, map_rows=tuple(task))
        if ep.ret > 0:
            random = [ep]
            break
    game.close()
    return {"none": [], "oracle": [oracle], "random": random}


def along_oracle(module, env: ProblemFamily, task: Task, context: list[list[int]], path: Episode) -> dict:
    """Teacher-forced along ``path`` (an oracle episode) after ``context`` (token ids of whole
    episodes, as the agent's prefill): per step, whether the greedy action is optimal, whether the
    path's first reward is still ahead, and (Dark Key-to-Door, steps without the key) whether the
    greedy action moves towards the door."""
    ids = [t for episode_ids in context for t in episode_ids]
    enc = module.serializer.encode(path)
    x = torch.tensor([ids + enc.ids.tolist()])
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, len(ids) + torch.as_tensor(enc.q_pos)] = True
    greedy = diagnostics.q_values(module, {"input_ids": x, "q_mask": mask}).argmax(-1).tolist()
    best = env.optimal_actions(task)
    # The first rewarded step (an oracle episode without reward, a bandit's unlucky pull: all "before").
    first = next((i for i, r in enumerate(path.rewards) if r > 0), len(path.rewards))
    out = {"optimal": [bool(best[o, a]) for o, a in zip(path.tiles, greedy, strict=True)],
           "before": [i <= first for i in range(len(greedy))], "towards_door": []}
    if isinstance(env, DarkKeyToDoor):
        cells = len(task) ** 2
        out["towards_door"] = [bool(best[cells + o, a]) for o, a in zip(path.tiles[:first + 1], greedy, strict=False)]
    return out


def probe(agent: InContextAgent, env: ProblemFamily, tasks: list[Task], episodes: int = 5, seed: int = 0,
          tries: int = 2000, module=None) -> dict:
    rng = np.random.default_rng(seed)
    ctx = [context_episodes(env, t, rng, tries) for t in tasks]
    out = {"oracle_return": float(np.mean([c["oracle"][0].ret for c in ctx])),
           "random_found": float(np.mean([bool(c["random"]) for c in ctx]))}
    for name in CONTEXTS:
        prefill = [context_tokens(agent.s, c[name]) for c in ctx]
        trial = agent.play(tasks, [1.0] * episodes, seed, prefill=prefill)
        rewarded = [ep.ret > 0 for m in trial.episodes for ep in m]
        out[name] = {"return_per_episode": trial.returns.mean(axis=0).round(3).tolist(),
                     "mean_return": float(trial.returns.mean()), "rewarded": float(np.mean(rewarded))}
        if module is not None:
            steps = [along_oracle(module, env, t, ids, c["oracle"][0])
                     for t, ids, c in zip(tasks, prefill, ctx, strict=True)]
            opt = np.concatenate([st["optimal"] for st in steps])
            before = np.concatenate([st["before"] for st in steps])
            door = [d for st in steps for d in st["towards_door"]]
            # None where no step comes after the first reward (Frozen Lake: the goal ends the episode).
            out[name].update(optimal_before=float(opt[before].mean()),
                             optimal_after=float(opt[~before].mean()) if (~before).any() else None,
                             towards_door_before=float(np.mean(door)) if door else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint of ICRLModule")
    parser.add_argument("--maps", type=int, default=50, help="evaluation tasks to probe (default 50)")
    parser.add_argument("--split", default="heldout", choices=("heldout", "ood"), help="evaluation split")
    parser.add_argument("--episodes", type=int, default=5, help="greedy episodes after the context (default 5)")
    parser.add_argument("--tries", type=int, default=2000,
                        help="random episodes tried per task for the 'random' context (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the context episodes and the resets")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    exit_on_input_error(run, args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    module, data = load_run(args.checkpoint, eval_split=args.split, eval_maps=args.maps)
    data.setup("validate")
    env, tasks = data.env, list(data.eval_maps)
    agent = InContextAgent(module.acting_network(), module.serializer, module.hparams.seq_len,
                           env.max_episode_steps, env=env)
    result = probe(agent, env, tasks, args.episodes, args.seed, args.tries, module=module)
    print(f"{len(tasks)} {args.split} tasks, oracle return {result['oracle_return']:.2f}, "
          f"a rewarded random episode found for {result['random_found']:.0%}")
    door = isinstance(env, DarkKeyToDoor)
    print(f"{'context':8s} {'mean return':>12s} {'rewarded':>9s} {'opt before':>11s} {'opt after':>10s}"
          + (f" {'to door':>8s}" if door else "") + "  return per greedy episode")
    for name in CONTEXTS:
        r = result[name]
        after = "-" if r["optimal_after"] is None else f"{r['optimal_after']:.2f}"
        print(f"{name:8s} {r['mean_return']:12.2f} {r['rewarded']:9.2f} {r['optimal_before']:11.2f} "
              f"{after:>10s}" + (f" {r['towards_door_before']:8.2f}" if door else "")
              + f"  {r['return_per_episode']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "result": result}, f, indent=2)


if __name__ == "__main__":
    main()
