"""Adapters via peft on a Hugging Face model folder (a tiny Llama written from config, nothing
downloaded): the online adapter trains, the base stays bit-identical, the target adapter is the
exact Polyak average, checkpoints hold only what was trained, and the saved adapter reloads with
``PeftModel.from_pretrained``."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from icrl_lightning.backbones import TARGET, CausalLM, build_tokenizer, llama31_8b_config
from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.module import ICRLModule
from icrl_lightning.objective import Target

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

SEQ = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_model):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), max_positions=SEQ)


def _module(model_dir, adapter: str = "ia3", q_head: str = "tokens", alpha: float = 0.1, **kwargs) -> ICRLModule:
    torch.manual_seed(0)
    spec = CausalLM(path=str(model_dir), format="compact", adapter=adapter, lora_r=4, lora_alpha=8,
                    **kwargs.pop("spec", {}))
    kwargs = {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 1, "seq_len": SEQ,
              "evaluation": EvalProtocol(max_episode_steps=10), **kwargs}
    return ICRLModule(pretrained=spec, q_head=q_head, target=Target(alpha=alpha), **kwargs)


def _trainer(tmp_path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), callbacks=list(callbacks), **kwargs)


def _base(module: ICRLModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()
            if ".default" not in n and f".{TARGET}" not in n}


class PolyakCheck(L.Callback):
    """Before each batch: remember the target; after it: the target is exactly
    alpha * online + (1 - alpha) * old (it moved), or unchanged (no optimizer step)."""

    def __init__(self, alpha: float):
        self.alpha, self.moved = alpha, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.old = [t.detach().clone() for t in module.target_params()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        targets = module.target_params()
        moved = not all(torch.equal(t, o) for t, o in zip(targets, self.old, strict=True))
        if moved:
            for t, (_, o), old in zip(targets, module._online, self.old, strict=True):
                assert torch.equal(t, self.alpha * o.detach() + (1 - self.alpha) * old)
        self.moved.append(moved)


@pytest.mark.parametrize(("adapter", "q_head"), [("ia3", "tokens"), ("lora", "tokens"), ("ia3", "linear")])
def test_adapter_trains_base_frozen_target_is_polyak(tmp_path, tiny_data_dir, model_dir, adapter, q_head, module_data):
    module = _module(model_dir, adapter, q_head)
    base0 = _base(module)
    online0 = [p.detach().clone() for _, p in module._online]
    names = [n for n, _ in module._online]
    if adapter == "ia3":  # the paper's modules: k_proj, v_proj (scaled outputs), down_proj (scaled inputs)
        assert {n.split(".")[-3] for n in names if "ia3_l" in n} == {"k_proj", "v_proj", "down_proj"}
    assert all(".default" in n for n in names if n != "q_head.weight")
    check = PolyakCheck(0.1)
    _trainer(tmp_path, max_steps=3, callbacks=[check]).fit(module, datamodule=module_data(module, tiny_data_dir))
    assert module.global_step == 3 and check.moved == [True, True, True]
    unchanged = [n for (n, p), p0 in zip(module._online, online0, strict=True) if torch.equal(p.detach(), p0)]
    assert not unchanged, f"adapter tensors not trained: {unchanged}"
    for n, p in _base(module).items():
        assert torch.equal(p, base0[n]), f"base weight {n} changed"
    # The target adapter is frozen and is not the online one; the online one still trains.
    for (_, o), t in zip(module._online, module.target_params(), strict=True):
        assert o.requires_grad and not t.requires_grad and not torch.equal(o, t)
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if ".default" not in n)


def test_polyak_only_on_optimizer_steps(tmp_path, tiny_data_dir, model_dir, module_data):
    module = _module(model_dir, alpha=0.5)
    check = PolyakCheck(0.5)
    _trainer(tmp_path, max_steps=2, callbacks=[check], accumulate_grad_batches=2).fit(
        module, datamodule=module_data(module, tiny_data_dir))
    assert check.moved == [False, True, False, True]


def test_only_adapters_are_trainable_and_no_second_base(model_dir):
    module = _module(model_dir, "ia3")
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".ia3_l.default" in n for n in trainable)
    # The target network is a second adapter on the same base: no copies of base weights anywhere.
    assert not [n for n, _ in module.named_buffers() if n.startswith("target_")]
    n_adapter = sum(p.numel() for _, p in module._online)
    assert sum(t.numel() for t in module.target_params()) == n_adapter
    # 2 layers x (k: 16 + v: 16 + down_proj input: 64)
    assert n_adapter == 2 * (16 + 16 + 64)


@pytest.mark.parametrize("q_head", ["tokens", "linear"])
def test_target_reads_the_delayed_adapter(tiny_data_dir, model_dir, q_head, make_batch):
    module = _module(model_dir, "ia3", q_head)
    module.eval()
    batch = make_batch(module, tiny_data_dir)
    ids, mask = batch["input_ids"], batch["q_mask"]
    with torch.no_grad():
        q = module.q_values(ids, mask)
        assert q.shape == (int(mask.sum()), 4) and q.dtype == torch.float32
        torch.testing.assert_close(module.q_values(ids, mask, target=True), q, rtol=0, atol=0)
        if q_head == "tokens":  # the paper's readout: the LM logits of the four action words
            logits = module.model(input_ids=ids).logits[mask][:, module.action_ids]
            torch.testing.assert_close(q, logits, rtol=1e-5, atol=1e-5)
        module.target_params()[0].mul_(3.0)  # the first target adapter vector
        q_target = module.q_values(ids, mask, target=True)
        assert (q_target - q).abs().max() > 1e-3
        assert torch.equal(module.q_values(ids, mask), q)  # the online network is untouched
    assert all(p.requires_grad for _, p in module._online)


@pytest.mark.parametrize("q_head", ["tokens", "linear"])
def test_agent_reads_the_training_readout(tiny_data_dir, model_dir, q_head, make_batch):
    """The agent gets Q the way it always does (decoder + output rows at the action ids): equal to training's."""
    module = _module(model_dir, "ia3", q_head)
    with torch.no_grad():
        module.target_params()[0].mul_(2.0)
        if q_head == "linear":
            module.q_head.weight.mul_(1.5)  # the head is not the LM's output rows any more
    module.eval()
    batch = make_batch(module, tiny_data_dir, n=1)
    ids, mask = batch["input_ids"], batch["q_mask"]
    net = module.acting_network()
    rows = net.get_output_embeddings().weight[torch.as_tensor(module.serializer.action_token_ids)]
    with torch.no_grad():
        hidden = net.get_decoder()(input_ids=ids).last_hidden_state[mask]
        torch.testing.assert_close(hidden @ rows.T, module.q_values(ids, mask), rtol=0, atol=0)
    assert net.config is module.model.config


