"""One prepared GPU check of the paper-scale path (issue 17): step time, memory and MFU of the 8B shape,
FSDP / DeepSpeed fits, the SmolLM2 shape, a CUDA smoke test of the CLI, and (on request) the
pretrained-vs-random SmolLM2 claim; one JSON and one log in OUT_DIR. docs/gpu_check.md has the formulas,
the one command for a GPU machine and how the missing wheels and the SmolLM2 GGUF travel.

    python tools/gpu_check.py OUT_DIR                 # every default part on the GPU, <= --budget-s seconds
    python tools/gpu_check.py OUT_DIR --smoke         # the same code paths on the CPU, every shape shrunk
    python tools/gpu_check.py OUT_DIR --parts llama8b_step,smollm2_shape
    python tools/gpu_check.py OUT_DIR --parts all,pretrained_claim --claim-steps 200 --gguf-parts A,B
    python tools/gpu_check.py --pack .                # here, before a GPU call: wheels + GGUF halves

Parts (run in this order; ``all`` = the first five):

* ``llama8b_step``: ICRLModule around a Llama 3.1 8B-shaped CausalLM (random bf16 weights made on the GPU,
  IA3 online ``default`` + target ``delayed``, SDPA, non-reentrant gradient checkpointing), synthetic
  5 x 4,096-token micro-batches; one step = ``training_step`` + backward + ``optimizer_step`` (AdamW +
  Polyak) under bf16 autocast, as Lightning's bf16-mixed runs it. Then the same without checkpointing.
* ``smollm2_shape``: the same step on a SmolLM2-135M-shaped Llama (config below, random init).
* ``cuda_smoke``: ``fit`` then ``validate --ckpt_path`` of the quickstart model through the CLI on CUDA.
* ``fsdp_fit`` / ``deepspeed_fit``: ``fit`` of the 8B shape with ``conf/trainer/fsdp.yaml`` /
  ``deepspeed.yaml`` on one device, 3 optimizer steps, checkpoint checked.
* ``pretrained_claim`` (only when asked): SmolLM2-135M-Instruct (GGUF) + IA3 with the paper's recipe,
  then the 50-map protocol, beside the same shape from random init trained the same way.

A supervisor (this process, standard library only) runs the parts in worker processes (one per part on
a GPU, so that every part starts with an empty device; all in one with ``--smoke``), kills a worker that
outlives the budget, records every part's numbers or its exact error and rewrites the JSON after every part.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
THIS = Path(__file__).resolve()

DEFAULT_PARTS = ("llama8b_step", "smollm2_shape", "cuda_smoke", "fsdp_fit", "deepspeed_fit")
ALL_PARTS = (*DEFAULT_PARTS, "pretrained_claim")
STATUSES = ("ok", "error", "oom", "timeout", "skipped", "not_installed", "refused")

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets; first substring of
# torch.cuda.get_device_name() that matches wins (so the NVL / PCIe parts come before the SXM names).
PEAK_BF16_DENSE = (
    ("H200 NVL", 835e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("GH200", 989e12),
    ("H200", 989e12),  # H200 SXM: "NVIDIA H200"
    ("H100", 989e12),  # H100 SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),  # A10 / A10G
)
PEAK_SOURCE = "NVIDIA datasheets, dense bf16 tensor-core peak (half the 'with sparsity' figure)"

# SmolLM2-135M(-Instruct), HuggingFaceTB's config.json (LlamaForCausalLM), as published on the hub and quoted
# by public code (e.g. a LlamaConfig print of HuggingFaceTB/SmolLM2-135M: hidden 576, 30 layers, 9 heads,
# 3 KV heads, head_dim 64, intermediate 1536, vocab 49152, tied embeddings, rope_theta 100000, rms eps 1e-5;
# 106,203,456 non-embedding parameters). Max positions: 8192 for the Instruct model (docs/results.md, from
# its GGUF); an older base-model revision says 2048; it does not change the compute at 4,096 tokens.
# With the GGUF at hand, smollm2_shape and pretrained_claim compare these fields with its metadata.
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.041666666666666664,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
SMOLLM2_SOURCE = ("HuggingFaceTB/SmolLM2-135M-Instruct config.json (hub), as quoted by public code; "
                  "checked against the GGUF metadata when the file is present (config_check)")
SMOLLM2_CHECK_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta",
                      "max_position_embeddings", "rms_norm_eps")
GGUF_DEFAULT = REPO / "data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TOKENIZERS = (REPO / "data/models/llama3-tokenizer/tokenizer.json",
                     REPO / "data/models/llama31-8b-config/tokenizer.json")

FORMULA = {
    "mfu": "model_flops_per_token * tokens_per_s / peak_bf16_dense_flops",
    "model_flops_per_token": "4*N + 6*L*T*d",
    "N": "parameters of the decoder layers (base weights; embeddings and the LM head excluded: Q reads only "
         "the four action rows of the head)",
    "4*N": "online forward (2N) plus activation gradients (2N); the frozen base needs no weight gradients",
    "6*L*T*d": "causal attention: per layer per token 2*T*d forward (QK^T and AV over on average T/2 keys, "
               "2 FLOPs per multiply-add), times 3 for forward plus backward; L layers, T tokens per sequence, "
               "d = num_attention_heads * head_dim",
    "not_counted": "recomputation under gradient checkpointing; IA3 scaling, norms, softmax, the optimizer; "
                   "the target network's forward (counted in mfu_incl_target_forward only)",
    "mfu_incl_target_forward": "(6*N + 8*L*T*d) * tokens_per_s / peak: adds the target network's forward "
                               "(2N + 2*L*T*d), which training_step also runs on every micro-batch",
    "tokens_per_s": "tokens per step (batch x seq_len, every position counted) / median step time",
    "peak": PEAK_SOURCE,
}

# Shapes per mode. smoke: every shape shrunk so that the whole run takes well under a minute on 2 CPU cores.
SHAPES = {
    "gpu": {"batch": 5, "seq_len": 4096, "warmup": 2, "steps": 5, "cli_steps": 3, "smoke_steps": 20,
            "eval_maps": 5, "dtype": {"llama": "bfloat16", "smollm2": "bfloat16"}, "llama": {}, "smollm2": {}},
    "smoke": {"batch": 2, "seq_len": 128, "warmup": 1, "steps": 2, "cli_steps": 2, "smoke_steps": 2,
              "eval_maps": 2, "dtype": {"llama": "bfloat16", "smollm2": "bfloat16"},
              "llama": {"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 1},
              "smollm2": {"hidden_size": 48, "head_dim": 16, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 3, "num_key_value_heads": 1}},
}
# CLI arguments that shrink the data and the evaluation in smoke mode (the keys of `fit --help`).
SMOKE_DATA = ["--data.num_train_maps", "4", "--data.episodes_per_map", "10", "--data.eval_maps", "2",
              "--data.seq_len", "512", "--data.batch_size", "2", "--data.num_workers", "0",
              "--data.env.max_episode_steps", "20", "--model.evaluation.max_episode_steps", "20",
              "--model.evaluation.schedule", "[0.0, 0.5, 1.0, 1.0]", "--model.evaluation.last_k", "2",
              "--model.evaluation.no_context", "false"]
SMOKE_BACKBONE = ["--model.backbone.hidden_size", "32", "--model.backbone.num_layers", "1",
                  "--model.backbone.num_heads", "2", "--model.backbone.intermediate_size", "64",
                  "--model.backbone.max_position_embeddings", "512"]
# GPU: the CUDA smoke test and the 8B fits need only a few dozen sequences: 20 training maps x 100 episodes
# (one small dataset, shared), not the paper's 250 x 200 (pretrained_claim keeps those).
GPU_CLI_DATA = ["--data.num_train_maps", "20", "--data.episodes_per_map", "100"]
EXPECTED_FSDP_WRAP_ERROR = "uniform dtype"  # FSDP1 flat parameters: bf16 base + float32 IA3 in one unit


# --- the FLOP formula (pure functions, unit-tested) ------------------------------------------------------
def model_flops_per_token(n_params: int, n_layers: int, seq_len: int, width: int,
                          target_forward: bool = False) -> float:
    """FORMULA's model FLOPs per token: ``4 N + 6 L T d`` (online forward + activation gradients, causal
    attention forward + backward); with ``target_forward`` also the target network's forward ``2 N + 2 L T d``."""
    dense = 4 * n_params
    attention = 3 * 2 * seq_len * width * n_layers
    if target_forward:
        dense += 2 * n_params
        attention += 2 * seq_len * width * n_layers
    return float(dense + attention)


