"""Backbones: (causal LM, tokenizer) pairs and the adapters that are trained on them.

* ``TinyLlama``: a Llama built from a ``LlamaConfig`` with a word-level tokenizer made in code for
  the chosen format; every weight trains (the target network is a set of Polyak-averaged copies).
* ``CausalLM``: any Hugging Face causal LM from a local folder, a hub id or a GGUF file, with peft
  adapters (IA3, LoRA) or full fine-tuning. With adapters, the target network is a second adapter
  ``"delayed"`` on the same frozen base.

Nothing is downloaded unless a hub id is given (and the hub is reachable).
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from icrl_lightning.checks import InputError, MissingInputFile
from icrl_lightning.envs.frozen_lake import ACTIONS
from icrl_lightning.serialize import FORMATS, REWARD_VALUES, format_vocabulary

ONLINE, TARGET = "default", "delayed"  # peft adapter names of the online and the target network
ADAPTERS = ("ia3", "lora", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")

# The paper's model (meta-llama/Llama-3.1-8B-Instruct, config.json): builds it with random weights
# (tools/fetch_models.py writes it to data/models/llama31-8b-config/ beside the Llama 3 tokenizer).
_LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


def llama31_8b_config() -> dict:
    """A fresh copy of Llama 3.1 8B's ``config.json`` (transformers edits nested dicts it is given)."""
    return copy.deepcopy(_LLAMA31_8B_CONFIG)


