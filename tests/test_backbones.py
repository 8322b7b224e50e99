"""Backbones: where models come from (folders, GGUF files, hub ids), clear errors for missing files,
option checks, the Llama 3.1 8B config, the paper's config, and SmolLM2 from its GGUF file."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from icrl_lightning.backbones import CausalLM, TinyLlama, add_adapters, llama31_8b_config
from icrl_lightning.episodes import Episode
from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.module import ICRLModule

SMOLLM2 = "data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"  # under the repository root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_model):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("path", ["data/models/no-such-model", "/nonexistent/folder", "./relative/model",
                                  "data/models/missing/SmolLM2.Q4_1.gguf", "missing.gguf"])
def test_missing_local_model_names_the_path(path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        CausalLM(path=path).build()
    assert repr(path) in str(err.value) and "fetch_models.py" in str(err.value)


def test_missing_gguf_file_in_a_folder(model_dir):
    with pytest.raises(FileNotFoundError, match="model.Q4.gguf"):
        CausalLM(path=str(model_dir), gguf_file="model.Q4.gguf").build()


def test_a_folder_without_a_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json") as err:
        CausalLM(path=str(tmp_path)).build()
    assert repr(str(tmp_path)) in str(err.value)


def test_a_file_that_is_not_gguf_is_refused(model_dir):
    with pytest.raises(ValueError, match="is a file"):
        CausalLM(path=str(model_dir / "config.json")).build()


def test_unreachable_hub_id_names_the_path(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the lookup fail at once instead of retrying the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="'no-such-org-x/no-such-model-y': not a local folder"):
        CausalLM(path="no-such-org-x/no-such-model-y", format="llama3").build()


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"format": "vicuna"}, "format"), ({"adapter": "dora"}, "adapter"), ({"dtype": "float8"}, "dtype"),
    ({"attn_implementation": "paged"}, "attn_implementation"), ({"init": "zeros"}, "init"),
    ({"feedforward_modules": ["down_proj"], "target_modules": ["k_proj"]}, "feedforward_modules"),
    ({"adapter": "lora", "feedforward_modules": ["down_proj"]}, "feedforward_modules"),
    ({"lora_r": 0}, "lora_r"),
])
def test_bad_options_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        CausalLM(**kwargs).check()


def test_local_folder_loads_without_network(model_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tok = CausalLM(path=str(model_dir), format="compact", adapter="full").build()
    assert model.training  # from_pretrained returns eval mode; training needs train mode
    assert tok.convert_ids_to_tokens(tok.encode("o3", add_special_tokens=False)) == ["o3"]
    assert CausalLM(path=str(model_dir)).trust_remote_code is False


def test_separate_tokenizer_file_or_folder(model_dir, tmp_path):
    spec = CausalLM(path=str(model_dir), tokenizer=str(model_dir / "tokenizer.json"), format="compact")
    assert spec.load_tokenizer().encode("o7 right", add_special_tokens=False) == \
        CausalLM(path=str(model_dir), format="compact").load_tokenizer().encode("o7 right", add_special_tokens=False)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        CausalLM(path=str(model_dir), tokenizer=str(tmp_path / "nope.json")).load_tokenizer()


def test_config_overrides_are_applied_before_the_model_is_built(model_dir):
    spec = CausalLM(path=str(model_dir), format="compact", init="random", adapter="full",
                    config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                                      "num_key_value_heads": 1, "intermediate_size": 24})
    model, _ = spec.build()
    assert len(model.model.layers) == 1 and model.config.head_dim == 8  # derived field follows
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 16)
    with pytest.raises(ValueError, match="no_such_field"):
        CausalLM(path=str(model_dir), config_overrides={"no_such_field": 1}).build()


def test_random_init_does_not_read_the_weights(model_dir):
    torch.manual_seed(1)
    random_model, _ = CausalLM(path=str(model_dir), format="compact", init="random", adapter="full").build()
    loaded, _ = CausalLM(path=str(model_dir), format="compact", adapter="full").build()
    assert random_model.config.hidden_size == loaded.config.hidden_size
    assert not torch.equal(random_model.model.layers[0].mlp.up_proj.weight, loaded.model.layers[0].mlp.up_proj.weight)


def test_tokenizer_of_another_model_is_refused(model_dir, tmp_path):
    # A llama3-format word-level tokenizer has ids beyond this model's (compact) vocabulary.
    from icrl_lightning.backbones import build_tokenizer

    build_tokenizer("llama3").save_pretrained(tmp_path)
    spec = CausalLM(path=str(model_dir), tokenizer=str(tmp_path), format="llama3")
    with pytest.raises(ValueError, match="embedding rows"):
        ICRLModule(pretrained=spec, seq_len=256, evaluation=EvalProtocol(max_episode_steps=10))


def test_evaluation_window_beyond_the_models_positions_is_refused(model_dir):
    spec = CausalLM(path=str(model_dir), format="compact")  # max_position_embeddings=256
    module = ICRLModule(pretrained=spec, seq_len=256, evaluation=EvalProtocol(max_context=512, max_episode_steps=10))
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        module.setup("fit")


def test_llama31_8b_config_is_the_8b_model():
    """The config builds Llama 3.1 8B's 8.03 B parameters (on the meta device: no memory), and the
    paper's IA3 adds 32 x (1,024 + 1,024 + 14,336) trainable values."""
    from peft import IA3Config
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**llama31_8b_config()))
        assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
        peft_model = add_adapters(model, IA3Config(task_type="CAUSAL_LM"))  # peft's Llama defaults
    trainable = {n.split(".")[-3]: p.shape for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {"k_proj": (1024, 1), "v_proj": (1024, 1), "down_proj": (1, 14336)}
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 32 * (1024 + 1024 + 14336)


def test_fetched_8b_config_matches_the_code(repo_root):
    path = repo_root / "data/models/llama31-8b-config/config.json"
    if not path.exists():
        pytest.skip("not fetched: python tools/fetch_models.py --only llama31-8b-config")
    assert json.loads(path.read_text()) == llama31_8b_config()


def test_paper_config_holds_the_paper_hyperparameters(repo_root):
    cfg = yaml.safe_load((repo_root / "conf/experiment/paper_llama31_8b.yaml").read_text())
    m, d, t = cfg["model"], cfg["data"], cfg["trainer"]
    p = m["pretrained"]
    assert (p["adapter"], p["format"], p["dtype"], p["gradient_checkpointing"]) == ("ia3", "llama3", "bfloat16", True)
    assert p["target_modules"] == ["k_proj", "v_proj", "down_proj"] and p["feedforward_modules"] == ["down_proj"]
    assert (m["lr"], m["warmup_steps"], m["weight_decay"]) == (1.0e-2, 10, 0.01)
    assert (m["target"]["alpha"], m["td"]["gamma"], m["td"]["reward_scale"], m["q_head"]) == (0.1, 0.9, 30.0, "tokens")
    # The paper's objective: plain MSE double DQN, every position weighed alike, no penalty.
    assert (m["td"]["loss"], m["td"]["conflict_weight"], m["cql"]) == ("mse", 1.0, None)
    assert (d["batch_size"], t["accumulate_grad_batches"], d["seq_len"]) == (5, 2, 4096)
    assert t["precision"] == "bf16-mixed" and 900 <= t["max_steps"] <= 1000
    assert (d["set_size_min"], d["set_size_max"], d["num_train_maps"]) == (20, 40, 250)


def test_smollm2_config_layers_on_the_quickstart(print_config, repo_root):
    config = print_config(["fit", "-c", str(repo_root / "conf/experiment/quickstart.yaml"),
                           "-c", str(repo_root / "conf/model/smollm2_135m_ia3.yaml"), "--print_config"])
    model = config["model"]
    assert model["pretrained"]["path"] == SMOLLM2 and model["pretrained"]["adapter"] == "ia3"
    # Model settings only: the experiment's objective is kept.
    assert model["td"]["conflict_weight"] == 10.0 and model["cql"] == {"weight": 10.0, "episodes": "successful"}


def test_tiny_backbone_is_full_training():
    assert TinyLlama().adapter == "full"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_smollm2_gguf_loads_serializes_chatml_and_trains_one_ia3_step(tiny_data_dir, tiny_datamodule, repo_root):
    """The real pretrained path on CPU (~1 minute: the GGUF file is de-quantized on load)."""
    gguf = repo_root / SMOLLM2
    if not gguf.exists():
        pytest.skip("SmolLM2 not fetched: python tools/fetch_models.py --only smollm2")
    spec = CausalLM(path=str(gguf), format="chatml", adapter="ia3")
    torch.manual_seed(0)
    module = ICRLModule(pretrained=spec, lr=1e-2, seq_len=2048,
                        evaluation=EvalProtocol(max_context=2688, max_episode_steps=100))
    cfg = module.model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == \
        ("llama", 576, 30, 8192)
    s, tok = module.serializer, module.tokenizer
    # ChatML roles with SmolLM2's own special tokens; the four action words are one token each.
    assert tok.convert_ids_to_tokens(s.action_token_ids.tolist()) == ["left", "down", "right", "up"]
    enc = s.encode(Episode([0, 1, 5], [2, 1], [0.0, 1.0], terminated=True, truncated=False))
    toks = tok.convert_ids_to_tokens(enc.ids.tolist())
    assert "".join(toks).replace("Ċ", "\n") == (
        "<|im_start|>observation\n0<|im_end|>\n<|im_start|>action\nright<|im_end|>\n"
        "<|im_start|>observation\n1<|im_end|>\n<|im_start|>action\ndown<|im_end|>\n"
        "<|im_start|>observation\n5<|im_end|>\n<|im_start|>reward\n1.0<|im_end|>\n<|endoftext|>")
    assert toks[:3] == ["<|im_start|>", "observation", "Ċ"] and toks.count("<|im_start|>") == 6
    assert [toks[q - 1] for q in enc.q_pos] == ["action", "action"]
    assert enc.ids.tolist() == tok.encode("".join(toks).replace("Ċ", "\n"), add_special_tokens=False)
    # Every role word is one token.
    for role in ("observation", "action", "reward", "edit"):
        assert len(tok.encode(role, add_special_tokens=False)) == 1, role
    # One IA3 optimizer step: the adapter moves, the base does not.
    dm = tiny_datamodule(tiny_data_dir, s, module.batch_fields, seq_len=2048, batch_size=1)
    # The first 512 tokens of a packed sequence (a step on 2,048 takes ~40 s on one core).
    batch = {k: v[None, :512] if v.ndim else v[None] for k, v in next(iter(dm.train_stream(num_sequences=1))).items()}
    opt = module.configure_optimizers()["optimizer"]
    adapter0 = [p.detach().clone() for _, p in module._online]
    base0 = module.model.get_decoder().layers[3].mlp.down_proj.base_layer.weight.detach().clone()
    loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p.detach(), a) for (_, p), a in zip(module._online, adapter0, strict=True))
    assert torch.equal(module.model.get_decoder().layers[3].mlp.down_proj.base_layer.weight, base0)