def peak_bf16(device_name: str | None, override: float | None = None) -> dict:
    """The dense bf16 peak used for MFU: ``{"flops", "matched", "source"}`` (flops None when unknown)."""
    if override:
        return {"flops": float(override), "matched": "--peak-flops", "source": "command line"}
    for key, flops in PEAK_BF16_DENSE:
        if device_name and key.lower() in device_name.lower():
            return {"flops": flops, "matched": key, "source": PEAK_SOURCE}
    return {"flops": None, "matched": None, "source": f"no entry for {device_name!r} (give --peak-flops)"}


def throughput(step_times: list[float], tokens_per_step: int, flops_per_token: float | None,
               peak: float | None, flops_with_target: float | None = None) -> dict:
    """Median step time, tokens/s, achieved model FLOP/s and MFU from measured step times."""
    median = statistics.median(step_times)
    tps = tokens_per_step / median
    out = {"step_times_s": [round(t, 6) for t in step_times], "median_step_s": median,
           "tokens_per_step": tokens_per_step, "tokens_per_s": tps}
    if flops_per_token is not None:
        out["model_flops_per_token"] = flops_per_token
        out["model_flops_per_s"] = flops_per_token * tps
        out["mfu"] = flops_per_token * tps / peak if peak else None
    if flops_with_target is not None:
        out["model_flops_per_token_incl_target"] = flops_with_target
        out["mfu_incl_target_forward"] = flops_with_target * tps / peak if peak else None
    return out


def attention_width(config: dict) -> int:
    heads = config["num_attention_heads"]
    return heads * (config.get("head_dim") or config["hidden_size"] // heads)


def fsdp_retry_wanted(error_text: str) -> bool:
    """FSDP1 refuses to flatten a bf16 base and float32 adapters into one unit: retry with a float32 base."""
    return EXPECTED_FSDP_WRAP_ERROR in error_text


# --- GGUF halves -------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(path: Path, targets: list[Path]) -> list[Path]:
    """Cut ``path`` into ``len(targets)`` consecutive parts of (nearly) equal size."""
    size = path.stat().st_size
    chunk = math.ceil(size / len(targets))
    with path.open("rb") as src:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as dst:
                left = chunk
                while left > 0 and (block := src.read(min(left, 1 << 20))):
                    dst.write(block)
                    left -= len(block)
    return targets


def join_parts(parts: list[Path], target: Path, expected_sha256: str | None) -> dict:
    """Concatenate ``parts`` into ``target`` and check its sha256; a wrong file is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as dst:
        for p in parts:
            with Path(p).open("rb") as src:
                while block := src.read(1 << 20):
                    dst.write(block)
    got = sha256_file(partial)
    ok = expected_sha256 is None or got == expected_sha256
    if ok:
        partial.replace(target)
    else:
        partial.unlink()
    return {"parts": [str(p) for p in parts], "target": str(target), "bytes": target.stat().st_size if ok else None,
            "sha256": got, "expected_sha256": expected_sha256, "ok": ok}


def smollm2_sha256() -> str | None:
    """The pinned sha256 of the SmolLM2 GGUF (tools/fetch_models.py)."""
    sys.path.insert(0, str(THIS.parent))
    try:
        import fetch_models

        return fetch_models.SMOLLM2.sha256
    except Exception:  # noqa: BLE001 - a missing helper only loses the check
        return None


# --- small helpers -----------------------------------------------------------------------------------
def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, doc) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str, allow_nan=True) + "\n")
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def error_record(exc: BaseException, tail: int = 20) -> dict:
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    return {"type": type(exc).__name__, "message": str(exc)[:4000], "traceback_tail": lines[-tail:]}


def is_oom(exc: BaseException | None, text: str = "") -> bool:
    name = type(exc).__name__ if exc is not None else ""
    return "OutOfMemory" in name or "out of memory" in (str(exc) if exc else "").lower() \
        or "CUDA out of memory" in text


def file_tail(path: Path, n: int = 40) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").rstrip().splitlines()[-n:]
    except OSError:
        return []


def gib(n_bytes) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


# --- the worker side (imports torch, transformers, the package) ------------------------------------------
class Ctx:
    """What a part needs: the mode's shapes, folders, device, budget."""

    def __init__(self, args):
        import torch

        self.args, self.smoke = args, args.smoke
        self.shape = dict(SHAPES["smoke" if args.smoke else "gpu"])
        if args.steps:
            self.shape["steps"] = args.steps
        if args.warmup is not None:
            self.shape["warmup"] = args.warmup
        self.out = Path(args.out).resolve()
        self.work = Path(args.work_dir).resolve() if args.work_dir else self.out / "work"
        self.results = self.work / "results"
        self.data_dir = self.work / "data"
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.t0, self.budget = args.t0 or time.time(), args.budget_s
        self.device_name = torch.cuda.get_device_name(0) if self.device.type == "cuda" else None
        self.peak = peak_bf16(self.device_name, args.peak_flops)
        self.part: str | None = None

    def remaining(self) -> float:
        return self.budget - (time.time() - self.t0)

    def partial(self, doc: dict) -> None:
        """The part's numbers so far: kept by the supervisor if the worker is killed."""
        write_json(self.results / f"{self.part}.partial.json", doc)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def environment(ctx: Ctx) -> dict:
    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "packages": {n: version(n) for n in ("torch", "transformers", "peft", "lightning", "jsonargparse",
                                                "omegaconf", "gymnasium", "gguf", "deepspeed", "tokenizers",
                                                "safetensors", "numpy")},
           "torch_cuda_version": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "device": str(ctx.device), "peak_bf16": ctx.peak}
    try:
        env["cudnn_version"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        env["cudnn_version"] = None
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_name=p.name, gpu_memory_gib=p.total_memory / 2**30, gpu_capability=f"{p.major}.{p.minor}",
                   gpu_multiprocessors=p.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported(),
                   flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
                   mem_efficient_sdp_enabled=torch.backends.cuda.mem_efficient_sdp_enabled())
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    else:
        env["bf16_supported"] = None
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=20)
        env["git"] = {"commit": head.stdout.strip() or None, "dirty_files": len(dirty.stdout.splitlines())}
    env["matmul_bf16"] = matmul_rate(ctx)
    return env


def matmul_rate(ctx: Ctx) -> dict:
    """A measured bf16 matrix-product rate on this device (the attainable ceiling beside the datasheet peak)."""
    import torch

    n, reps = (8192, 10) if ctx.device.type == "cuda" else (256, 3)
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    ctx.sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    ctx.sync()
    dt = (time.perf_counter() - t) / reps
    return {"n": n, "reps": reps, "seconds_per_product": dt, "tflops": 2 * n**3 / dt / 1e12}


def count_decoder_params(config: dict) -> int:
    """N: parameters of the decoder layers of ``config`` (a Llama), counted on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return sum(p.numel() for p in model.model.layers.parameters())


def tokenizer_file(ctx: Ctx, fmt: str) -> tuple[str, str]:
    """(a tokenizer.json for ``fmt``, what it is): the Llama 3 tokenizer when fetched, else a word-level
    tokenizer of the format's specials (token ids do not change the compute)."""
    if fmt == "llama3" and ctx.args.tokenizer == "auto":
        for path in LLAMA3_TOKENIZERS:
            if path.is_file():
                return str(path), f"Llama 3 tokenizer.json ({path.relative_to(REPO)})"
    from icrl_lightning.backbones import build_tokenizer

    path = ctx.work / "tokenizers" / f"{fmt}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        build_tokenizer(fmt).backend_tokenizer.save(str(path))
    return str(path), f"word-level {fmt} tokenizer (icrl_lightning.backbones.build_tokenizer)"


