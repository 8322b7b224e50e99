"""``ICRLModule``: a causal LM trained with double DQN over multi-episode token sequences."""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from torch.func import functional_call

from icrl_lightning.agent import InContextAgent
from icrl_lightning.backbones import TARGET, CausalLM, TinyLlama, active_adapter, adapter_pairs, is_peft
from icrl_lightning.checks import InputError, check_module_args, check_range
from icrl_lightning.evaluation.protocol import EvalProtocol
from icrl_lightning.evaluation.runner import Evaluator
from icrl_lightning.qlearning import (
    action_q_values,
    bellman_loss,
    conservative_penalty,
    double_dqn_targets,
    failure_rewards,
    next_step,
    polyak_,
    successful_episode,
)
from icrl_lightning.serialize import Serializer

Q_HEADS = ("tokens", "linear")
CQL_ON = ("all", "successful")
CQL_TARGETS = ("data", "oracle")


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
        q_head: ``tokens`` (paper): Q = the LM logits of the four action words at the action
            position; ``linear``: a trainable ``hidden -> 4`` layer (online + target), initialised
            from those four output-embedding rows.
        lr: AdamW learning rate after warm-up.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        alpha: Polyak rate of the target network, applied after every optimizer step (SPEC: 0.1).
        gamma: discount (SPEC: 0.9).
        reward_scale: rewards are multiplied by this in the TD target (SPEC: 30).
        loss: ``mse`` (paper) or ``normalized`` (authors' code: squared error / mean target).
        cql_weight: weight of a conservative penalty (CQL(H): ``logsumexp_a Q - Q(a_taken)`` at
            every action position) added to the TD loss; 0 (default, paper) is pure double DQN.
            Offline data shows one action per context, so the other actions' Q-values are never
            trained; the penalty keeps them below the action the data took.
        cql_on: where the penalty applies: ``all`` action positions, or only the actions of
            ``successful`` episodes (those that reach a goal). ``all`` also teaches the model to
            copy failed behaviour: a data action that led into a hole is pushed above the
            untried ones.
        cql_target: which actions the penalty pushes up: the one the ``data`` took (CQL), or the
            ``oracle``'s, every action that starts a shortest path to a goal on the (known)
            training map (like the Decision-Pretrained Transformer's supervised target): the
            model must infer the map from its context to predict them.
        failure_reward: reward (before ``reward_scale``) given to the last action of an episode that
            ends without reward before the time limit, i.e. in a hole; 0 (default) is the paper and
            the environment. A negative value separates "led into a hole" from "not tried".
        conflict_weight: loss weight (TD error and penalty) of the action positions where, in the
            context, the most recent visit of the tile failed and took another action than the
            most recent successful visit (``data.conflicts``); the weights are scaled to mean 1 in
            each batch. 1 (default, paper) weighs every position alike. There "copy the nearest
            visit" and "follow the success" disagree; the data mostly follows the success there
            (87 % of such actions in successful episodes), but they are about 6 % of the positions
            of the quickstart's packed sequences, so a small model learns the simpler copy first.
        seq_len: trained sequence length (linked from ``data.seq_len``); the default context window
            of the in-context agent.
        evaluation: the in-context evaluation protocol run by ``validate`` and at the end of ``fit``.
    """

    def __init__(
        self,
        backbone: TinyLlama | None = None,
        pretrained: CausalLM | None = None,
        q_head: str = "tokens",
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        alpha: float = 0.1,
        gamma: float = 0.9,
        reward_scale: float = 30.0,
        loss: str = "mse",
        cql_weight: float = 0.0,
        cql_on: str = "all",
        cql_target: str = "data",
        failure_reward: float = 0.0,
        conflict_weight: float = 1.0,
        seq_len: int = 1024,
        evaluation: EvalProtocol | None = None,
    ):
        super().__init__()
        check_module_args(lr, weight_decay, warmup_steps, alpha, gamma, reward_scale, loss, seq_len)
        check_range("model.cql_weight", cql_weight, 0, None)
        check_range("model.failure_reward", failure_reward, None, 0)
        check_range("model.conflict_weight", conflict_weight, 0, None)
        if cql_on not in CQL_ON:
            raise InputError(f"model.cql_on={cql_on!r}: choose one of {list(CQL_ON)}")
        if cql_target not in CQL_TARGETS:
            raise InputError(f"model.cql_target={cql_target!r}: choose one of {list(CQL_TARGETS)}")
        if not cql_weight and (cql_on, cql_target) != ("all", "data"):
            raise InputError(f"model.cql_on={cql_on!r} / model.cql_target={cql_target!r} shape the conservative "
                             "penalty, which is off (model.cql_weight=0): set model.cql_weight > 0")
        if q_head not in Q_HEADS:
            raise InputError(f"model.q_head={q_head!r}: choose one of {list(Q_HEADS)}")
        # Specs are kept as plain dicts in the hyper-parameters (as LightningCLI writes them), so a
        # checkpoint loads with torch.load(weights_only=True); load_from_checkpoint passes them back.
        backbone, pretrained = _as_dict(backbone), _as_dict(pretrained)
        # The evaluation protocol is not a property of the trained weights: leaving it out of the
        # checkpoint's hyper-parameters lets `validate --ckpt_path ... --model.evaluation.*` change
        # it (LightningCLI applies checkpoint hyper-parameters over the command line).
        self.save_hyperparameters(ignore=["evaluation"])
        self.backbone_spec = CausalLM(**pretrained) if pretrained else TinyLlama(**(backbone or {}))
        self.protocol = evaluation or EvalProtocol()
        self.model, self.tokenizer = self.backbone_spec.build()
        self.serializer = Serializer(self.tokenizer, self.backbone_spec.format, self.backbone_spec.max_tiles)
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
            self.q_head = torch.nn.Linear(rows.shape[1], 4, bias=False, device=rows.device)
            with torch.no_grad():
                self.q_head.weight.copy_(rows)
            self.register_buffer("q_head_target", rows.clone())
            self._online.append(("q_head.weight", self.q_head.weight))
        targets = {id(t) for t in self.target_params()}
        # Frozen base weights: left out of Lightning checkpoints (rebuilt from the backbone spec).
        self._frozen_keys = {k for k, v in self.state_dict(keep_vars=True).items()
                             if isinstance(v, torch.nn.Parameter) and not v.requires_grad and id(v) not in targets}
        self._step_clock: float | None = None
        self._eval_outputs: list[dict] = []
        self.evaluator = Evaluator(self.protocol)
        self.eval_report: dict | None = None

    def _check_vocabulary(self) -> None:
        rows = self.model.get_input_embeddings().num_embeddings
        s = self.serializer
        used = max(max(ids) for ids in s._cache.values() if ids)
        if max(used, s.pad_id) >= rows:
            raise InputError(f"the tokenizer writes id {max(used, s.pad_id)} but the model has only {rows} "
                             "embedding rows: the tokenizer does not belong to this model")

    def setup(self, stage: str) -> None:
        # Refuse a context window too small for the evaluation before any training is spent.
        self._agent()

    def _agent(self) -> InContextAgent:
        p = self.protocol
        window = p.max_context or self.hparams.seq_len
        limit = self.backbone_spec.max_context
        if limit and window > limit:
            raise InputError(f"evaluation max_context={window} tokens (0 = data.seq_len) exceeds the model's "
                             f"max_position_embeddings={limit}")
        return InContextAgent(self.acting_network(), self.serializer, window, p.max_episode_steps)

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
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if not target:
            return decoder(**kwargs).last_hidden_state
        with _eval_mode(self.model):  # the target is a fixed function: no (LoRA) dropout
            if self._peft:
                with active_adapter(self.model, TARGET):
                    return decoder(**kwargs).last_hidden_state
            swap = self._swap()
            params = {n: swap[id(p)] for n, p in decoder.named_parameters() if id(p) in swap}
            return functional_call(decoder, params, (), kwargs, strict=False).last_hidden_state

    def _head_rows(self, target: bool) -> torch.Tensor:
        """``[4, d]``: the rows whose products with a hidden state are Q(., left/down/right/up)."""
        if self.hparams.q_head == "linear":
            return self.q_head_target if target else self.q_head.weight
        weight = self.model.get_output_embeddings().weight
        if target and not self._peft:
            weight = self._swap().get(id(weight), weight)
        return weight[self.action_ids]

    def q_values(self, input_ids: torch.Tensor, q_mask: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Q(context, .) at every action position of the batch, ``[N, 4]`` float32, row-major order;
        ``target=True`` reads the target network."""
        hidden = self._hidden(input_ids, target)[q_mask]
        return action_q_values(hidden, self._head_rows(target).to(hidden.dtype)).float()

    _q_values = q_values  # the name tools/context_td_error.py uses

    # --- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q_mask = batch["q_mask"]
        q = self.q_values(batch["input_ids"], q_mask)
        with torch.no_grad():
            q_target = self.q_values(batch["input_ids"], q_mask, target=True)
        action, reward, done = batch["action"][q_mask], batch["reward"][q_mask], batch["done"][q_mask]
        q_taken = q.gather(1, action[:, None]).squeeze(1)
        h = self.hparams
        where = successful_episode(reward, done) if h.cql_weight and h.cql_on == "successful" else None
        if h.failure_reward:
            reward = failure_rewards(reward, done, batch["truncated"][q_mask], h.failure_reward)
        y = double_dqn_targets(reward, done, next_step(q.detach()), next_step(q_target), h.gamma, h.reward_scale)
        weight = None
        if h.conflict_weight != 1:
            weight = 1 + (h.conflict_weight - 1) * batch["conflict"][q_mask].to(q_taken.dtype)
            weight = weight / weight.mean().clamp(min=1e-6)
        td_loss = bellman_loss(q_taken, y, h.loss, q_mask.nonzero()[:, 0], weight)
        loss = td_loss
        if h.cql_weight:
            optimal = batch["optimal"][q_mask] if h.cql_target == "oracle" else None
            penalty = conservative_penalty(q, action, where, optimal, weight)
            loss = td_loss + h.cql_weight * penalty
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite TD loss ({loss.item()}) at global step {self.global_step}; "
                                     "the last checkpoint is untouched")
        now = time.perf_counter()
        if self._step_clock is not None:
            self.log("train/tokens_per_s", batch["input_ids"].numel() / (now - self._step_clock), on_step=True)
        self._step_clock = now
        bs = batch["input_ids"].shape[0]
        self.log("train/td_loss", td_loss, prog_bar=True, batch_size=bs)
        if h.cql_weight:
            self.log("train/cql_penalty", penalty.detach(), batch_size=bs)
        self.log("train/q_mean", q_taken.detach().mean(), batch_size=bs)
        self.log("train/target_mean", y.mean(), batch_size=bs)
        self.log("train/packing", batch["n_tokens"].sum() / batch["input_ids"].numel(), batch_size=bs)
        if "conflict" in batch:
            self.log("train/conflict_share", batch["conflict"][q_mask].float().mean(), batch_size=bs)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        polyak_(self.target_params(), [p for _, p in self._online], self.hparams.alpha)

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW([p for _, p in self._online], lr=h.lr, weight_decay=h.weight_decay)
        warm = max(1, h.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints: only what was trained ----------------------------------------------------------
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
