"""tools/gpu_check.py: its --smoke run (every part present with numbers or a recorded error, sane numbers,
the MFU formula stated) and its pure pieces (the FLOP formula on hand-computed cases, the peak table, the
GGUF halves, the part list). The GPU run itself is docs/gpu_check.md's one command."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the supervisor side imports the standard library only
    return module


gpu_check = _load()


def _run(out: Path, *extra: str, env: dict | None = None, timeout: int = 170) -> dict:
    cmd = [sys.executable, str(SCRIPT), str(out), "--smoke", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = out / "gpu_check.json"
    assert path.is_file(), done.stdout[-3000:]
    assert (out / "gpu_check.log").stat().st_size > 0
    return json.loads(path.read_text())


# --- the formula ------------------------------------------------------------------------------------------
def test_flops_per_token_hand_computed():
    # N = 1000, L = 2, T = 8, d = 4: 4N = 4000; attention 3 * (2 * T * d) * L = 3 * 64 * 2 = 384
    assert gpu_check.model_flops_per_token(1000, 2, 8, 4) == 4384
    # + the target forward: 2N = 2000 and 2 * T * d * L = 128
    assert gpu_check.model_flops_per_token(1000, 2, 8, 4, target_forward=True) == 4384 + 2000 + 128


def test_flops_per_token_llama31_8b():
    # One Llama 3.1 8B decoder layer: q, o 4096 x 4096; k, v 4096 x 1024; gate, up, down 4096 x 14336; two norms.
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    n = 32 * per_layer
    assert n == 6_979_584_000
    attention = 6 * 32 * 4096 * 4096  # 6 L T d at T = 4,096, d = 32 heads x 128
    assert gpu_check.model_flops_per_token(n, 32, 4096, 4096) == 4 * n + attention == 31_139_561_472
    from icrl_lightning.backbones import llama31_8b_config

    config = llama31_8b_config()
    assert gpu_check.attention_width(config) == 4096
    assert gpu_check.count_decoder_params(config) == n  # counted on the meta device, no memory


def test_throughput_and_mfu():
    out = gpu_check.throughput([3.0, 1.0, 2.0], tokens_per_step=100, flops_per_token=10.0, peak=1000.0,
                        flops_with_target=15.0)
    assert out["median_step_s"] == 2.0 and out["tokens_per_s"] == 50.0
    assert out["model_flops_per_s"] == 500.0 and out["mfu"] == 0.5
    assert out["mfu_incl_target_forward"] == 0.75
    assert gpu_check.throughput([1.0], 10, 1.0, None)["mfu"] is None  # no peak: no MFU, the FLOP/s still measured


def test_peak_table():
    peak = gpu_check.peak_bf16
    assert peak("NVIDIA H200")["flops"] == 989e12 and peak("NVIDIA H200")["matched"] == "H200"
    assert peak("NVIDIA H100 80GB HBM3")["flops"] == 989e12
    assert peak("NVIDIA H100 PCIe")["flops"] == 756e12
    assert peak("NVIDIA H200 NVL")["flops"] == 835e12
    assert peak("NVIDIA A100-SXM4-80GB")["flops"] == 312e12
    assert peak("NVIDIA L40S")["matched"] == "L40S"
    assert peak("Some New GPU")["flops"] is None and peak(None)["flops"] is None
    assert peak("Some New GPU", 1e15)["flops"] == 1e15


def test_fsdp_retry_rule():
    assert gpu_check.fsdp_retry_wanted("ValueError: Must flatten tensors with uniform dtype but got torch.bfloat16 and "
                                "torch.float32")
    assert not gpu_check.fsdp_retry_wanted("CUDA out of memory")


def test_parse_parts():
    assert gpu_check.parse_parts(["all"]) == list(gpu_check.DEFAULT_PARTS)
    parts = gpu_check.parse_parts(["pretrained_claim,llama8b_step", "llama8b_step"])
    assert parts == ["llama8b_step", "pretrained_claim"]  # once each, in the fixed order
    with pytest.raises(SystemExit):
        gpu_check.parse_parts(["llama8b"])


def test_gguf_halves_round_trip(tmp_path):
    blob = os.urandom(1_000_003)
    src = tmp_path / "model.gguf"
    src.write_bytes(blob)
    parts = gpu_check.split_file(src, [tmp_path / "a" / "model.gguf.part1", tmp_path / "b" / "model.gguf.part2"])
    assert sum(p.stat().st_size for p in parts) == len(blob) and parts[0].stat().st_size < 600_000
    rec = gpu_check.join_parts(parts, tmp_path / "out" / "model.gguf", gpu_check.sha256_file(src))
    assert rec["ok"] and (tmp_path / "out" / "model.gguf").read_bytes() == blob
    bad = gpu_check.join_parts(parts[::-1], tmp_path / "bad" / "model.gguf", gpu_check.sha256_file(src))
    assert not bad["ok"] and not (tmp_path / "bad" / "model.gguf").exists()  # a wrong file is not kept


# --- the smoke run ---------------------------------------------------------------------------------------
def _check_error(rec: dict) -> None:
    err = rec.get("error")
    assert err and err["type"] and err["message"], rec


def _check_variant(v: dict, tokens: int) -> None:
    assert v["status"] == "ok", v
    times = v["step_times_s"]
    assert len(times) >= 2 and all(t > 0 for t in times)
    assert v["tokens_per_step"] == tokens
    assert v["median_step_s"] == pytest.approx(statistics.median(times), rel=1e-3)
    assert v["tokens_per_s"] == pytest.approx(tokens / v["median_step_s"])
    assert v["model_flops_per_s"] == pytest.approx(v["model_flops_per_token"] * v["tokens_per_s"])
    assert v["mfu"] is None  # no bf16 peak for a CPU
    checks = v["checks"]
    assert checks["losses_finite"] and checks["base_weight_unchanged"]
    assert checks["online_adapter_max_abs_change"] > 0 and checks["target_moved_less_than_online"]


def test_smoke_run(tmp_path):
    doc = _run(tmp_path / "out")
    assert doc["mode"] == "smoke"
    formula = doc["formula"]
    assert formula["model_flops_per_token"] == "4*N + 6*L*T*d" and "peak" in formula["mfu"]
    env = doc["environment"]
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["device"] == "cpu"
    assert env["matmul_bf16"]["tflops"] > 0
    parts = doc["parts"]
    assert set(parts) == set(gpu_check.DEFAULT_PARTS)
    for name, rec in parts.items():
        assert rec["status"] in gpu_check.STATUSES, name
        assert rec["wall_s"] > 0
        if rec["status"] != "ok":
            _check_error(rec)

    tokens = doc["shapes"]["batch"] * doc["shapes"]["seq_len"]
    for name in ("llama8b_step", "smollm2_shape"):
        rec = parts[name]
        assert rec["status"] == "ok", rec
        model, flops = rec["model"], rec["flops"]
        assert model["n_params_decoder_layers"] == model["n_params_decoder_layers_meta"] == flops["N"] > 0
        assert flops["per_token"] == gpu_check.model_flops_per_token(flops["N"], flops["L"], flops["T"], flops["d"])
        assert model["parameter_devices"] == ["cpu"] and model["base_dtype"] == "torch.bfloat16"
        assert model["adapter_dtype"] == "torch.float32" and model["n_params_trainable"] > 0
        variants = rec["variants"]
        assert variants["checkpointing"]["gradient_checkpointing"] is True
        assert variants["no_checkpointing"]["gradient_checkpointing"] is False
        for v in variants.values():
            _check_variant(v, tokens)
        assert variants["checkpointing"]["profile"]["top"]
    assert parts["smollm2_shape"]["config_source"]

    smoke = parts["cuda_smoke"]
    assert smoke["status"] == "ok", smoke
    assert smoke["fit"]["rc"] == 0 and smoke["fit"]["checkpoint"]["written"]
    assert smoke["fit"]["steps"]["optimizer_steps_marked"] == smoke["fit"]["trainer"]["global_step"] > 0
    assert smoke["validate"]["rc"] == 0 and "icrl" in smoke["validate"]["report"]["agents"]

    fsdp = parts["fsdp_fit"]
    assert fsdp["status"] == "refused" and "GPU" in fsdp["error"]["message"], fsdp  # Lightning: FSDP needs a GPU
    assert fsdp["attempts"][0]["command"].startswith("python -m icrl_lightning fit -c")
    assert parts["deepspeed_fit"]["status"] in ("not_installed", "refused", "ok")


@pytest.mark.slow
def test_smoke_supervisor_survives_failing_and_dying_parts(tmp_path):
    doc = _run(tmp_path / "out", "--isolate", "--parts", "smollm2_shape,fsdp_fit,deepspeed_fit",
               env={"GPU_CHECK_FAIL": "smollm2_shape:raise,fsdp_fit:exit"})
    parts = doc["parts"]
    assert parts["smollm2_shape"]["status"] == "error" and "injected" in parts["smollm2_shape"]["error"]["message"]
    assert parts["fsdp_fit"]["status"] == "error" and parts["fsdp_fit"]["error"]["type"] == "WorkerDied"
    assert parts["deepspeed_fit"]["status"] in ("not_installed", "refused", "ok")  # a fresh worker ran it


@pytest.mark.slow
def test_smoke_budget_skips_parts(tmp_path):
    doc = _run(tmp_path / "out", "--budget-s", "0", "--parts", "llama8b_step,cuda_smoke")
    assert all(rec["status"] == "skipped" and "budget" in rec["reason"] for rec in doc["parts"].values())


@pytest.mark.slow
def test_smoke_pretrained_claim(tmp_path):
    doc = _run(tmp_path / "out", "--parts", "pretrained_claim", timeout=300)
    claim = doc["parts"]["pretrained_claim"]
    assert claim["status"] == "ok", claim
    for label in ("pretrained", "random_init"):
        run = claim["runs"][label]
        assert run["rc"] == 0 and run["checkpoint"]["polyak_target_behind_online"]
        assert "icrl" in run["report"]["agents"]
    assert set(next(iter(claim["comparison"].values()))) == {"pretrained", "random_init"}