def model_folder(ctx: Ctx, name: str, config: dict) -> Path:
    folder = ctx.work / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def llama8b_config(ctx: Ctx) -> dict:
    from icrl_lightning.backbones import llama31_8b_config

    return {**llama31_8b_config(), **ctx.shape["llama"]}


def smollm2_config(ctx: Ctx) -> dict:
    return {**SMOLLM2_135M, **ctx.shape["smollm2"]}


def synthetic_batch(batch: int, seq_len: int, vocab: int, every: int, device, seed: int = 0) -> dict:
    """Token ids drawn from the vocabulary, an action position every ``every`` tokens (one environment step
    of the format), episodes of 4..30 actions, reward 1.0 at a third of the episode ends (sparse); the last
    action of every sequence closes an episode, as the packed replay stream guarantees."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    positions = torch.arange(every - 1, seq_len, every)
    q_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    q_mask[:, positions] = True
    action = torch.zeros(batch, seq_len, dtype=torch.long)
    action[:, positions] = torch.randint(0, 4, (batch, len(positions)), generator=g)
    done = torch.zeros(batch, seq_len, dtype=torch.bool)
    reward = torch.zeros(batch, seq_len)
    for b in range(batch):
        k = 0
        while k < len(positions):
            k = min(k + int(torch.randint(4, 31, (1,), generator=g)), len(positions))
            pos = positions[k - 1]
            done[b, pos] = True
            if torch.rand(1, generator=g).item() < 1 / 3:
                reward[b, pos] = 1.0
    out = {"input_ids": input_ids, "q_mask": q_mask, "action": action, "reward": reward, "done": done,
           "n_tokens": torch.full((batch,), seq_len)}
    return {k: v.to(device) for k, v in out.items()}


def set_checkpointing(model, on: bool) -> bool | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    else:
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()
    # What the layers will do (transformers sets ``gradient_checkpointing`` on each module that recomputes).
    return any(getattr(m, "gradient_checkpointing", False) for m in base.modules())


def reset_peak(ctx: Ctx) -> None:
    import torch

    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def memory(ctx: Ctx) -> dict:
    import resource

    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if ctx.device.type == "cuda":
        out.update(peak_allocated_gib=gib(torch.cuda.max_memory_allocated()),
                   peak_reserved_gib=gib(torch.cuda.max_memory_reserved()),
                   allocated_now_gib=gib(torch.cuda.memory_allocated()))
        # An 80 GB card (H100 80GB, A100 80GB) has about 79 GiB that the allocator can take.
        out["fits_80gb_card"] = out["peak_reserved_gib"] < 79.0
    return out


def build_step_module(ctx: Ctx, name: str, config: dict, fmt: str, checkpointing: bool, dtype: str = "bfloat16"):
    """An ICRLModule around a CausalLM with random weights made on ``ctx.device`` (CausalLM builds with
    ``from_config``, which follows torch's default device): IA3 on k_proj, v_proj, down_proj (feed-forward),
    adapters ``default`` (online) and ``delayed`` (target), SDPA, bf16 base, the paper's objective."""
    import torch

    from icrl_lightning.backbones import CausalLM
    from icrl_lightning.module import ICRLModule
    from icrl_lightning.objective import TD, Target

    folder = model_folder(ctx, name, config)
    tok, tok_kind = tokenizer_file(ctx, fmt)
    spec = CausalLM(path=str(folder), tokenizer=tok, format=fmt, init="random", dtype=dtype,
                    attn_implementation="sdpa", gradient_checkpointing=checkpointing, adapter="ia3",
                    target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ctx.sync()
    t = time.perf_counter()
    with torch.device(ctx.device):
        module = ICRLModule(pretrained=spec, lr=1e-2, weight_decay=0.01, warmup_steps=10, td=TD(),
                            target=Target(alpha=0.1), cql=None, seq_len=ctx.shape["seq_len"])
    module.train()
    ctx.sync()
    build_s = time.perf_counter() - t
    devices = sorted({str(p.device) for p in module.parameters()})
    n_layers_counted = sum(p.numel() for n, p in module.model.get_decoder().layers.named_parameters()
                           if "ia3_l" not in n)
    info = {"config": {k: v for k, v in config.items() if k != "architectures"}, "format": fmt, "tokenizer": tok_kind,
            "build_s": build_s, "parameter_devices": devices,
            "base_dtype": str(next(p for n, p in module.model.named_parameters() if "ia3_l" not in n).dtype),
            "adapter_dtype": str(next(p for p in module.parameters() if p.requires_grad).dtype),
            "n_params_total": sum(p.numel() for n, p in module.model.named_parameters() if "ia3_l" not in n),
            "n_params_decoder_layers": n_layers_counted,
            "n_params_trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "attn_implementation": module.model.config._attn_implementation,
            "built_with": f"ICRLModule(pretrained=CausalLM(init=random, dtype={dtype})) under torch.device"
                          f"({ctx.device.type!r})"}
    return module, info


def _steps(ctx, module, opt, sched, batch, n: int, autocast) -> tuple[list[float], list[float]]:
    """``n`` steps exactly as Lightning runs ICRLModule (bf16-mixed: autocast around training_step, backward
    outside; optimizer_step = AdamW step + Polyak update of the target adapter; the lr schedule per step)."""
    times, losses = [], []
    for _ in range(n):
        ctx.sync()
        t = time.perf_counter()
        with autocast():
            loss = module.training_step(batch, 0)
        loss.backward()
        module.optimizer_step(0, 0, opt)
        sched.step()
        opt.zero_grad(set_to_none=True)
        ctx.sync()
        times.append(time.perf_counter() - t)
        losses.append(loss.detach())
    return times, [float(v) for v in losses]


def _snapshot(module) -> dict:
    import torch

    with torch.no_grad():
        online = [p.detach().float().clone() for p in module.parameters() if p.requires_grad]
        target = [t.detach().float().clone() for t in module.target_params()]
        base = next(p for n, p in module.model.named_parameters() if "q_proj" in n and "ia3_l" not in n)
        return {"online": online, "target": target, "base_sum": float(base.double().sum()), "base_name": "q_proj"}


def _moved(before: dict, after: dict) -> dict:
    def dev(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    online, target = dev(after["online"], before["online"]), dev(after["target"], before["target"])
    return {"online_adapter_max_abs_change": online, "target_adapter_max_abs_change": target,
            "target_moved_less_than_online": target < online, "base_weight_unchanged":
            after["base_sum"] == before["base_sum"]}


def _profile(ctx, module, opt, sched, batch, autocast, top: int = 15) -> dict:
    """One step under torch.profiler: the ops / kernels that take the most (device or CPU) self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        step_s, _ = _steps(ctx, module, opt, sched, batch, 1, autocast)
    events = prof.key_averages()
    attr = "self_device_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"

    def us(e):
        return float(getattr(e, attr, 0) or 0)

    total = sum(us(e) for e in events) or 1.0
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in events:
        name = e.key.lower()
        if any(k in name for k in ("flash", "fmha", "attention", "sdpa", "efficient_attention")):
            groups["attention"] += us(e)
        elif any(k in name for k in ("gemm", "matmul", "aten::mm", "aten::bmm", "aten::addmm", "xmma", "cutlass",
                                     "nvjet", "cublas", "sm90_")):
            groups["matmul"] += us(e)
        else:
            groups["other"] += us(e)
    rows = sorted(events, key=us, reverse=True)[:top]
    return {"time_kind": attr, "profiled_step_s": step_s[0], "profiler_wall_s": time.perf_counter() - t,
            "total_self_ms": total / 1e3, "share_by_group": {k: v / total for k, v in groups.items()},
            "top": [{"name": e.key[:140], "count": e.count, "self_ms": us(e) / 1e3, "share": us(e) / total}
                    for e in rows]}


def step_part(ctx: Ctx, name: str, config: dict, fmt: str, every: int, dtype: str) -> dict:
    """Build once (checkpointing on), measure; profile one step; switch checkpointing off, measure again."""
    import torch

    warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")  # training_step outside a Trainer
    sh = ctx.shape
    module, info = build_step_module(ctx, name, config, fmt, checkpointing=True, dtype=dtype)
    result = {"how": "ICRLModule.training_step + backward + ICRLModule.optimizer_step (AdamW + Polyak) + "
                     "lr scheduler, under torch.autocast(bfloat16) (Lightning's bf16-mixed); synthetic batch; "
                     "one micro-batch per optimizer step", "model": info}
    n_params = count_decoder_params(config)
    result["model"]["n_params_decoder_layers_meta"] = n_params
    width, n_layers, seq_len = attention_width(config), config["num_hidden_layers"], sh["seq_len"]
    flops = model_flops_per_token(n_params, n_layers, seq_len, width)
    flops_t = model_flops_per_token(n_params, n_layers, seq_len, width, target_forward=True)
    result["flops"] = {"N": n_params, "L": n_layers, "T": seq_len, "d": width, "per_token": flops,
                       "per_token_incl_target_forward": flops_t, "peak": ctx.peak}
    batch = synthetic_batch(sh["batch"], seq_len, config["vocab_size"], every, ctx.device)
    result["batch"] = {"batch_size": sh["batch"], "seq_len": seq_len, "tokens_per_step": sh["batch"] * seq_len,
                       "action_every_tokens": every, "action_positions": int(batch["q_mask"].sum()),
                       "episode_ends": int(batch["done"].sum()), "rewards": int((batch["reward"] > 0).sum()),
                       "warmup_steps": sh["warmup"], "timed_steps": sh["steps"]}
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]

    def autocast():  # Lightning's bf16-mixed; a float32 base (smoke) runs without it
        return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    result["variants"] = {}
    for label, on in (("checkpointing", True), ("no_checkpointing", False)):
        if ctx.remaining() <= 0:
            result["variants"][label] = {"status": "skipped", "reason": "budget spent"}
            continue
        var: dict = {"gradient_checkpointing": set_checkpointing(module.model, on)}
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak(ctx)
        before = _snapshot(module)
        try:
            warm, warm_loss = _steps(ctx, module, opt, sched, batch, sh["warmup"], autocast)
            times, losses = _steps(ctx, module, opt, sched, batch, sh["steps"], autocast)
        except Exception as exc:  # noqa: BLE001 - an OOM (or any failure) is this variant's result
            var.update(status="oom" if is_oom(exc) else "error", error=error_record(exc), **memory(ctx))
            opt.zero_grad(set_to_none=True)
            del exc
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            result["variants"][label] = var
            ctx.partial(result)
            continue
        var.update(status="ok", warmup_times_s=warm, losses=warm_loss + losses,
                   **throughput(times, sh["batch"] * seq_len, flops, ctx.peak["flops"], flops_t), **memory(ctx))
        var["checks"] = _moved(before, _snapshot(module))
        var["checks"]["losses_finite"] = all(math.isfinite(v) for v in var["losses"])
        if label == "checkpointing" and ctx.args.profile and ctx.remaining() > 0:
            try:
                var["profile"] = _profile(ctx, module, opt, sched, batch, autocast)
            except Exception as exc:  # noqa: BLE001
                var["profile"] = {"error": error_record(exc)}
        result["variants"][label] = var
        ctx.partial(result)
    del module, opt, sched, batch
    gc.collect()
    return result


def part_llama8b_step(ctx: Ctx) -> dict:
    return step_part(ctx, "llama31-8b-step", llama8b_config(ctx), "llama3", every=10,
                     dtype=ctx.shape["dtype"]["llama"])


def part_smollm2_shape(ctx: Ctx) -> dict:
    result = step_part(ctx, "smollm2-135m-shape", smollm2_config(ctx), "chatml", every=13,
                       dtype=ctx.shape["dtype"]["smollm2"])
    result["config_source"] = SMOLLM2_SOURCE
    result["config_check"] = gguf_config_check(ctx)
    return result


def gguf_config_check(ctx: Ctx) -> dict:
    """SMOLLM2_135M against the GGUF's metadata (when the file is here)."""
    path = Path(ctx.args.claim_model) if ctx.args.claim_model else GGUF_DEFAULT
    if path.suffix != ".gguf" or not path.is_file():
        return {"checked": False, "reason": f"no GGUF at {path}"}
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    except Exception as exc:  # noqa: BLE001
        return {"checked": False, "error": error_record(exc)}
    ours = SMOLLM2_135M
    theirs = {k: cfg.get(k, (cfg.get("rope_parameters") or {}).get(k)) for k in SMOLLM2_CHECK_KEYS}
    mismatch = {k: {"ours": ours[k], "gguf": theirs[k]} for k in SMOLLM2_CHECK_KEYS if theirs[k] != ours[k]}
    return {"checked": True, "gguf": str(path), "fields": theirs, "mismatches": mismatch}


# --- CLI parts ---------------------------------------------------------------------------------------
_CLASSES: dict = {}


def __getattr__(name: str):
    """``gpu_check.StepClock`` for the CLI's callbacks list, made on first use so that the supervisor never
    imports Lightning."""
    if name == "StepClock":
        if name not in _CLASSES:
            _CLASSES[name] = _make_step_clock()
        return _CLASSES[name]
    raise AttributeError(name)


def _make_step_clock():
    import lightning as L
    import torch

    class StepClock(L.Callback):
        """One JSON line per optimizer step (after a device sync): wall clock, global step, peak GPU memory.

        Args:
            path: the JSON-lines file to append to.
        """

        def __init__(self, path: str):
            self.path = path

        def _mark(self, trainer, what: str) -> None:
            row = {"what": what, "step": int(trainer.global_step)}
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                row.update(peak_allocated=torch.cuda.max_memory_allocated(),
                           peak_reserved=torch.cuda.max_memory_reserved())
            row["t"] = time.perf_counter()
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

        def on_train_start(self, trainer, pl_module) -> None:
            self._mark(trainer, "start")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                self._mark(trainer, "step")

    StepClock.__module__, StepClock.__qualname__ = "gpu_check", "StepClock"
    return StepClock


def write_overrides(ctx: Ctx, tag: str, max_steps: int | None) -> dict:
    """A -c file for one CLI run: its folders, a checkpoint at the last step, the in-context report (no
    figures), the step clock, no progress bar."""
    run_dir = ctx.work / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, clock = run_dir / "checkpoints", run_dir / "clock.jsonl"
    clock.unlink(missing_ok=True)
    callbacks = [{"class_path": "icrl_lightning.callbacks.InContextReport",
                  "init_args": {"figures": False, "log_figure": False}},
                 {"class_path": "gpu_check.StepClock", "init_args": {"path": str(clock)}}]
    if max_steps:
        callbacks.insert(0, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(ckpt_dir), "save_last": True,
                                           "every_n_train_steps": max_steps}})
    doc = {"trainer": {"default_root_dir": str(run_dir), "enable_progress_bar": False,
                       "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": str(ctx.work / "runs"), "name": tag}},
                       "callbacks": callbacks}}
    path = run_dir / "overrides.yaml"
    path.write_text(json.dumps(doc, indent=2) + "\n")  # JSON is YAML
    return {"path": str(path), "run_dir": run_dir, "ckpt_dir": ckpt_dir, "clock": clock}