def test_linear_head_starts_as_the_token_readout(tiny_data_dir, model_dir, make_batch):
    tokens, linear = _module(model_dir, q_head="tokens"), _module(model_dir, q_head="linear")
    batch = make_batch(tokens, tiny_data_dir, n=1)
    with torch.no_grad():
        torch.testing.assert_close(linear.q_values(batch["input_ids"], batch["q_mask"]),
                                   tokens.q_values(batch["input_ids"], batch["q_mask"]), rtol=0, atol=0)
    assert linear.q_head.weight.requires_grad and linear.q_head.bias is None


def test_lightning_checkpoint_leaves_out_the_base_and_resumes(tmp_path, tiny_data_dir, model_dir, module_data):
    module = _module(model_dir, "ia3", "linear")
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    trainer.fit(module, datamodule=module_data(module, tiny_data_dir))
    ckpt = tmp_path / "manual.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in state if k in module._frozen_keys]
    assert not [k for k in state if k.endswith(".weight") and "base_layer" in k]
    assert {k for k in state if ".ia3_l." in k} == {k for k in module.state_dict() if ".ia3_l." in k}
    assert {"q_head.weight", "q_head_target"} <= state.keys()
    adapter_bytes = sum(v.numel() * v.element_size() for v in state.values())
    assert adapter_bytes < 10_000  # only vectors and the head; the base is ~100 KB
    # A new module (base rebuilt from the folder) loads it strictly except for the base ...
    other = _module(model_dir, "ia3", "linear")
    other.load_state_dict(state)
    for k, v in module.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    # ... and a checkpoint missing anything that trains is still an error.
    broken = {k: v for k, v in state.items() if k != "q_head_target"}
    with pytest.raises(RuntimeError, match="q_head_target"):
        _module(model_dir, "ia3", "linear").load_state_dict(broken)
    # Lightning resumes from it (optimizer and step included).
    resumed = _module(model_dir, "ia3", "linear")
    _trainer(tmp_path / "resume", max_steps=3).fit(resumed, datamodule=module_data(resumed, tiny_data_dir),
                                                   ckpt_path=str(ckpt))
    assert resumed.global_step == 3
    # ModelCheckpoint wrote the adapter folder beside the checkpoints.
    adapter = next(tmp_path.rglob("adapter"))
    assert (adapter / "adapter_model.safetensors").exists()
    assert (adapter / TARGET / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("q_head", ["tokens", "linear"])
def test_saved_adapter_reloads_with_peft(tmp_path, tiny_data_dir, model_dir, q_head, make_batch, module_data):
    from peft import PeftModel

    module = _module(model_dir, "ia3", q_head)
    _trainer(tmp_path, max_steps=2).fit(module, datamodule=module_data(module, tiny_data_dir))
    module.eval()
    folder = module.save_adapter(tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "IA3"
    batch = make_batch(module, tiny_data_dir)
    ids, mask = batch["input_ids"], batch["q_mask"]
    base = LlamaForCausalLM.from_pretrained(model_dir)
    online = PeftModel.from_pretrained(base, folder).eval()
    target = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), folder / TARGET).eval()
    if q_head == "linear":
        head = load_file(folder / "q_head.safetensors")
        assert head["action_token_ids"].tolist() == module.serializer.action_token_ids.tolist()
        rows, target_rows = head["online"], head["target"]
    else:
        rows = target_rows = base.get_output_embeddings().weight[module.action_ids]
    with torch.no_grad():
        q = online.get_decoder()(input_ids=ids).last_hidden_state[mask] @ rows.T
        q_t = target.get_decoder()(input_ids=ids).last_hidden_state[mask] @ target_rows.T
        torch.testing.assert_close(q, module.q_values(ids, mask), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q_t, module.q_values(ids, mask, target=True), rtol=1e-6, atol=1e-6)
        assert (q - q_t).abs().max() > 1e-4