def build_tokenizer(format: str, max_tiles: int = 64, actions: tuple[str, ...] = ACTIONS,
                    reward_values: tuple[float, ...] = REWARD_VALUES) -> PreTrainedTokenizerFast:
    """A word-level tokenizer holding ``format``'s special tokens and one id per field value (the
    problem family's ``actions`` and ``reward_values``; defaults: Frozen Lake's)."""
    if format not in FORMATS:
        raise InputError(f"format={format!r}: choose one of {sorted(FORMATS)}")
    fmt = FORMATS[format]
    specials, words = format_vocabulary(fmt, max_tiles, actions, reward_values)
    vocab = {tok: i for i, tok in enumerate(["<unk>", *specials, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token=fmt.pad)


@dataclass
class TinyLlama:
    """A Llama trained from scratch (all weights train). Sizes are YAML options.

    Args:
        format: serialization, ``compact`` (one token per field), ``compact_outcome`` (compact, but
            an episode that reached no goal starts with ``<ep->`` and writes its tiles as ``x{tile}``;
            the evaluation agent rewrites an episode it played once it failed) or ``llama3`` (the
            paper's).
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads (``hidden_size`` must divide by it).
        intermediate_size: MLP width.
        max_position_embeddings: longest context the model is built for.
        max_tiles: largest map (tiles) the tokenizer can write.
        attn_implementation: ``sdpa`` or ``eager``.
    """

    format: str = "compact"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    max_tiles: int = 64
    attn_implementation: str = "sdpa"

    adapter = "full"

    def build(self, actions: tuple[str, ...] = ACTIONS, reward_values: tuple[float, ...] = REWARD_VALUES,
              ) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
        """The model and its tokenizer, which writes the problem family's ``actions`` and
        ``reward_values`` (defaults: Frozen Lake's) as one token each."""
        if self.hidden_size % self.num_heads:
            raise InputError(f"model.backbone.hidden_size={self.hidden_size} must be a multiple of "
                             f"num_heads={self.num_heads}")
        tokenizer = build_tokenizer(self.format, self.max_tiles, actions, reward_values)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=False,
        )
        config._attn_implementation = self.attn_implementation
        model = LlamaForCausalLM(config)
        return model, tokenizer

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CausalLM:
    """A Hugging Face causal LM (e.g. SmolLM2-135M-Instruct, Llama 3.1 8B Instruct) with adapters.

    Args:
        path: a local model folder, a ``.gguf`` file, or a hub id (``org/name``; only a hub id
            may download). Default: SmolLM2-135M-Instruct where ``tools/fetch_models.py`` puts it
            (with the Llama 3 tokenizer and the Llama 3.1 8B config) under ``data/models/``.
        gguf_file: a GGUF file name inside ``path`` (a folder or hub repository); not needed when
            ``path`` is the ``.gguf`` file itself. GGUF weights are de-quantized on load.
        tokenizer: where the tokenizer is when it is not with the model: a folder or a
            ``tokenizer.json`` file. Default: load it from ``path``.
        format: serialization: ``chatml`` (SmolLM2, Qwen) or ``llama3`` (the paper's Llama 3 headers).
        init: ``pretrained`` (load the weights) or ``random`` (build the architecture from
            ``path``'s ``config.json`` with random weights: the 8B-shaped path, nothing downloaded).
        config_overrides: config fields to change before building, e.g. ``{num_hidden_layers: 2}``.
        dtype: weights of the base model: ``float32``, ``bfloat16`` or ``float16`` (adapters stay float32).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` (needs ``flash-attn``), ...
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant).
        trust_remote_code: let transformers run model code shipped with the checkpoint.
        adapter: ``ia3`` (paper), ``lora``, or ``full`` (every weight trains; the target network is
            then a full Polyak copy).
        target_modules: modules the adapter wraps; default: peft's for the architecture (Llama IA3:
            ``k_proj``, ``v_proj``, ``down_proj``; LoRA: ``q_proj``, ``v_proj``).
        feedforward_modules: IA3 modules scaled on their input (default for Llama: ``down_proj``);
            must be among ``target_modules``.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / lora_r).
        lora_dropout: LoRA dropout.
        max_tiles: largest map (tiles) the serializer prepares.
    """

    path: str = "data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_file: str | None = None
    tokenizer: str | None = None
    format: str = "chatml"
    init: str = "pretrained"
    config_overrides: dict | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    adapter: str = "ia3"
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    max_tiles: int = 64

    def __post_init__(self) -> None:
        self._max_positions: int | None = None

    def check(self) -> None:
        """Raise ``InputError`` (a ``ValueError``) naming the option for a value that cannot work."""
        choices = {"format": (self.format, tuple(FORMATS)), "init": (self.init, ("pretrained", "random")),
                   "dtype": (self.dtype, tuple(DTYPES)), "adapter": (self.adapter, ADAPTERS),
                   "attn_implementation": (self.attn_implementation, ATTENTION)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise InputError(f"model.pretrained.{key}={value!r}: choose one of {list(allowed)}")
        if self.lora_r < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise InputError(f"model.pretrained: lora_r={self.lora_r} must be >= 1 and "
                             f"lora_dropout={self.lora_dropout} in [0, 1)")
        if self.feedforward_modules and self.adapter != "ia3":
            raise InputError("model.pretrained.feedforward_modules applies to adapter=ia3 only")
        if self.feedforward_modules and self.target_modules:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise InputError(f"model.pretrained.feedforward_modules {sorted(extra)} are not in "
                                 f"target_modules {self.target_modules}")

    # --- where the files are ------------------------------------------------------------------
    def _source(self) -> tuple[str, str | None]:
        """(folder or hub id, GGUF file name or None); a local path that does not exist is an error
        naming it, not a hub lookup."""
        path, gguf = self.path, self.gguf_file
        if path.endswith(".gguf"):
            if gguf:
                raise InputError(f"model.pretrained: path={path!r} is a .gguf file and gguf_file={gguf!r} is set too")
            local = Path(path).expanduser()
            if not local.is_file():
                raise MissingInputFile(_missing(path, "GGUF file", "path"))
            return str(local.parent), local.name
        local = Path(path).expanduser()
        if local.exists():
            if not local.is_dir():
                raise InputError(f"model.pretrained.path={path!r} is a file: give a model folder or a .gguf file")
            if gguf and not (local / gguf).is_file():
                raise MissingInputFile(_missing(str(local / gguf), "GGUF file", "gguf_file"))
            if not gguf and not (local / "config.json").is_file():
                raise MissingInputFile(f"model.pretrained.path={path!r} has no config.json: not a model folder")
            return str(local), gguf
        if not _HUB_ID.match(path) or path.startswith(("data/", "runs/", "models/")):
            raise MissingInputFile(_missing(path, "model folder", "path"))
        return path, gguf  # a hub id: from the local cache, or downloaded where the hub is reachable

    def _kwargs(self) -> dict:
        return {"trust_remote_code": self.trust_remote_code}

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.tokenizer:
            tok = Path(self.tokenizer).expanduser()
            if tok.is_file() and tok.suffix == ".json":
                return PreTrainedTokenizerFast(tokenizer_file=str(tok))
            if not tok.is_dir():
                raise MissingInputFile(_missing(self.tokenizer, "tokenizer (a folder or tokenizer.json)", "tokenizer"))
            return AutoTokenizer.from_pretrained(str(tok), **self._kwargs())
        where, gguf = self._source()
        return _hub_call(self.path, AutoTokenizer.from_pretrained, where, gguf_file=gguf, **self._kwargs())

    def load_config(self):
        """The model's config with ``config_overrides`` applied before it is built (so derived
        fields such as ``head_dim`` follow a changed ``hidden_size`` unless the file sets them)."""
        from transformers import AutoConfig, PreTrainedConfig

        where, gguf = self._source()
        config = _hub_call(self.path, AutoConfig.from_pretrained, where, gguf_file=gguf, **self._kwargs())
        overrides = dict(self.config_overrides or {})
        if not overrides:
            return config
        unknown = sorted(k for k in overrides if not hasattr(config, k))
        if unknown:
            raise InputError(f"model.pretrained.config_overrides: {type(config).__name__} has no field(s) {unknown}")
        raw, _ = _hub_call(self.path, PreTrainedConfig.get_config_dict, where, gguf_file=gguf)
        return type(config).from_dict({**raw, **overrides})

    def load_model(self, config=None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        where, gguf = self._source()
        config = config or self.load_config()
        common = {"dtype": DTYPES[self.dtype], "attn_implementation": self.attn_implementation, **self._kwargs()}
        if self.init == "random":
            model = AutoModelForCausalLM.from_config(config, **common)
        else:
            model = _hub_call(self.path, AutoModelForCausalLM.from_pretrained, where, gguf_file=gguf, config=config,
                              **common)
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        if self.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        return model

    def build(self, actions: tuple[str, ...] = ACTIONS, reward_values: tuple[float, ...] = REWARD_VALUES,
              ) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
        """(model, tokenizer): the base with the online adapter ``default`` (trainable) and the
        target adapter ``delayed`` (frozen, equal to it), or the bare model for ``adapter=full``.
        The tokenizer is the model's own (``actions`` and ``reward_values`` are the same for every
        pretrained model; the serializer checks that each action word is one token)."""
        self.check()
        config = self.load_config()  # first: a folder without a model fails before anything loads
        tokenizer = self.load_tokenizer()
        model = self.load_model(config)
        # from_pretrained returns eval mode; activation checkpointing (and dropout) act in train mode only.
        model.train()
        if self.adapter == "full":
            return model, tokenizer
        return add_adapters(model, self.peft_config()), tokenizer

    def peft_config(self):
        from peft import IA3Config, LoraConfig

        if self.adapter == "ia3":
            return IA3Config(task_type="CAUSAL_LM", target_modules=self.target_modules,
                             feedforward_modules=self.feedforward_modules)
        return LoraConfig(task_type="CAUSAL_LM", target_modules=self.target_modules, r=self.lora_r,
                          lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)

    @property
    def max_context(self) -> int | None:
        """The model's ``max_position_embeddings`` (known once it was loaded)."""
        return self._max_positions


def _missing(path: str, what: str, key: str) -> str:
    return (f"model.pretrained.{key}: {what} {path!r} does not exist (nothing is downloaded for a local path). "
            "For SmolLM2 and the Llama 3 tokenizer run: python tools/fetch_models.py")


def _hub_call(path: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a transformers loader): a failure names ``model.pretrained.path``
    and says what is missing, not the HTTP or file-system traceback."""
    try:
        return fn(*args, **kwargs)
    except InputError:
        raise
    except OSError as err:  # transformers raises OSError (or subclasses) for missing files, repos and offline hubs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(path).expanduser().exists():
            raise MissingInputFile(f"model.pretrained.path={path!r}: {first}") from err
        raise MissingInputFile(f"model.pretrained.path={path!r}: not a local folder and not loadable as a hub id "
                               f"({first}). Give a local path, or run python tools/fetch_models.py") from err
    except Exception as err:  # noqa: BLE001 - a damaged file fails deep inside gguf / safetensors / json readers
        if not Path(path).expanduser().exists():
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise InputError(f"model.pretrained.path={path!r} is not a readable model ({type(err).__name__}: {first})") \
            from err


# --- adapters: online "default" and target "delayed" on one frozen base -------------------------------
def add_adapters(model: torch.nn.Module, config) -> torch.nn.Module:
    """Wrap ``model`` in peft with the online adapter ``default`` and a target adapter ``delayed``
    that starts equal to it. Only ``default`` is trainable; the base is frozen."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config, adapter_name=ONLINE)
    peft_model.add_adapter(TARGET, config)
    peft_model.set_adapter(ONLINE)
    online, target = adapter_pairs(peft_model)
    with torch.no_grad():
        for o, t in zip(online, target, strict=True):
            t.copy_(o)
    return peft_model


def adapter_pairs(peft_model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(online adapter tensors, the matching target adapter tensors), in the same order."""
    params = dict(peft_model.named_parameters())
    online, target = [], []
    for name, p in params.items():
        parts = name.split(".")
        if TARGET not in parts:
            continue
        twin = ".".join(ONLINE if part == TARGET else part for part in parts)
        if twin not in params:
            raise RuntimeError(f"target adapter tensor {name} has no online twin {twin}")
        online.append(params[twin])
        target.append(p)
    if not online:
        raise RuntimeError("the model has no target adapter tensors (was add_adapters applied?)")
    return online, target


@contextmanager
def active_adapter(peft_model: torch.nn.Module, name: str):
    """Run the forward passes inside with adapter ``name`` (frozen); the online adapter is active,
    and the only trainable one, again afterwards."""
    peft_model.set_adapter(name, inference_mode=True)
    try:
        yield peft_model
    finally:
        peft_model.set_adapter(ONLINE)


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
