"""Training throughput of ``fit`` against a bare PyTorch loop, and the packing efficiency of the
replay stream.

* ``fit``: the real ``Trainer`` + ``ICRLModule`` + ``ReplayDataModule`` built by the command line
  from an experiment config (default: the quickstart), as ``python -m icrl_lightning fit`` builds
  them, with the in-context evaluation switched off (it is not training) and the logs in a
  temporary folder.
* ``bare``: a plain PyTorch loop written here: the same model (built from the same config and
  seed), the same batches (the same replay stream, the same DataLoader), the same optimizer and
  schedule, the same online + target forward, the same objective (double-DQN loss with the
  config's ``model.td`` settings, conflict weights, ``model.cql`` penalty and ``model.teacher``
  margin) and Polyak update,
  at the trainer's precision (bf16 autocast where it is ``bf16-mixed``) and with the decoder
  compiled where the config's ``model.compile`` resolves to it, as ``fit`` does.
* ``--cli MODULE`` builds both through an experimental command (``icrl_lightning.experimental``;
  a sweep setting's ``cli``): ``fit`` then runs that module's objective and data, the bare loop the
  core objective on the same batches. Comparing ``fit`` with and without it gives the module's cost.

Each measurement runs in its own process (peak memory is per process) and the two are interleaved
(fit, bare, fit, bare, ...) with the same thread count, so that load from other work on the machine
hits both alike. A measurement's throughput is tokens per optimizer step over its median step time
(step = end of one optimizer step to the end of the next: data, forward, backward, optimizer, Polyak
update and, for fit, everything Lightning does between steps); the ratio compares the medians over
the repeats. Tokens are padded sequence tokens processed (``accumulate x batch x seq_len`` per
step); the packing efficiency (non-pad share) converts them to episode tokens.

    python tools/bench_train.py                      # quickstart model, 3 x (fit, bare), 1 thread
    python tools/bench_train.py --steps 20 --repeats 5 --threads 2 --out bench_train.json
    python tools/bench_train.py --fit-args="--model.compile false"   # the quickstart without compile
    python tools/bench_train.py --fit-args="--model.teacher null"   # the quickstart without its teacher (Q7)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(config: str, tmp: str, data_dir: str, max_steps: int, fit_args: str = "", command: str | None = None):
    """Model, data module and trainer exactly as ``fit -c config`` builds them (not run), through
    ``icrl_lightning.cli.main`` or, with ``command``, that module's ``main`` (a sweep setting's
    ``cli``)."""
    import importlib

    main = importlib.import_module(command or "icrl_lightning.cli").main
    return main(run=False, args=[
        "-c", config,
        "--trainer.max_steps", str(max_steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", tmp,
        "--trainer.logger.init_args.save_dir", tmp,
        "--data.data_dir", data_dir,
        *shlex.split(fit_args),
    ])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_fit(args) -> dict:
    import lightning as L

    with tempfile.TemporaryDirectory() as tmp:
        cli = _cli(args.config, tmp, args.data_dir, args.warmup + args.steps, args.fit_args, args.cli)
        marks: list[float] = []

        class Clock(L.Callback):
            """The time at the end of every optimizer step (the last batch of its accumulation)."""

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                    marks.append(time.perf_counter())

        cli.trainer.callbacks.append(Clock())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        h = cli.datamodule.hparams
        tokens_per_step = cli.trainer.accumulate_grad_batches * h.batch_size * h.seq_len
    return _result("fit", marks, args.warmup, tokens_per_step)


def _result(impl: str, marks: list[float], warmup: int, tokens_per_step: int) -> dict:
    """Step times from the optimizer-step marks after the warm-up steps."""
    times = [b - a for a, b in zip(marks[warmup - 1:], marks[warmup:], strict=False)]
    return {"impl": impl, "step_times": times, "tokens_per_step": tokens_per_step, "peak_rss_mb": _peak_rss_mb()}


def worker_bare(args) -> dict:
    import torch
    from torch.func import functional_call
    from torch.utils.data import DataLoader

    from icrl_lightning.checks import InputError
    from icrl_lightning.qlearning import (
        action_q_values,
        bellman_loss,
        conservative_penalty,
        double_dqn_targets,
        margin_loss,
        next_step,
        polyak_,
        position_weights,
        successful_episode,
    )

    with tempfile.TemporaryDirectory() as tmp:
        cli = _cli(args.config, tmp, args.data_dir, args.warmup + args.steps, args.fit_args, args.cli)
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer  # the CLI handed the serializer over
    module.trainer = trainer  # so that model.compile resolves as in fit
    h, hd = module.hparams, dm.hparams
    if h.q_head != "tokens":
        raise InputError(f"model.q_head={h.q_head!r}: the bare loop reads Q from the output embeddings "
                         "(model.q_head: tokens) only")
    td, cql, teacher = module.td, module.cql, module.teacher
    accumulate = trainer.accumulate_grad_batches
    n_steps = args.warmup + args.steps

    # The network: the module's transformer, trained as plain PyTorch.
    model = module.model
    model.train()
    decoder, head = model.get_decoder(), model.get_output_embeddings().weight
    # model.compile as fit resolves it: the same torch.compile of the decoder (online and target).
    run = torch.compile(decoder) if module.resolve_compile() else decoder
    action_ids = torch.as_tensor(module.serializer.action_token_ids)
    online = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    target = [p.detach().clone() for _, p in online]
    by_id = {id(p): t for (_, p), t in zip(online, target, strict=True)}
    target_decoder = {n: by_id[id(p)] for n, p in decoder.named_parameters() if id(p) in by_id}
    target_head = by_id.get(id(head), head)
    params = [p for _, p in online]
    opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
    warm = max(1, h.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))

    # The data: the same stream the data module gives fit (with the batch fields the objective reads).
    dm.prepare_data()
    stream = dm.train_stream(n_steps * accumulate * hd.batch_size)
    loader = DataLoader(stream, batch_size=hd.batch_size, num_workers=hd.num_workers)

    def q_values(input_ids, q_mask, use_target: bool):
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if use_target:
            model.eval()
            hidden = functional_call(run, target_decoder, (), kwargs, strict=False).last_hidden_state
            model.train()
            rows = target_head[action_ids]
        else:
            hidden = run(**kwargs).last_hidden_state
            rows = head[action_ids]
        return action_q_values(hidden[q_mask], rows)

    # The trainer's precision, as fit runs it: bf16-mixed is bf16 autocast around the forward passes.
    bf16 = str(trainer.precision) == "bf16-mixed"

    marks: list[float] = []
    for i, batch in enumerate(loader):
        q_mask = batch["q_mask"]
        with torch.autocast(trainer.strategy.root_device.type, dtype=torch.bfloat16, enabled=bf16):
            q = q_values(batch["input_ids"], q_mask, False)
            with torch.no_grad():
                q_target = q_values(batch["input_ids"], q_mask, True)
        action, reward, done = batch["action"][q_mask], batch["reward"][q_mask], batch["done"][q_mask]
        q_taken = q.gather(1, action[:, None]).squeeze(1)
        y = double_dqn_targets(reward, done, next_step(q.detach()), next_step(q_target), td.gamma, td.reward_scale)
        weight = position_weights(batch["conflict"][q_mask], td.conflict_weight) if td.conflict_weight != 1 else None
        loss = bellman_loss(q_taken, y, td.loss, q_mask.nonzero()[:, 0], weight)
        if cql is not None:
            where = successful_episode(reward, done) if cql.episodes == "successful" else None
            loss = loss + cql.weight * conservative_penalty(q, action, where, weight)
        if teacher is not None:
            loss = loss + teacher.weight * margin_loss(q, batch["teacher"][q_mask], teacher.margin * td.reward_scale)[0]
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            polyak_(target, params, module.target.alpha)
            marks.append(time.perf_counter())
    return _result("bare", marks, args.warmup, accumulate * hd.batch_size * hd.seq_len)


def packing(args) -> dict:
    """Non-pad share of the replay stream's sequences for the config."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = _cli(args.config, tmp, args.data_dir, 1)
    dm = cli.datamodule  # the CLI handed the serializer over
    dm.prepare_data()
    items = list(dm.train_stream(args.packing_sequences))
    used = sum(int(it["n_tokens"]) for it in items)
    return {"sequences": len(items), "seq_len": dm.hparams.seq_len,
            "packing_efficiency": used / (len(items) * dm.hparams.seq_len)}


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    from icrl_lightning.checks import exit_on_input_error

    exit_on_input_error(run)


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "conf/experiment/quickstart.yaml"), help="experiment config")
    p.add_argument("--data-dir", default=str(REPO / "data"), help="data.data_dir (the dataset is built if absent)")
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before the clock starts")
    p.add_argument("--repeats", type=int, default=3, help="(fit, bare) pairs, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measurement process")
    p.add_argument("--packing-sequences", type=int, default=2400, help="sequences drawn for the packing measure")
    p.add_argument("--fit-args", default="", help="extra fit options for both measurements, one string, "
                   "e.g. --fit-args=\"--model.compile false\" (the bare loop compiles its decoder where the "
                   "config's model.compile resolves to it, as fit does)")
    p.add_argument("--cli", default=None, help="build both measurements through this module's command instead "
                   "of the core's (a module with main, as a sweep setting's cli key; its "
                   "options go in --fit-args): fit runs the module's "
                   "objective, the bare loop the core objective on the module's batches, so fit over bare then "
                   "includes the module's extra loss")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--worker", choices=["fit", "bare"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the first timed step starts at the end of a warm-up step)")

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = worker_fit(args) if args.worker == "fit" else worker_bare(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, __file__, "--config", args.config, "--data-dir", args.data_dir, "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
            f"--fit-args={args.fit_args}", *(["--cli", args.cli] if args.cli else [])]
    results: dict = {"config": args.config, "fit_args": args.fit_args, "cli": args.cli, "steps": args.steps,
                     "warmup": args.warmup, "threads": args.threads,
                     "load_before": _load(), "runs": []}
    print(results["load_before"], flush=True)
    results["packing"] = packing(args)
    print(f"packing efficiency {results['packing']['packing_efficiency']:.4f} "
          f"({results['packing']['sequences']} sequences of {results['packing']['seq_len']} tokens)", flush=True)
    for r in range(args.repeats):
        for impl in ("fit", "bare"):
            out = subprocess.run([*base, "--worker", impl], env=env, capture_output=True, text=True, cwd=REPO)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.exit(f"{impl} worker failed:\n{out.stderr[-4000:]}")
            run = json.loads(lines[-1][len("RESULT "):])
            times = run["step_times"]
            run["tokens_per_s"] = run["tokens_per_step"] / statistics.median(times)  # robust to load spikes
            run["tokens_per_s_mean"] = run["tokens_per_step"] * len(times) / sum(times)
            run["load"] = _load()
            results["runs"].append(run)
            print(f"[{r + 1}/{args.repeats}] {impl:4s} {run['tokens_per_s']:7.0f} tokens/s (median step), "
                  f"{run['tokens_per_s_mean']:7.0f} (mean)  peak RSS {run['peak_rss_mb']:.0f} MB  | {run['load']}",
                  flush=True)
    summary = {}
    for impl in ("fit", "bare"):
        runs = [x for x in results["runs"] if x["impl"] == impl]
        summary[impl] = {"tokens_per_s_median": statistics.median(x["tokens_per_s"] for x in runs),
                         "tokens_per_s_mean_median": statistics.median(x["tokens_per_s_mean"] for x in runs),
                         "tokens_per_s_all": [round(x["tokens_per_s"]) for x in runs],
                         "peak_rss_mb_max": max(x["peak_rss_mb"] for x in runs)}
    pairs = [f["tokens_per_s"] / b["tokens_per_s"] for f, b in zip(results["runs"][::2], results["runs"][1::2],
                                                                   strict=True)]
    summary["ratio_fit_over_bare"] = summary["fit"]["tokens_per_s_median"] / summary["bare"]["tokens_per_s_median"]
    summary["ratio_fit_over_bare_mean_based"] = (summary["fit"]["tokens_per_s_mean_median"]
                                                 / summary["bare"]["tokens_per_s_mean_median"])
    summary["ratio_per_pair"] = [round(x, 3) for x in pairs]
    summary["episode_tokens_per_s_fit"] = (summary["fit"]["tokens_per_s_median"]
                                           * results["packing"]["packing_efficiency"])
    results["summary"] = summary
    results["load_after"] = _load()
    print(json.dumps(summary, indent=2))
    print(results["load_after"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