def test_full_fine_tuning_of_a_pretrained_model(tmp_path, tiny_data_dir, model_dir, module_data):
    module = _module(model_dir, "full", alpha=0.5)
    assert not module._peft and not module._frozen_keys
    assert len(module._online) == len(list(module.model.parameters()))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    check = PolyakCheck(0.5)
    _trainer(tmp_path, max_steps=2, callbacks=[check]).fit(module, datamodule=module_data(module, tiny_data_dir))
    assert check.moved == [True, True]
    assert any(not torch.equal(p.detach(), before[n]) for n, p in module.model.named_parameters())
    with pytest.raises(ValueError, match="no adapter"):
        module.save_adapter(tmp_path / "adapter")


def _shrunk_8b_folder(folder, repo_root) -> str:
    """Llama 3.1 8B's config.json with the sizes shrunk (same GQA ratio 4:1, RoPE llama3 scaling,
    untied head), beside the real Llama 3 tokenizer when fetched, else the word-level one."""
    config = llama31_8b_config()
    real = repo_root / "data/models/llama3-tokenizer/tokenizer.json"
    if real.exists():
        (folder / "tokenizer.json").write_bytes(real.read_bytes())
    else:
        tok = build_tokenizer("llama3")
        tok.save_pretrained(folder)
        config["vocab_size"] = len(tok)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_llama31_8b_shaped_ia3_step(tmp_path, tiny_data_dir, module_data, repo_root):
    """The paper's path on CPU: Llama 3.1 8B's architecture (shrunk), random weights, bf16,
    gradient checkpointing, IA3 on k_proj / v_proj / down_proj, one optimizer step."""
    path = _shrunk_8b_folder(tmp_path, repo_root)
    spec = CausalLM(path=path, format="llama3", init="random", dtype="bfloat16", gradient_checkpointing=True,
                    target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                    config_overrides={"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "num_key_value_heads": 1,
                                      "max_position_embeddings": 4096})
    torch.manual_seed(0)
    # 1,024 tokens: a 100-step episode of the llama3 format is ~1,017.
    module = ICRLModule(pretrained=spec, lr=1e-2, weight_decay=0.01, seq_len=1024,
                        evaluation=EvalProtocol(max_episode_steps=10))
    cfg = module.model.config
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.num_key_value_heads * 4 == cfg.num_attention_heads
    assert module.model.get_decoder().gradient_checkpointing and module.model.training
    assert module.model.get_input_embeddings().weight.dtype == torch.bfloat16
    shapes = {n.split(".")[-3]: tuple(p.shape) for n, p in module._online}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 224)}  # kv 1 head x 16, ffn input
    assert all(p.dtype == torch.float32 for _, p in module._online)  # adapters train in float32
    base0 = _base(module)
    online0 = [p.detach().clone() for _, p in module._online]
    _trainer(tmp_path, max_steps=1).fit(module, datamodule=module_data(module, tiny_data_dir, seq_len=1024))
    assert module.global_step == 1
    assert all(not torch.equal(p.detach(), p0) for (_, p), p0 in zip(module._online, online0, strict=True))
    assert all(torch.equal(p, base0[n]) for n, p in _base(module).items())


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
def test_cli_fit_then_validate_from_a_checkpoint_without_the_base(tmp_path, tiny_data_dir, model_dir, repo_root):
    """The real entry point with ``--model.pretrained.*``: the checkpoint leaves the base out,
    ``validate --ckpt_path`` rebuilds it from the folder and plays exactly as at the end of fit."""
    from icrl_lightning.cli import main

    args = ["-c", str(repo_root / "conf/experiment/quickstart.yaml"),
            "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "root"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--data.data_dir", str(tiny_data_dir), "--data.num_train_maps", "4", "--data.episodes_per_map", "10",
            "--data.seq_len", str(SEQ), "--data.batch_size", "2", "--data.eval_maps", "2",
            "--model.pretrained.path", str(model_dir), "--model.pretrained.format", "compact",
            "--model.q_head", "linear", "--model.lr", "1e-2",
            "--model.evaluation.max_episode_steps", "30", "--model.evaluation.baselines", "false"]
    fit = main(["fit", *args])
    assert fit.trainer.global_step == 2 and fit.model._peft
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not set(state) & fit.model._frozen_keys
    assert (ckpt.parent / "adapter" / "adapter_model.safetensors").exists()
    val = main(["validate", *args, "--ckpt_path", str(ckpt)])
    trained, restored = fit.model.state_dict(), val.model.state_dict()
    assert trained.keys() == restored.keys()
    for k in trained:
        assert torch.equal(trained[k], restored[k]), k
    for agent in ("icrl", "no_context"):
        assert val.model.eval_report["agents"][agent]["per_map"] == fit.model.eval_report["agents"][agent]["per_map"]