@contextlib.contextmanager
def redirect_fds(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code and Lightning's handlers
    too) to ``path`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_cli(ctx: Ctx, tag: str, argv: list[str]) -> tuple[dict, object]:
    """``python -m icrl_lightning ARGV`` in this worker process (its output to a log of its own)."""
    import torch

    from icrl_lightning.cli import main

    log = ctx.work / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    rec: dict = {"command": "python -m icrl_lightning " + " ".join(_quote(a) for a in argv), "log": str(log)}
    cli, exc_rec, rc = None, None, 0
    reset_peak(ctx)
    t = time.perf_counter()
    saved_argv, sys.argv = sys.argv, ["python -m icrl_lightning"]  # LightningCLI warns about stray sys.argv
    with redirect_fds(log):
        try:
            cli = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
            if exc.__context__ is not None:
                exc_rec = error_record(exc.__context__)
        except Exception as exc:  # noqa: BLE001 - the run's failure is its result
            rc, exc_rec = 1, error_record(exc)
            rec["oom"] = is_oom(exc)
            del exc
        finally:
            sys.argv = saved_argv
    rec["wall_s"] = time.perf_counter() - t
    rec["started_perf_counter"] = t
    rec["rc"] = rc
    rec["output_tail"] = file_tail(log, 40)
    if exc_rec:
        rec["error"] = exc_rec
    print(f"--- {tag}: rc {rc}, {rec['wall_s']:.1f} s; its output ({log}):", flush=True)
    sys.stdout.write(Path(log).read_text(errors="replace") if log.is_file() else "")
    sys.stdout.flush()
    if cli is not None:
        trainer = cli.trainer
        with contextlib.suppress(Exception):
            rec["trainer"] = {"root_device": str(trainer.strategy.root_device), "precision": str(trainer.precision),
                              "strategy": type(trainer.strategy).__name__, "global_step": int(trainer.global_step),
                              "accumulate_grad_batches": trainer.accumulate_grad_batches}
    if ctx.device.type == "cuda":
        rec["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
        rec["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
    return rec, cli


def _quote(a: str) -> str:
    return a if a and all(c.isalnum() or c in "-_./=:,+" for c in a) else json.dumps(a)


def clock_summary(ctx: Ctx, path: Path, tokens_per_step: int | None, config: dict | None, seq_len: int | None,
                  run_start: float | None = None) -> dict:
    rows = [json.loads(line) for line in file_tail(path, 100000) if line.strip()]
    marks = [r for r in rows if r["what"] == "step"]
    out: dict = {"optimizer_steps_marked": len(marks)}
    start = next((r for r in rows if r["what"] == "start"), None)
    if start and run_start is not None:  # parse, model build, dataset, strategy setup: all before training
        out["until_train_start_s"] = start["t"] - run_start
    if marks:
        if start:
            out["first_step_s"] = marks[0]["t"] - start["t"]
        if "peak_reserved" in marks[-1]:
            out["peak_allocated_gib"] = gib(marks[-1]["peak_allocated"])
            out["peak_reserved_gib"] = gib(marks[-1]["peak_reserved"])
    times = [b["t"] - a["t"] for a, b in zip(marks, marks[1:], strict=False)]
    if times and tokens_per_step:
        flops = flops_t = None
        if config is not None:
            n, width = count_decoder_params(config), attention_width(config)
            flops = model_flops_per_token(n, config["num_hidden_layers"], seq_len, width)
            flops_t = model_flops_per_token(n, config["num_hidden_layers"], seq_len, width, target_forward=True)
        out.update(throughput(times, tokens_per_step, flops, ctx.peak["flops"], flops_t))
        out["note"] = "step times between consecutive optimizer-step ends (the first step is left out)"
    return out


def checkpoint_record(ckpt_dir: Path) -> dict:
    """What the run wrote under ``ckpt_dir`` and, from ``last.ckpt``, how far the IA3 adapters moved from
    their initial ones (the target less than the online one after Polyak averaging)."""
    found = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []

    def size(p: Path) -> int:
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    rec: dict = {"written": bool(found),
                 "files": [{"name": p.name, "bytes": size(p), "dir": p.is_dir()} for p in found],
                 "adapter_folder": (ckpt_dir / "adapter").is_dir()}
    last = ckpt_dir / "last.ckpt"
    if not last.exists():
        return rec
    try:
        import torch

        files = [last] if last.is_file() else sorted(last.rglob("*model_states.pt"))
        online = target = None
        for f in files:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            state = state.get("state_dict") or state.get("module") or {}
            on = [v.float() for k, v in state.items() if "ia3_l.default" in k]
            tg = [v.float() for k, v in state.items() if "ia3_l.delayed" in k]
            if on:
                online = max(float((v - 1).abs().max()) for v in on)
                target = max(float((v - 1).abs().max()) for v in tg) if tg else None
                rec["adapter_tensors"] = {"online": len(on), "target": len(tg)}
                break
        rec["online_adapter_max_abs_change_from_init"] = online
        rec["target_adapter_max_abs_change_from_init"] = target
        if online is not None and target is not None:
            rec["polyak_target_behind_online"] = 0 < target < online
    except Exception as exc:  # noqa: BLE001
        rec["adapter_check_error"] = error_record(exc, 6)
    return rec


def fit_run(ctx: Ctx, tag: str, argv: list[str], max_steps: int, config: dict | None) -> dict:
    """One CLI run with this script's overrides file; its record (the CLI's objects are dropped after)."""
    ovr = write_overrides(ctx, tag, max_steps)
    last = max(i for i, a in enumerate(argv) if a == "-c")
    argv = [*argv[:last + 2], "-c", ovr["path"], *argv[last + 2:]]  # after the last -c file: its values win
    rec, cli = run_cli(ctx, tag, argv)
    tokens = seq_len = None
    if cli is not None:
        with contextlib.suppress(Exception):
            h = cli.datamodule.hparams
            seq_len = h.seq_len
            tokens = cli.trainer.accumulate_grad_batches * h.batch_size * h.seq_len
    rec["steps"] = clock_summary(ctx, ovr["clock"], tokens, config, seq_len, rec.pop("started_perf_counter"))
    rec["checkpoint"] = checkpoint_record(ovr["ckpt_dir"])
    report = getattr(getattr(cli, "model", None), "eval_report", None) if cli is not None else None
    if report:
        rec["report"] = report_summary(report)
    del cli, report
    _free()
    return rec


def report_summary(report: dict) -> dict:
    k = report.get("last_k", 10)
    out = {"n_maps": report.get("n_maps"), "n_episodes": report.get("n_episodes"), "last_k": k,
           "global_step": report.get("global_step"), "timings_s": {x: report.get("timings", {}).get(x)
                                                                  for x in ("icrl_s", "total_s")}}
    agents = {}
    for name, s in report.get("agents", {}).items():
        agents[name] = {f"last{k}": s.get(f"last{k}"), "first_episodes": s.get("first_episodes"),
                        "overall": s.get("overall"), "goal_found_before_greedy": s.get("goal_found_before_greedy")}
    out["agents"] = agents
    out["icrl_mean_return"] = report.get("agents", {}).get("icrl", {}).get("mean_return")
    return out


def cli_status(rec: dict) -> str:
    if rec["rc"] == 0:
        return "ok"
    return "oom" if rec.get("oom") or is_oom(None, "\n".join(rec.get("output_tail", []))) else "error"


def _error_text(rec: dict) -> str:
    err = rec.get("error") or {}
    return "\n".join([err.get("message", ""), *err.get("traceback_tail", []), *rec.get("output_tail", [])])


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def llama_cli_part(ctx: Ctx, tag: str, preset: str) -> dict:
    """``fit`` of the paper's experiment with the 8B shape (random init) and a strategy preset, one device."""
    config = llama8b_config(ctx)
    folder = model_folder(ctx, "llama31-8b-cli", config)
    tok, tok_kind = tokenizer_file(ctx, "llama3")
    steps = ctx.shape["cli_steps"]
    argv = ["fit", "-c", str(CONF / "experiment/paper_llama31_8b.yaml"), "-c", str(CONF / f"trainer/{preset}.yaml"),
            "--model.pretrained.path", str(folder), "--model.pretrained.tokenizer", tok,
            "--model.pretrained.init", "random", "--trainer.devices", "1", "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--data.data_dir", str(ctx.data_dir)]
    argv += ["--trainer.accelerator", "cpu", *SMOKE_DATA] if ctx.smoke else GPU_CLI_DATA
    result: dict = {"model": {"config": "llama31_8b_config()" + (" with " + json.dumps(ctx.shape["llama"])
                                                                   if ctx.shape["llama"] else ""),
                              "tokenizer": tok_kind, "n_params_decoder_layers": count_decoder_params(config)},
                    "attempts": []}
    float32 = ("float32_base", ["--model.pretrained.dtype", "float32"])
    plan = [float32] if preset == "fsdp" and ctx.args.fsdp_float32_only else [("paper_bf16_base", [])]
    while plan:
        label, extra = plan.pop(0)
        if ctx.remaining() <= 0:
            result["attempts"].append({"label": label, "status": "skipped", "reason": "budget spent"})
            break
        rec = fit_run(ctx, f"{tag}_{label}", argv + extra, steps, config)
        rec["label"] = label
        rec["status"] = cli_status(rec)
        result["attempts"].append(rec)
        ctx.partial(result)
        if rec["status"] == "ok":
            break
        if preset == "fsdp" and label == "paper_bf16_base" and fsdp_retry_wanted(_error_text(rec)):
            plan.append(float32)
    last = result["attempts"][-1]
    result["status"] = last["status"]
    if ctx.smoke and last["status"] == "error":
        text = _error_text(last)
        if "requires a GPU accelerator" in text or "accelerator" in text and "GPU" in text:
            result["status"], result["expected"] = "refused", "smoke: Lightning refuses this strategy on the CPU"
        elif "must have DeepSpeed installed" in text:
            result["status"], result["expected"] = "not_installed", "smoke: deepspeed is not installed here"
    if last["status"] != "ok" and last.get("error"):
        result["error"] = last["error"]
    elif last["status"] != "ok":
        result["error"] = {"type": "ExitCode", "message": f"rc {last.get('rc')}", "traceback_tail": last["output_tail"]}
    return result


def part_fsdp_fit(ctx: Ctx) -> dict:
    result = llama_cli_part(ctx, "fsdp_fit", "fsdp")
    result["retry_rule"] = (f"when the paper's bf16 base fails FSDP's wrapping with '{EXPECTED_FSDP_WRAP_ERROR}' "
                            "(bf16 base + float32 IA3 in one flat parameter), once more with "
                            "--model.pretrained.dtype float32 (FSDP's mixed precision computes in bf16)")
    return result


def part_deepspeed_fit(ctx: Ctx) -> dict:
    try:
        import deepspeed

        installed = {"installed": True, "version": deepspeed.__version__}
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        installed = {"installed": False, "import_error": error_record(exc, 6)}
    if not installed["installed"] and not ctx.smoke:
        return {"status": "not_installed", "deepspeed": installed,
                "error": installed["import_error"],
                "how_to": "carry the deepspeed wheel (docs/gpu_check.md: python tools/gpu_check.py --pack)"}
    result = llama_cli_part(ctx, "deepspeed_fit", "deepspeed")
    result["deepspeed"] = installed
    return result


def part_cuda_smoke(ctx: Ctx) -> dict:
    """``fit`` then ``validate --ckpt_path`` of the quickstart model with the gpu preset."""
    steps = ctx.shape["smoke_steps"]
    base = ["-c", str(CONF / "experiment/quickstart.yaml"), "-c", str(CONF / "trainer/gpu.yaml")]
    common = ["--data.eval_maps", str(ctx.shape["eval_maps"]), "--data.data_dir", str(ctx.data_dir)]
    common += ["--trainer.accelerator", "cpu", *SMOKE_DATA, *SMOKE_BACKBONE] if ctx.smoke else GPU_CLI_DATA
    result: dict = {}
    fit = fit_run(ctx, "cuda_smoke_fit", ["fit", *base, "--trainer.max_steps", str(steps),
                                          "--trainer.limit_val_batches", "0", *common], steps, None)
    fit["status"] = cli_status(fit)
    result["fit"] = fit
    ctx.partial(result)
    last = Path(ctx.work / "runs" / "cuda_smoke_fit" / "checkpoints" / "last.ckpt")
    if fit["status"] == "ok" and last.is_file():
        val = fit_run(ctx, "cuda_smoke_validate", ["validate", *base, *common, "--ckpt_path", str(last)], 0, None)
        val["status"] = cli_status(val)
    else:
        val = {"status": "skipped", "reason": f"no {last} from fit"}
    result["validate"] = val
    result["status"] = "ok" if fit["status"] == val["status"] == "ok" else \
        (fit["status"] if fit["status"] != "ok" else val["status"])
    if result["status"] != "ok":
        bad = fit if fit["status"] != "ok" else val
        result["error"] = bad.get("error") or {"type": "ExitCode", "message": f"rc {bad.get('rc')}",
                                               "traceback_tail": bad.get("output_tail", [])}
    return result


def standin_model(ctx: Ctx) -> Path:
    """smoke: a folder with a tiny SmolLM2-shaped Llama and a ChatML word-level tokenizer in place of the GGUF."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from icrl_lightning.backbones import build_tokenizer

    folder = ctx.work / "models" / "smollm2-standin"
    if (folder / "config.json").is_file():
        return folder
    tok = build_tokenizer("chatml")
    cfg = {k: v for k, v in smollm2_config(ctx).items() if k not in ("architectures", "model_type")}
    cfg.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def part_pretrained_claim(ctx: Ctx) -> dict:
    """SmolLM2-135M-Instruct + IA3, the paper's recipe (pure double DQN, lr 1e-2, 10 x 4,096 tokens per
    optimizer step, alpha 0.1), then the 50-map protocol; beside it the same shape from random init."""
    model = Path(ctx.args.claim_model) if ctx.args.claim_model else (standin_model(ctx) if ctx.smoke else GGUF_DEFAULT)
    if not model.exists():
        raise FileNotFoundError(f"no SmolLM2 model at {model}: reassemble the GGUF with --gguf-parts "
                                "(docs/gpu_check.md) or give --claim-model")
    steps = ctx.args.claim_steps if ctx.args.claim_steps else (2 if ctx.smoke else 200)
    argv = ["fit", "-c", str(CONF / "experiment/paper_llama31_8b.yaml"),
            "-c", str(CONF / "model/smollm2_135m_ia3.yaml"), "-c", str(CONF / "trainer/gpu.yaml"),
            "--model.pretrained.path", str(model),
            "--model.pretrained.dtype", "bfloat16", "--model.pretrained.gradient_checkpointing", "false",
            "--model.cql", "null", "--model.td.conflict_weight", "1", "--model.lr", "0.01",
            "--model.evaluation.max_context", "0", "--trainer.max_steps", str(steps),
            "--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "10",
            "--data.seq_len", "4096", "--data.batch_size", "5", "--data.eval_maps", "50",
            "--data.num_train_maps", str(ctx.args.claim_train_maps), "--data.data_dir", str(ctx.data_dir)]
    if ctx.smoke:
        argv += ["--trainer.accelerator", "cpu", *SMOKE_DATA]
    result: dict = {"model": str(model), "recipe": "paper: pure double DQN (cql null, conflict_weight 1), chatml, "
                    "lr 1e-2, warm-up 10, AdamW wd 0.01, alpha 0.1, gamma 0.9, reward x30, 5 x 2 x 4,096 tokens "
                    "per optimizer step, bf16 base, IA3 k/v/down_proj", "claim_steps": steps,
                    "config_check": gguf_config_check(ctx), "runs": {}}
    for label, extra in (("pretrained", []), ("random_init", ["--model.pretrained.init", "random"])):
        if ctx.remaining() <= 0:
            result["runs"][label] = {"status": "skipped", "reason": "budget spent"}
            continue
        rec = fit_run(ctx, f"claim_{label}", argv + extra, steps, smollm2_config(ctx))
        rec["status"] = cli_status(rec)
        result["runs"][label] = rec
        ctx.partial(result)
    rows = {}
    for label, rec in result["runs"].items():
        rep = rec.get("report")
        if not rep:
            continue
        k = rep["last_k"]
        for agent in ("icrl", "no_context", "q_learning", "random", "oracle"):
            if agent in rep["agents"]:
                rows.setdefault(f"{agent}_last{k}", {})[label] = rep["agents"][agent][f"last{k}"]
    result["comparison"] = rows
    statuses = [r["status"] for r in result["runs"].values()]
    result["status"] = "ok" if statuses and all(s == "ok" for s in statuses) else \
        next((s for s in statuses if s not in ("ok", "skipped")), "skipped")
    if result["status"] not in ("ok", "skipped"):
        bad = next(r for r in result["runs"].values() if r["status"] == result["status"])
        result["error"] = bad.get("error") or {"type": "ExitCode", "message": f"rc {bad.get('rc')}",
                                               "traceback_tail": bad.get("output_tail", [])}
    return result


def _injected_failure(part: str) -> None:
    """Tests of the supervisor: GPU_CHECK_FAIL=PART:raise fails a part, PART:exit kills its worker."""
    what = dict(item.split(":", 1) for item in os.environ.get("GPU_CHECK_FAIL", "").split(",") if ":" in item)
    if what.get(part) == "raise":
        raise RuntimeError(f"GPU_CHECK_FAIL: injected failure of {part}")
    if what.get(part) == "exit":
        sys.stdout.flush()
        os._exit(3)


PART_FUNCTIONS = {"llama8b_step": part_llama8b_step, "smollm2_shape": part_smollm2_shape,
                  "cuda_smoke": part_cuda_smoke, "fsdp_fit": part_fsdp_fit, "deepspeed_fit": part_deepspeed_fit,
                  "pretrained_claim": part_pretrained_claim}


def worker(args) -> int:
    sys.path[:0] = [str(REPO), str(THIS.parent)]
    os.chdir(REPO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads or args.smoke:  # smoke: one thread, as the test suite runs (2 busy cores thrash with 2)
        torch.set_num_threads(args.threads or 1)
    torch.set_float32_matmul_precision("high")
    ctx = Ctx(args)
    ctx.results.mkdir(parents=True, exist_ok=True)
    env_path = ctx.results / "environment.json"
    if not env_path.is_file():
        try:
            write_json(env_path, environment(ctx))
        except Exception as exc:  # noqa: BLE001
            write_json(env_path, {"error": error_record(exc)})
    for part in args.parts:
        ctx.part = part
        (ctx.results / "current").write_text(part)
        (ctx.results / f"{part}.partial.json").unlink(missing_ok=True)
        started = time.time()
        print(f"=== {now_iso()} part {part} starts ({ctx.remaining():.0f} s of the budget left)", flush=True)
        if ctx.remaining() <= 0:
            rec = {"status": "skipped", "reason": f"budget: {time.time() - ctx.t0:.0f} s elapsed of {ctx.budget:.0f}"}
        else:
            try:
                _injected_failure(part)
                rec = PART_FUNCTIONS[part](ctx)
                rec.setdefault("status", "ok")
            except Exception as exc:  # noqa: BLE001 - one failing part never stops the others
                rec = {"status": "oom" if is_oom(exc) else "error", "error": error_record(exc)}
                traceback.print_exc()
                del exc
        rec["wall_s"] = time.time() - started
        rec["started"] = _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds")
        write_json(ctx.results / f"{part}.json", rec)
        (ctx.results / f"{part}.partial.json").unlink(missing_ok=True)
        print(f"=== part {part}: {rec['status']} in {rec['wall_s']:.1f} s", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    (ctx.results / "current").unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # every result is on disk; skip the interpreter's slow teardown (threads, CUDA context)


# --- the supervisor (standard library only) ---------------------------------------------------------------
def parse_parts(spec: list[str]) -> list[str]:
    names: list[str] = []
    for item in spec:
        for name in filter(None, (s.strip() for s in item.split(","))):
            expanded = DEFAULT_PARTS if name == "all" else (name,)
            for n in expanded:
                if n not in ALL_PARTS:
                    raise SystemExit(f"error: --parts {n!r}: choose from all, {', '.join(ALL_PARTS)}")
                if n not in names:
                    names.append(n)
    return sorted(names, key=ALL_PARTS.index)  # the fixed order: pretrained_claim last


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work_dir).resolve() if args.work_dir else self.out / "work"
        self.results = self.work / "results"
        self.json_path, self.log_path = self.out / "gpu_check.json", self.out / "gpu_check.log"
        self.t0 = time.time()
        self.parts = parse_parts(args.parts)
        self.doc = {"script": "tools/gpu_check.py", "mode": "smoke" if args.smoke else "gpu", "started": now_iso(),
                    "argv": sys.argv[1:], "budget_s": args.budget_s, "parts_requested": self.parts,
                    "formula": FORMULA, "shapes": SHAPES["smoke" if args.smoke else "gpu"],
                    "environment": None, "gguf": None, "parts": {}}

    def log(self, msg: str) -> None:
        line = f"[{now_iso()}] {msg}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def save(self) -> None:
        self.doc["elapsed_s"] = time.time() - self.t0
        env = read_json(self.results / "environment.json")
        if env is not None:
            self.doc["environment"] = env
        write_json(self.json_path, self.doc)

    def worker_argv(self, parts: list[str]) -> list[str]:
        a = self.args
        argv = [sys.executable, str(THIS), str(self.out), "--worker", "--t0", repr(self.t0), "--parts", ",".join(parts),
                "--budget-s", str(a.budget_s), "--work-dir", str(self.work), "--claim-steps", str(a.claim_steps or 0),
                "--claim-train-maps", str(a.claim_train_maps)]
        for flag, value in (("--steps", a.steps), ("--warmup", a.warmup), ("--peak-flops", a.peak_flops),
                            ("--claim-model", a.claim_model), ("--threads", a.threads)):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--smoke"] if a.smoke else []
        argv += ["--tokenizer", a.tokenizer]
        argv += ["--fsdp-float32-only"] if a.fsdp_float32_only else []
        argv += ["--profile"] if a.profile else ["--no-profile"]
        return argv

    def run(self) -> int:
        if self.args.isolate is None:
            self.args.isolate = not self.args.smoke
        self.results.mkdir(parents=True, exist_ok=True)
        for stale in self.results.glob("*"):
            stale.unlink()
        self.log(f"gpu_check: parts {', '.join(self.parts)}; budget {self.args.budget_s:.0f} s; "
                 f"json {self.json_path}; work {self.work}")
        if self.args.gguf_parts:
            target = Path(self.args.claim_model) if self.args.claim_model else GGUF_DEFAULT
            try:
                self.doc["gguf"] = join_parts([Path(p) for p in self.args.gguf_parts.split(",")], target,
                                              smollm2_sha256())
            except OSError as exc:
                self.doc["gguf"] = {"ok": False, "error": error_record(exc, 4)}
            self.log(f"gguf: {json.dumps(self.doc['gguf'])}")
        self.save()
        pending = list(self.parts)
        while pending:
            elapsed = time.time() - self.t0
            if elapsed >= self.args.budget_s:
                for p in pending:
                    self.doc["parts"][p] = {"status": "skipped",
                                            "reason": f"budget: {elapsed:.0f} s elapsed of {self.args.budget_s:.0f}"}
                    self.log(f"part {p}: skipped (budget)")
                break
            group = [pending[0]] if self.args.isolate else list(pending)
            self.run_group(group)
            pending = [p for p in pending if p not in self.doc["parts"]]
        self.save()
        self.summary()
        return 0

    def run_group(self, group: list[str]) -> None:
        timeout = self.args.budget_s - (time.time() - self.t0) + self.args.grace_s
        self.log(f"worker for {', '.join(group)} (killed after {timeout:.0f} s)")
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with self.log_path.open("ab") as logf:
            proc = subprocess.Popen(self.worker_argv(group), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(REPO), start_new_session=True)
            deadline = time.time() + timeout
            killed = False
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                self.collect(group)
                if time.time() > deadline:
                    killed = True
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                    break
        self.collect(group)
        current = (self.results / "current").read_text().strip() if (self.results / "current").is_file() else None
        for part in group:
            if part in self.doc["parts"]:
                continue
            if part != current and not (current is None and part == group[0]):
                continue  # never started: a new worker takes it
            rec = read_json(self.results / f"{part}.partial.json") or {}
            rec["status"] = "timeout" if killed else "error"
            rec["error"] = {"type": "WorkerKilled" if killed else "WorkerDied",
                            "message": (f"the worker outlived the budget and was killed after {timeout:.0f} s"
                                        if killed else f"the worker exited with {proc.returncode} during this part"),
                            "traceback_tail": file_tail(self.log_path, 20)}
            self.doc["parts"][part] = rec
            self.log(f"part {part}: {rec['status']} ({rec['error']['message']})")
            self.save()
            with contextlib.suppress(OSError):
                (self.results / "current").unlink()
            break

    def collect(self, group: list[str]) -> None:
        changed = False
        for part in group:
            if part in self.doc["parts"]:
                continue
            rec = read_json(self.results / f"{part}.json")
            if rec is not None:
                self.doc["parts"][part] = rec
                self.log(f"part {part}: {rec.get('status')} in {rec.get('wall_s', 0):.1f} s  {headline(part, rec)}")
                changed = True
        if changed or self.doc["environment"] is None:
            self.save()

    def summary(self) -> None:
        env = self.doc.get("environment") or {}
        self.log(f"done in {time.time() - self.t0:.0f} s on {env.get('gpu_name') or env.get('device')}; "
                 f"torch {env.get('packages', {}).get('torch')}; json: {self.json_path}")
        for part in self.parts:
            rec = self.doc["parts"].get(part, {})
            self.log(f"  {part:16s} {rec.get('status', '?'):13s} {headline(part, rec)}")


def headline(part: str, rec: dict) -> str:
    """One line of a part's main numbers (or its error)."""
    def num(x, fmt=".3g"):
        return "-" if x is None else format(x, fmt)

    def step_line(v: dict) -> str:
        if v.get("status") != "ok":
            return f"{v.get('status')}: {(v.get('error') or {}).get('message', v.get('reason', ''))[:120]}"
        return (f"{num(v.get('median_step_s'))} s/step, {num(v.get('tokens_per_s'), '.4g')} tok/s, "
                f"peak {num(v.get('peak_reserved_gib'))} GiB reserved, MFU {num(v.get('mfu'))}")

    if rec.get("expected"):
        return f"expected: {rec['expected']}"
    if rec.get("status") in ("error", "oom", "timeout", "not_installed") and "variants" not in rec:
        err = rec.get("error") or {}
        first = (str(err.get("message") or "").splitlines() or [""])[0]
        return f"{err.get('type', '')}: {first[:160]}"
    if "variants" in rec:
        return "; ".join(f"{k}: {step_line(v)}" for k, v in rec["variants"].items())
    if "attempts" in rec:
        bits = []
        for a in rec["attempts"]:
            s = a.get("steps", {})
            bits.append(f"{a.get('label')}: {a.get('status')} rc {a.get('rc')} {num(a.get('wall_s'))} s, "
                        f"{num(s.get('median_step_s'))} s/step, ckpt {a.get('checkpoint', {}).get('written')}")
        return "; ".join(bits)
    if part == "cuda_smoke":
        rep = (rec.get("validate") or {}).get("report") or {}
        icrl = rep.get("agents", {}).get("icrl", {})
        fit = rec.get("fit", {})
        return (f"fit {fit.get('status')} on {fit.get('trainer', {}).get('root_device')}, "
                f"validate {rec.get('validate', {}).get('status')}, icrl {icrl}")
    if part == "pretrained_claim":
        return json.dumps(rec.get("comparison", {}))
    return str(rec.get("reason", ""))


# --- --pack: what travels to a GPU machine --------------------------------------------------------------
# Missing from the GPU image (KINDS.md's package list), plus peft and typing-extensions pinned to the versions
# tested here (the image's peft version is not recorded; pydantic needs typing-extensions >= 4.16).
WHEELS = ("jsonargparse", "docstring-parser", "typeshed-client", "omegaconf", "gymnasium", "farama-notifications",
          "gguf", "peft", "typing-extensions", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
EXTRA_PINS = {"hjson": "3.1.0"}  # deepspeed's, not installed here
DEEPSPEED_VERSION = "0.19.8"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pack(folder: Path) -> int:
    """Wheels of the packages the GPU image lacks (versions as installed here) into ``folder/.whl``, a
    DeepSpeed wheel built here (no compiled ops: they build on first use there), and the SmolLM2 GGUF cut in
    two halves (``.gguf1/``, ``.gguf2/``: the device carries at most 64 MiB a call)."""
    folder = folder.resolve()
    whl = folder / ".whl"
    whl.mkdir(parents=True, exist_ok=True)
    pins = {}
    for name in WHEELS:
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            print(f"warning: {name} is not installed here; not packed")
    pins.update(EXTRA_PINS)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(whl),
           *[f"{n}=={v}" for n, v in pins.items()]]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        return 1
    if not list(whl.glob("deepspeed-*.whl")):
        sdist = folder / ".whl-build"
        sdist.mkdir(exist_ok=True)
        steps = [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", str(sdist),
                  f"deepspeed=={DEEPSPEED_VERSION}"],
                 [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(whl),
                  str(sdist / f"deepspeed-{DEEPSPEED_VERSION}.tar.gz")]]
        for step in steps:
            print("$ " + " ".join(step), flush=True)
            if subprocess.run(step, env=dict(os.environ, DS_BUILD_OPS="0")).returncode != 0:
                print("warning: no deepspeed wheel; deepspeed_fit will record 'not installed'")
                break
    carry = [".whl"]
    if GGUF_DEFAULT.is_file():
        parts = split_file(GGUF_DEFAULT, [folder / ".gguf1" / (GGUF_DEFAULT.name + ".part1"),
                                          folder / ".gguf2" / (GGUF_DEFAULT.name + ".part2")])
        print(f"GGUF sha256 {sha256_file(GGUF_DEFAULT)} cut into " + ", ".join(f"{p} ({p.stat().st_size} B)"
                                                                             for p in parts))
        carry += [".gguf1", ".gguf2"]
    else:
        print(f"no {GGUF_DEFAULT} (python tools/fetch_models.py --only smollm2): pretrained_claim cannot run")
    if folder == REPO:
        exclude = REPO / ".git" / "info" / "exclude"
        if exclude.parent.is_dir():
            have = exclude.read_text().splitlines() if exclude.is_file() else []
            add = [f"/{c}/" for c in [*carry, ".whl-build"] if f"/{c}/" not in have]
            if add:
                with exclude.open("a") as f:
                    f.write("\n".join(add) + "\n")
                print(f"added to {exclude}: {' '.join(add)}")
    for c in carry:
        p = folder / c
        print(f"{c}: {sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) / 2**20:.1f} MiB")
    print("next: docs/gpu_check.md, 'On a GPU machine'")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", nargs="?", help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--smoke", action="store_true", help="CPU, every shape shrunk (what the test suite runs)")
    ap.add_argument("--parts", action="append", default=None,
                    help=f"comma-separated: all (= {', '.join(DEFAULT_PARTS)}) and/or pretrained_claim")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no part after this many seconds")
    ap.add_argument("--grace-s", type=float, default=60.0, help="a worker is killed this long after the budget")
    ap.add_argument("--work-dir", help="models, data, runs, logs (default OUT/work; keep it outside a folder "
                                       "whose every file travels back)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="one worker process per part (default: on, off with --smoke)")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default 5; smoke 2)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per variant (default 2; smoke 1)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="profile one checkpointed step of each step part")
    ap.add_argument("--peak-flops", type=float, help="dense bf16 peak FLOP/s for a GPU not in the table")
    ap.add_argument("--fsdp-float32-only", action="store_true",
                    help="fsdp_fit: skip the paper's bf16 base (FSDP1 refuses bf16 + float32 adapters in one unit)")
    ap.add_argument("--claim-steps", type=int, default=None, help="optimizer steps per claim run (default 200)")
    ap.add_argument("--claim-train-maps", type=int, default=250, help="training maps of the claim (paper: 250)")
    ap.add_argument("--claim-model", help="SmolLM2 .gguf or model folder (default data/models/.../*.gguf)")
    ap.add_argument("--gguf-parts", help="comma-separated halves to join (sha256-checked) into the GGUF first")
    ap.add_argument("--threads", type=int, help="torch threads in the workers (smoke: 1)")
    ap.add_argument("--tokenizer", choices=("auto", "word-level"), default="auto",
                    help="llama3 format: the fetched Llama 3 tokenizer.json when present (auto), or a word-level one")
    ap.add_argument("--pack", metavar="DIR", help="prepare what travels: DIR/.whl, DIR/.gguf1, DIR/.gguf2")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pack:
        return pack(Path(args.pack))
    if not args.out:
        ap.error("OUT_DIR is required")
    if args.claim_steps == 0:
        args.claim_steps = None
    if args.worker:
        args.parts = parse_parts(args.parts or ["all"])
        return worker(args)
    args.parts = args.parts or ["all"]
    return Supervisor(args).run()


if __name__ == "__main__":
    sys.exit(main())
