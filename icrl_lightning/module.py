"""``ICRLModule``: a causal LM trained with double DQN over multi-episode token sequences."""

from __future__ import annotations

import time

import lightning as L
import torch
from torch.func import functional_call

from icrl_lightning.agent import InContextAgent
from icrl_lightning.backbones import TinyLlama
from icrl_lightning.checks import check_module_args
from icrl_lightning.evaluation.protocol import EvalProtocol
from icrl_lightning.evaluation.runner import Evaluator
from icrl_lightning.qlearning import action_q_values, bellman_loss, double_dqn_targets, next_step, polyak_
from icrl_lightning.serialize import Serializer


class ICRLModule(L.LightningModule):
    """Online network = the backbone's trainable weights; target network = the *same* module with
    those weights swapped for Polyak-averaged copies (never a second copy of frozen weights).

    Args:
        backbone: what to train (a ``TinyLlama`` trained from scratch).
        lr: AdamW learning rate after warm-up.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        alpha: Polyak rate of the target network, applied after every optimizer step (SPEC: 0.1).
        gamma: discount (SPEC: 0.9).
        reward_scale: rewards are multiplied by this in the TD target (SPEC: 30).
        loss: ``mse`` (paper) or ``normalized`` (authors' code: squared error / mean target).
        seq_len: trained sequence length (linked from ``data.seq_len``); the default context window
            of the in-context agent.
        evaluation: the in-context evaluation protocol run by ``validate`` and at the end of ``fit``.
    """

    def __init__(
        self,
        backbone: TinyLlama | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        alpha: float = 0.1,
        gamma: float = 0.9,
        reward_scale: float = 30.0,
        loss: str = "mse",
        seq_len: int = 1024,
        evaluation: EvalProtocol | None = None,
    ):
        super().__init__()
        check_module_args(lr, weight_decay, warmup_steps, alpha, gamma, reward_scale, loss, seq_len)
        # The evaluation protocol is not a property of the trained weights: leaving it out of the
        # checkpoint's hyper-parameters lets `validate --ckpt_path ... --model.evaluation.*` change
        # it (LightningCLI applies checkpoint hyper-parameters over the command line).
        self.save_hyperparameters(ignore=["evaluation"])
        self.backbone_spec = backbone or TinyLlama()
        self.protocol = evaluation or EvalProtocol()
        self.model, self.tokenizer = self.backbone_spec.build()
        self.serializer = Serializer(self.tokenizer, self.backbone_spec.format, self.backbone_spec.max_tiles)
        self.register_buffer("action_ids", torch.as_tensor(self.serializer.action_token_ids), persistent=False)
        self._online = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        for k, (_, p) in enumerate(self._online):
            self.register_buffer(f"target_{k}", p.detach().clone())
        self._step_clock: float | None = None
        self._eval_outputs: list[dict] = []
        self.evaluator = Evaluator(self.protocol)
        self.eval_report: dict | None = None

    def setup(self, stage: str) -> None:
        # Refuse a context window too small for the evaluation before any training is spent.
        self._agent()

    def _agent(self) -> InContextAgent:
        p = self.protocol
        return InContextAgent(self.model, self.serializer, p.max_context or self.hparams.seq_len, p.max_episode_steps)

    # --- Q-values ---------------------------------------------------------------------------------
    def target_params(self) -> list[torch.Tensor]:
        return [getattr(self, f"target_{k}") for k in range(len(self._online))]

    def _q_values(self, input_ids: torch.Tensor, q_mask: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Q(context, .) at every action position of the batch, ``[N, 4]`` in row-major order."""
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        if not target:
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            weight = head.weight
        else:
            swap = dict(zip((id(p) for _, p in self._online), self.target_params(), strict=True))
            params = {n: swap[id(p)] for n, p in decoder.named_parameters() if id(p) in swap}
            hidden = functional_call(decoder, params, (), {"input_ids": input_ids, "use_cache": False},
                                     strict=False).last_hidden_state
            weight = swap.get(id(head.weight), head.weight)
        return action_q_values(hidden[q_mask], weight[self.action_ids])

    # --- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q_mask = batch["q_mask"]
        q = self._q_values(batch["input_ids"], q_mask)
        with torch.no_grad():
            q_target = self._q_values(batch["input_ids"], q_mask, target=True)
        action, reward, done = batch["action"][q_mask], batch["reward"][q_mask], batch["done"][q_mask]
        q_taken = q.gather(1, action[:, None]).squeeze(1)
        h = self.hparams
        y = double_dqn_targets(reward, done, next_step(q.detach()), next_step(q_target), h.gamma, h.reward_scale)
        loss = bellman_loss(q_taken, y, h.loss, q_mask.nonzero()[:, 0])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite TD loss ({loss.item()}) at global step {self.global_step}; "
                                     "the last checkpoint is untouched")
        now = time.perf_counter()
        if self._step_clock is not None:
            self.log("train/tokens_per_s", batch["input_ids"].numel() / (now - self._step_clock), on_step=True)
        self._step_clock = now
        bs = batch["input_ids"].shape[0]
        self.log("train/td_loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/q_mean", q_taken.detach().mean(), batch_size=bs)
        self.log("train/target_mean", y.mean(), batch_size=bs)
        self.log("train/packing", batch["n_tokens"].sum() / batch["input_ids"].numel(), batch_size=bs)
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
