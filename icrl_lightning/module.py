"""``ICRLModule``: a causal LM trained with double DQN over multi-episode token sequences."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_info
from torch.func import functional_call

from icrl_lightning.agent import InContextAgent
from icrl_lightning.backbones import TARGET, CausalLM, TinyLlama, active_adapter, adapter_pairs, is_peft
from icrl_lightning.checks import InputError, check_choice, check_range, config_object, object_config
from icrl_lightning.envs.family import ProblemFamily
from icrl_lightning.envs.frozen_lake import FrozenLake
from icrl_lightning.evaluation.protocol import EvalProtocol
from icrl_lightning.evaluation.runner import Evaluator
from icrl_lightning.objective import CQL, REMOVED, TD, Target, Teacher, without_removed_options
from icrl_lightning.qlearning import (
    action_q_values,
    bellman_loss,
    conservative_penalty,
    double_dqn_targets,
    margin_loss,
    next_step,
    optimal_action_loss,
    polyak_,
    position_weights,
    successful_episode,
)
from icrl_lightning.serialize import Serializer

Q_HEADS = ("tokens", "linear")
OBJECTIVES = ("dqn", "dpt")


class ICRLModule(L.LightningModule):
    """Online network theta and target network phi share every frozen weight:

    * adapters (``pretrained`` with ``adapter: ia3`` or ``lora``): theta = base + adapter
      ``default``, phi = the same base + adapter ``delayed``;
    * full training (``backbone``, or ``adapter: full``): phi = the same module with its weights
      swapped for Polyak-averaged copies (``torch.func.functional_call``).

    After every optimizer step phi <- alpha * theta + (1 - alpha) * phi. Lightning checkpoints hold
    what trains (adapters, heads, targets, optimizer), never the frozen base; with adapters the
    ``adapter/`` folder beside the checkpoints loads with ``PeftModel.from_pretrained``.

    Args:
        backbone: a ``TinyLlama`` trained from scratch (used when ``pretrained`` is not set).
        pretrained: a Hugging Face causal LM (local folder, GGUF file or hub id) with IA3 / LoRA
            adapters or full fine-tuning; replaces ``backbone`` when set.
        q_head: ``tokens`` (paper): Q = the LM logits of the action words (Frozen Lake's four) at
            the action position; ``linear``: a trainable ``hidden -> actions`` layer (online +
            target), initialised from those output-embedding rows (SPEC's alternative readout).
        lr: AdamW learning rate after warm-up (constant afterwards).
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        objective: ``dqn`` (paper): double DQN with ``td``, ``target`` and ``cql``. ``dpt``: the
            Decision-Pretrained Transformer's supervised objective (Lee et al. 2023) instead, the
            published in-context baseline of the bandit literature: at every action position the
            cross-entropy of softmax over the Q readout against the actions optimal for the task
            (the family's ``optimal_actions``, known to the data generator), no TD loss; the
            target network is neither read nor updated; the agent's argmax then picks the action
            most probably optimal given the context. DPT trains on random interaction contexts
            (``data.behaviour.epsilon`` 1). ``td`` and ``target`` are unused, ``cql`` must be null.
        td: the double-DQN loss: ``gamma``, ``reward_scale``, ``loss``, ``conflict_weight``.
        target: the Polyak target network: ``alpha``.
        cql: the conservative penalty (``weight``, ``episodes``); ``null`` (default, paper) = none.
        teacher: the optimistic teacher's large-margin loss (``weight``, ``margin``) beside the TD
            loss, for in-context exploration; ``null`` (default, paper) = none.
        seq_len: trained sequence length (linked from ``data.seq_len``); the default context window
            of the in-context agent.
        evaluation: the in-context evaluation protocol run by ``validate`` and at the end of ``fit``.
        env: the problem family (linked from ``data.env``): its action words are the Q readout, its
            tasks are what the evaluation plays.
        compile: run the training forward passes (online and target network) through
            ``torch.compile``; the evaluation agent plays the eager model (its shapes change at
            every call). ``auto``: compile where ``fit`` runs bf16 autocast on the CPU
            (``trainer.precision: bf16-mixed``, as ``--cpu_bf16 auto`` chooses on a CPU with AMX or
            AVX-512 BF16), where it was measured faster; eager elsewhere (on an AVX2-only CPU it
            was slower in float32). The first step pays the compilation (about 40 s on 2 cores);
            the log says which was chosen. Results and timings: docs/results.md, "Speed and
            memory".
    """

    def __init__(
        self,
        backbone: TinyLlama | None = None,
        pretrained: CausalLM | None = None,
        q_head: str = "tokens",
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        objective: str = "dqn",
        td: TD = TD(),  # noqa: B008 - dataclass defaults: copied below, never shared
        target: Target = Target(),  # noqa: B008
        cql: CQL | None = None,
        teacher: Teacher | None = None,
        seq_len: int = 1024,
        evaluation: EvalProtocol | None = None,
        env: ProblemFamily | None = None,
        compile: bool | Literal["auto"] = False,
    ):
        super().__init__()
        self.env = FrozenLake() if env is None else config_object(env, ProblemFamily, "model.env")
        check_range("model.lr", lr, 0, None, lo_open=True)
        check_range("model.weight_decay", weight_decay, 0, None)
        check_range("model.warmup_steps", warmup_steps, 0, None)
        check_range("model.seq_len", seq_len, 1, None)
        check_choice("model.q_head", q_head, Q_HEADS)
        check_choice("model.objective", objective, OBJECTIVES)
        check_choice("model.compile", compile, (False, True, "auto"))
        self.td, self.target, self.cql = _group(td, TD), _group(target, Target), _group(cql, CQL, optional=True)
        self.teacher = _group(teacher, Teacher, optional=True)
        for group in (self.td, self.target, self.cql, self.teacher):
            if group is not None:
                group.check()
        if objective == "dpt" and self.cql is not None:
            raise InputError("model.cql: the dpt objective has no TD loss to add a penalty to; set model.cql: null")
        if objective == "dpt" and self.teacher is not None:
            raise InputError("model.teacher: the teacher's margin loss sits beside the dqn objective, not dpt; "
                             "set model.teacher: null")
        # Specs are kept as plain dicts in the hyper-parameters (as LightningCLI writes them), so a
        # checkpoint loads with torch.load(weights_only=True); load_from_checkpoint passes them back.
        backbone, pretrained, td, target, cql, teacher = map(_as_dict, (backbone, pretrained, td, target, cql, teacher))
        # The evaluation protocol is not a property of the trained weights: leaving it out of the
        # checkpoint's hyper-parameters lets `validate --ckpt_path ... --model.evaluation.*` change
        # it (LightningCLI applies checkpoint hyper-parameters over the command line).
        self.save_hyperparameters(ignore=["evaluation", "env"])
        self.hparams["env"] = object_config(self.env)
        self.backbone_spec = CausalLM(**pretrained) if pretrained else TinyLlama(**(backbone or {}))
        self.protocol = evaluation or EvalProtocol()
        self.protocol.check()
        self.protocol = self.protocol.for_family(self.env)
        if self.protocol.scenario == "stitching" and not isinstance(self.env, FrozenLake):
            raise InputError(f"model.evaluation.scenario=stitching plays a Frozen Lake map; data.env is "
                             f"{type(self.env).__name__}")
        self.model, self.tokenizer = self.backbone_spec.build(self.env.actions, self.env.reward_values)
        self.serializer = Serializer(self.tokenizer, self.backbone_spec.format, self.backbone_spec.max_tiles,
                                     self.env.actions, self.env.reward_values)
        self._check_vocabulary()
        self.register_buffer("action_ids", torch.as_tensor(self.serializer.action_token_ids), persistent=False)
        self._peft = is_peft(self.model)
        if self._peft:
            online, self._target_adapter = adapter_pairs(self.model)
            names = {id(p): n for n, p in self.model.named_parameters()}
            self._online = [(names[id(p)], p) for p in online]
        else:
            self._online = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self._n_copies = len(self._online)
            for k, (_, p) in enumerate(self._online):
                self.register_buffer(f"target_{k}", p.detach().clone())
        if q_head == "linear":
            rows = self.model.get_output_embeddings().weight.detach()[self.action_ids].float()
            self.q_head = torch.nn.Linear(rows.shape[1], len(rows), bias=False, device=rows.device)
            with torch.no_grad():
                self.q_head.weight.copy_(rows)
            self.register_buffer("q_head_target", rows.clone())
            self._online.append(("q_head.weight", self.q_head.weight))
        targets = {id(t) for t in self.target_params()}
        # Frozen base weights: left out of Lightning checkpoints (rebuilt from the backbone spec).
        self._frozen_keys = {k for k, v in self.state_dict(keep_vars=True).items()
                             if isinstance(v, torch.nn.Parameter) and not v.requires_grad and id(v) not in targets}
        self._step_clock: float | None = None
        # fit's resolved `compile`, and the compiled decoder, made at the first training forward (after
        # the strategy has wrapped the model); kept in a tuple: not a submodule, not saved.
        self._compile = False
        self._compiled: tuple | None = None
        self._eval_outputs: list[dict] = []
        self.evaluator = Evaluator(self.protocol, self.env)
        self.eval_report: dict | None = None

    def _check_vocabulary(self) -> None:
        rows = self.model.get_input_embeddings().num_embeddings
        used = self.serializer.max_id
        if used >= rows:
            raise InputError(f"the tokenizer writes id {used} but the model has only {rows} "
                             "embedding rows: the tokenizer does not belong to this model")

    def setup(self, stage: str) -> None:
        self.check_agent()
        if stage == "fit":
            self._compile = self.resolve_compile()

    def resolve_compile(self) -> bool:
        """``compile`` resolved for this fit (``auto``: bf16 autocast on the CPU); logged."""
        choice = self.hparams.get("compile", False)
        if choice != "auto":
            return bool(choice)
        trainer = self._trainer
        on_cpu = trainer is not None and isinstance(trainer.accelerator, CPUAccelerator)
        precision = str(trainer.precision) if trainer is not None else ""
        use = on_cpu and precision == "bf16-mixed"
        rank_zero_info(f"model.compile auto: {'torch.compile' if use else 'eager'} training forward passes "
                       f"({'CPU' if on_cpu else 'not a CPU run'}, precision {precision or 'unknown'})")
        return use

    def check_agent(self) -> None:
        """Refuse a context window too small for the evaluation (``InputError``) before any work."""
        self._agent()

    def _agent(self) -> InContextAgent:
        p = self.protocol
        window = p.max_context or self.hparams.seq_len
        limit = self.backbone_spec.max_context
        if limit and window > limit:
            raise InputError(f"evaluation max_context={window} tokens (0 = data.seq_len) exceeds the model's "
                             f"max_position_embeddings={limit}")
        return InContextAgent(self.acting_network(), self.serializer, window, p.max_episode_steps, self.env,
                              draft_budget=p.draft_budget)

    def acting_network(self):
        """What the in-context agent plays with: ``get_decoder()`` is the online network and
        ``get_output_embeddings().weight[action_token_ids]`` its Q readout rows, as in training."""
        if self.hparams.q_head == "linear":
            return _LinearHeadNetwork(self.model, self.q_head, self.serializer.action_token_ids)
        return self.model

    # --- Q-values ---------------------------------------------------------------------------------
    def target_params(self) -> list[torch.Tensor]:
        """The target network's trained tensors, in the order of ``self._online``."""
        if self._peft:
            targets = list(self._target_adapter)
        else:
            targets = [getattr(self, f"target_{k}") for k in range(self._n_copies)]
        if self.hparams.q_head == "linear":
            targets.append(self.q_head_target)
        return targets

    def _swap(self) -> dict[int, torch.Tensor]:
        """Full training: id of each trained weight -> its Polyak copy."""
        return dict(zip((id(p) for _, p in self._online), self.target_params(), strict=True))

    def _hidden(self, input_ids: torch.Tensor, target: bool) -> torch.Tensor:
        decoder = self.model.get_decoder()
        # In training, the compiled decoder where `compile` chose it; in eval mode the eager one.
        run = decoder
        if self._compile and self.training:
            if self._compiled is None:
                self._compiled = (torch.compile(decoder),)
            run = self._compiled[0]
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if not target:
            return run(**kwargs).last_hidden_state
        with _eval_mode(self.model):  # the target is a fixed function: no (LoRA) dropout
            if self._peft:
                with active_adapter(self.model, TARGET):
                    return run(**kwargs).last_hidden_state
            swap = self._swap()
            # The compiled wrapper resolves the decoder's own names (its attributes are the decoder's).
            params = {n: swap[id(p)] for n, p in decoder.named_parameters() if id(p) in swap}
            return functional_call(run, params, (), kwargs, strict=False).last_hidden_state

    def _head_rows(self, target: bool) -> torch.Tensor:
        """``[actions, d]``: the rows whose products with a hidden state are Q(., action) (Frozen
        Lake: left/down/right/up)."""
        if self.hparams.q_head == "linear":
            return self.q_head_target if target else self.q_head.weight
        weight = self.model.get_output_embeddings().weight
        if target and not self._peft:
            weight = self._swap().get(id(weight), weight)
        return weight[self.action_ids]

    def q_values(self, input_ids: torch.Tensor, q_mask: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Q(context, .) at every action position of the batch, ``[N, actions]`` float32, row-major order;
        ``target=True`` reads the target network."""
        hidden = self._hidden(input_ids, target)[q_mask]
        return action_q_values(hidden, self._head_rows(target))

    # --- training -----------------------------------------------------------------------------------
    @property
    def batch_fields(self) -> frozenset[str]:
        """The extra batch fields (``data.stream.BATCH_FIELDS``) this objective reads."""
        if self.hparams.objective == "dpt":
            return frozenset({"optimal"})
        return frozenset(({"conflict"} if self.td.conflict_weight != 1 else set())
                         | ({"teacher"} if self.teacher is not None else set()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        td, cql, q_mask = self.td, self.cql, batch["q_mask"]
        q = self.q_values(batch["input_ids"], q_mask)
        bs = batch["input_ids"].shape[0]
        if self.hparams.objective == "dpt":
            loss, hit = optimal_action_loss(q, batch["optimal"][q_mask])
            self._check_finite(loss, "DPT")
            self._log_step(batch)
            self.log("train/dpt_loss", loss, prog_bar=True, batch_size=bs)
            self.log("train/dpt_accuracy", hit, batch_size=bs)
            return loss
        with torch.no_grad():
            q_target = self.q_values(batch["input_ids"], q_mask, target=True)
        action, reward, done = batch["action"][q_mask], batch["reward"][q_mask], batch["done"][q_mask]
        q_taken = q.gather(1, action[:, None]).squeeze(1)
        # y = scale * r + gamma * Q_target(next, argmax_a Q_online(next, a)), no bootstrap past an episode end
        y = double_dqn_targets(reward, done, next_step(q.detach()), next_step(q_target), td.gamma, td.reward_scale)
        weight = position_weights(batch["conflict"][q_mask], td.conflict_weight) if td.conflict_weight != 1 else None
        td_loss = bellman_loss(q_taken, y, td.loss, q_mask.nonzero()[:, 0], weight)
        loss = td_loss
        if cql is not None:
            where = successful_episode(reward, done) if cql.episodes == "successful" else None
            penalty = conservative_penalty(q, action, where, weight)
            loss = td_loss + cql.weight * penalty
        if self.teacher is not None:
            labels = batch["teacher"][q_mask]
            margin, hit = margin_loss(q, labels, self.teacher.margin * td.reward_scale)
            loss = loss + self.teacher.weight * margin
        self._check_finite(loss, "TD")
        self._log_step(batch)
        self.log("train/td_loss", td_loss, prog_bar=True, batch_size=bs)
        if cql is not None:
            self.log("train/cql_penalty", penalty.detach(), batch_size=bs)
        if self.teacher is not None:
            self.log("train/teacher_loss", margin.detach(), batch_size=bs)
            self.log("train/teacher_accuracy", hit, batch_size=bs)
            self.log("train/teacher_share", labels.any(dim=-1).float().mean(), batch_size=bs)
        self.log("train/q_mean", q_taken.detach().mean(), batch_size=bs)
        self.log("train/target_mean", y.mean(), batch_size=bs)
        if "conflict" in batch:
            self.log("train/conflict_share", batch["conflict"][q_mask].float().mean(), batch_size=bs)
        return loss

    def _check_finite(self, loss: torch.Tensor, what: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {what} loss ({loss.item()}) at global step {self.global_step}; "
                                     "the last checkpoint is untouched")

    def _log_step(self, batch: dict) -> None:
        now = time.perf_counter()
        if self._step_clock is not None:
            self.log("train/tokens_per_s", batch["input_ids"].numel() / (now - self._step_clock), on_step=True)
        self._step_clock = now
        self.log("train/packing", batch["n_tokens"].sum() / batch["input_ids"].numel(),
                 batch_size=batch["input_ids"].shape[0])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.hparams.objective == "dpt":
            return  # no target network to follow: the DPT loss never reads it
        polyak_(self.target_params(), [p for _, p in self._online], self.target.alpha)

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW([p for _, p in self._online], lr=h.lr, weight_decay=h.weight_decay)
        warm = max(1, h.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints: only what was trained ----------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, for checkpoints of older versions too: a settings group that saved an option
        removed since is handed over without it (``objective.without_removed``: an error if the run
        used it)."""
        if isinstance(checkpoint_path, (str, Path)):
            saved = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True, mmap=True)
            hparams = saved.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
            kwargs = {k: v for k, v in without_removed_options(hparams).items() if k in REMOVED} | kwargs
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in self._frozen_keys:
            state.pop(key, None)
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        folder = getattr(callback, "dirpath", None)
        if self._peft and folder and self.trainer.is_global_zero:
            self.save_adapter(Path(folder) / "adapter")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but the frozen base may be absent (Lightning checkpoints
        leave it out: it is rebuilt from the backbone spec); any other missing key is an error."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in self._frozen_keys]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                               f"missing keys {missing}, unexpected keys {result.unexpected_keys}")
        return result

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the online adapter (``folder/``) and the target adapter (``folder/delayed/``) in
        peft's safetensors format (``PeftModel.from_pretrained(base, folder)`` loads the online one),
        and with ``q_head: linear`` the head's online and target rows (``folder/q_head.safetensors``)."""
        if not self._peft:
            raise ValueError("save_adapter: there is no adapter in full training; the Lightning checkpoint "
                             "holds every trained weight")
        from safetensors.torch import save_file

        folder = Path(folder)
        self.model.save_pretrained(str(folder))
        if self.hparams.q_head == "linear":
            save_file({"online": self.q_head.weight.detach().cpu().contiguous(),
                       "target": self.q_head_target.detach().cpu().contiguous(),
                       "action_token_ids": self.action_ids.cpu()}, str(folder / "q_head.safetensors"))
        return folder

    # --- in-context evaluation (the validation loop) ---------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    def validation_step(self, batch: list[tuple[int, tuple[str, ...]]], batch_idx: int) -> None:
        self._eval_outputs.append(self.evaluator.run(self._agent(), batch))

    def on_validation_epoch_end(self) -> None:
        outputs = self._eval_outputs
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = [o for rank in gathered for o in rank]
        if not outputs:
            return
        metrics, self.eval_report = self.evaluator.finish(outputs, int(self.global_step))
        for name, value in metrics.items():
            self.log(name, value, rank_zero_only=True, sync_dist=False)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _as_dict(spec) -> dict | None:
    return dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else spec


def _group(value, cls, optional: bool = False):
    """A settings group (a fresh copy) from a dataclass instance, a dict (checkpoint
    hyper-parameters) or None."""
    if value is None:
        return None if optional else cls()
    return cls(**value) if isinstance(value, dict) else dataclasses.replace(value)


class _ActionRows:
    """``rows[action_token_ids]`` -> the linear Q-head's rows in action order, in the decoder's dtype."""

    def __init__(self, weight: torch.Tensor, action_token_ids, dtype: torch.dtype):
        self.weight, self.dtype = weight, dtype
        self.index = {int(t): a for a, t in enumerate(action_token_ids)}

    def __getitem__(self, ids) -> torch.Tensor:
        order = [self.index[int(t)] for t in torch.as_tensor(ids).flatten()]
        return self.weight[order].to(self.dtype)


class _LinearHeadNetwork:
    """The online network with a linear Q-head, shaped like a causal LM for the agent:
    ``get_output_embeddings().weight[action_token_ids]`` are the head's rows."""

    def __init__(self, model, q_head: torch.nn.Linear, action_token_ids):
        self.model, self.config = model, model.config
        dtype = model.get_input_embeddings().weight.dtype
        self._rows = SimpleNamespace(weight=_ActionRows(q_head.weight, action_token_ids, dtype))

    def get_decoder(self):
        return self.model.get_decoder()

    def get_output_embeddings(self):
        return self._rows
