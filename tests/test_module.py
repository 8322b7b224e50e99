"""ICRLModule: training through a real Lightning Trainer, the Polyak target, the target forward."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import tiny_backbone, tiny_datamodule

from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.module import ICRLModule

# training_step is also called directly, outside a Trainer, where self.log only warns.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _module(alpha: float = 0.1, fmt: str = "compact", **kwargs) -> ICRLModule:
    torch.manual_seed(0)
    # 30-step episodes: two of them fit the 256-token evaluation window the module checks at setup.
    kwargs = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1, "seq_len": 256,
              "evaluation": EvalProtocol(max_episode_steps=30), **kwargs}
    backbone = tiny_backbone(fmt, max_position_embeddings=kwargs["seq_len"])
    return ICRLModule(backbone=backbone, alpha=alpha, **kwargs)


def _trainer(tmp_path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path), callbacks=list(callbacks), **kwargs,
    )


class PolyakCheck(L.Callback):
    """Records the target before each batch and checks it after the optimizer step."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.checked: list[bool] = []  # one entry per batch: did the target move?

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.old = [t.detach().clone() for t in module.target_params()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        online = [p.detach() for _, p in module._online]
        moved = not all(torch.equal(t, o) for t, o in zip(module.target_params(), self.old, strict=True))
        if moved:
            for t, o, old in zip(module.target_params(), online, self.old, strict=True):
                assert torch.equal(t, self.alpha * o + (1 - self.alpha) * old)
        self.checked.append(moved)


def _batch(module: ICRLModule, data_dir, n: int = 2) -> dict:
    dm = tiny_datamodule(data_dir, seq_len=module.hparams.seq_len)
    dm.serializer = module.serializer
    stream = dm.train_stream(num_sequences=n)
    items = list(stream)
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_target_buffers_start_equal_and_are_not_trained():
    module = _module()
    online = [p for _, p in module._online]
    targets = module.target_params()
    assert len(online) == len(targets) == len(list(module.model.parameters()))
    for p, t in zip(online, targets, strict=True):
        assert torch.equal(p, t) and p.data_ptr() != t.data_ptr()
        assert not t.requires_grad
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert not trainable & {id(t) for t in targets}
    # The target weights are saved with the module (they are half the training state).
    keys = module.state_dict().keys()
    assert sum(k.startswith("target_") for k in keys) == len(targets)


def test_fit_changes_every_parameter_and_polyak_targets(tmp_path, tiny_data_dir):
    alpha = 0.1
    module = _module(alpha=alpha)
    dm = tiny_datamodule(tiny_data_dir)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    check = PolyakCheck(alpha)
    _trainer(tmp_path, max_steps=3, callbacks=[check]).fit(module, datamodule=dm)
    assert module.global_step == 3
    assert check.checked == [True, True, True]
    unchanged = [n for n, p in module.model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not trained: {unchanged}"
    # Only the four action rows of the output layer are read as Q-values, so (with no weight
    # decay) only they move.
    head = module.model.get_output_embeddings().weight.detach()
    head0 = before["lm_head.weight"]
    rows_moved = torch.nonzero((head != head0).any(dim=1)).flatten().tolist()
    assert sorted(rows_moved) == sorted(module.serializer.action_token_ids.tolist())
    # The target moved toward the online weights but is not equal to them.
    for (_, p), t in zip(module._online, module.target_params(), strict=True):
        assert not torch.equal(p, t)


def test_polyak_only_on_optimizer_steps(tmp_path, tiny_data_dir):
    module = _module(alpha=0.5)
    dm = tiny_datamodule(tiny_data_dir)
    check = PolyakCheck(0.5)
    _trainer(tmp_path, max_steps=2, callbacks=[check], accumulate_grad_batches=2).fit(module, datamodule=dm)
    assert module.global_step == 2
    assert check.checked == [False, True, False, True]


def test_target_forward_matches_online_when_weights_equal(tiny_data_dir):
    module = _module()
    module.eval()
    batch = _batch(module, tiny_data_dir)
    ids, mask = batch["input_ids"], batch["q_mask"]
    with torch.no_grad():
        q_online = module.q_values(ids, mask)
        q_target = module.q_values(ids, mask, target=True)
    assert q_online.shape == (int(mask.sum()), 4)
    torch.testing.assert_close(q_target, q_online, rtol=0, atol=1e-6)
    # The online Q are the LM logits of the action words at the masked positions.
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits
    torch.testing.assert_close(q_online, logits[mask][:, module.action_ids], rtol=1e-5, atol=1e-5)


def test_target_forward_reads_the_target_weights(tiny_data_dir):
    module = _module()
    module.eval()
    batch = _batch(module, tiny_data_dir)
    ids, mask = batch["input_ids"], batch["q_mask"]
    names = [n for n, _ in module._online]
    with torch.no_grad():
        q_online = module.q_values(ids, mask)
        # A change to the target's output layer moves only the target Q.
        head_k = names.index("lm_head.weight")
        module.target_params()[head_k].add_(0.5)
        q_target = module.q_values(ids, mask, target=True)
        assert torch.equal(module.q_values(ids, mask), q_online)
        assert (q_target - q_online).abs().max() > 1e-2
        module.target_params()[head_k].sub_(0.5)
        # So does a change to a decoder weight of the target.
        layer_k = names.index("model.layers.0.self_attn.v_proj.weight")
        module.target_params()[layer_k].mul_(3.0)
        q_target = module.q_values(ids, mask, target=True)
        assert (q_target - q_online).abs().max() > 1e-3
        assert torch.equal(module.q_values(ids, mask), q_online)


def _reference_loss(module: ICRLModule, batch: dict, kind: str, failure: float = 0.0) -> torch.Tensor:
    """The double-DQN loss written out per sequence, from the full LM logits; ``failure`` is the
    reward of an episode's last action when it ends in a hole."""
    return _reference_errors(module, batch, kind, failure).mean()


def _reference_errors(module: ICRLModule, batch: dict, kind: str = "mse", failure: float = 0.0) -> torch.Tensor:
    """The squared TD error of each action position (row-major, as ``batch[...][q_mask]``)."""
    h = module.hparams
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"]).logits[..., module.action_ids]
    errs = []
    for b in range(batch["input_ids"].shape[0]):
        pos = torch.nonzero(batch["q_mask"][b]).flatten().tolist()
        seq_errs, seq_targets = [], []
        for j, p in enumerate(pos):
            r = float(batch["reward"][b, p])
            if bool(batch["done"][b, p]) and r == 0 and not bool(batch["truncated"][b, p]):
                r = failure
            y = h.reward_scale * r
            if not bool(batch["done"][b, p]):
                nxt = pos[j + 1]
                y += h.gamma * float(logits[b, nxt].max())  # target == online here
            q = float(logits[b, p, int(batch["action"][b, p])])
            seq_errs.append((q - y) ** 2)
            seq_targets.append(y)
        if kind == "normalized":  # authors' code: divided by the sequence's mean target
            mean_y = abs(sum(seq_targets) / len(seq_targets))
            seq_errs = [e / mean_y for e in seq_errs]
        errs += seq_errs
    return torch.tensor(errs)


@pytest.mark.parametrize(("kind", "fmt", "seq_len"), [("mse", "compact", 256), ("normalized", "compact", 256),
                                                     ("mse", "llama3", 1024)])
def test_training_step_loss_matches_reference(tiny_data_dir, kind, fmt, seq_len):
    module = _module(loss=kind, fmt=fmt, seq_len=seq_len)
    module.eval()
    batch = _batch(module, tiny_data_dir)
    assert batch["done"].sum() >= 2 and batch["reward"].sum() > 0  # the batch exercises both cases
    with torch.no_grad():
        loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, _reference_loss(module, batch, kind), rtol=1e-4, atol=1e-4)
    other = "normalized" if kind == "mse" else "mse"
    assert not torch.allclose(loss, _reference_loss(module, batch, other), rtol=1e-3, atol=1e-3)


def _step(module: ICRLModule, data_dir) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One training step's loss (eval mode, no grad) on a fresh batch, the batch and the
    action-token logits at every position."""
    module.eval()
    batch = _batch(module, data_dir)
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        logits = module.model(input_ids=batch["input_ids"]).logits[..., module.action_ids]
    return loss, batch, logits


def test_conservative_penalty_is_added_to_the_td_loss(tiny_data_dir):
    module = _module(cql_weight=2.0)
    loss, batch, logits = _step(module, tiny_data_dir)
    mask = batch["q_mask"]
    q, action = logits[mask], batch["action"][mask]
    penalty = (torch.logsumexp(q, -1) - q[torch.arange(len(action)), action]).mean()
    assert penalty > 0.1
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse") + 2.0 * penalty, rtol=1e-4, atol=1e-4)


def test_conservative_penalty_on_successful_episodes_only(tiny_data_dir):
    module = _module(cql_weight=2.0, cql_on="successful")
    loss, batch, logits = _step(module, tiny_data_dir)
    mask = batch["q_mask"]
    q, action = logits[mask], batch["action"][mask]
    reward, done = batch["reward"][mask], batch["done"][mask]
    # By hand: walk the episodes backwards, carrying whether the current one ends on a reward.
    success, ok = [], False
    for r, d in zip(reversed(reward.tolist()), reversed(done.tolist()), strict=True):
        ok = r != 0 if d else ok
        success.append(ok)
    success = torch.tensor(success[::-1])
    assert 0 < success.sum() < len(success)  # the batch mixes successes and failures
    gap = torch.logsumexp(q, -1) - q[torch.arange(len(action)), action]
    penalty = (gap * success).sum() / len(gap)
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse") + 2.0 * penalty, rtol=1e-4, atol=1e-4)


def test_conservative_penalty_towards_the_oracle_actions(tiny_data_dir):
    module = _module(cql_weight=2.0, cql_target="oracle")
    loss, batch, logits = _step(module, tiny_data_dir)
    mask = batch["q_mask"]
    q, best, action = logits[mask], batch["optimal"][mask], batch["action"][mask]
    assert best.any(-1).all()  # every action is taken on a tile with a path to a goal
    taken = best[torch.arange(len(action)), action]
    assert taken.any() and not taken.all()  # the data takes oracle moves and others
    gap = [torch.logsumexp(q[i], 0) - torch.logsumexp(q[i][best[i]], 0) if best[i].any() else torch.tensor(0.0)
           for i in range(len(q))]
    penalty = torch.stack(gap).mean()
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse") + 2.0 * penalty, rtol=1e-4, atol=1e-4)


def test_conflict_weight_reweighs_the_marked_positions(tiny_data_dir):
    module = _module(cql_weight=2.0, conflict_weight=5.0)
    module.eval()
    batch = _batch(module, tiny_data_dir)
    mask = batch["q_mask"]
    marked = torch.zeros_like(mask)
    marked[mask.nonzero()[::3].unbind(1)] = True  # every third action position
    batch["conflict"] = marked
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        logits = module.model(input_ids=batch["input_ids"]).logits[..., module.action_ids]
    w = torch.where(marked[mask], 5.0, 1.0)
    w = w / w.mean()
    q, action = logits[mask], batch["action"][mask]
    gap = torch.logsumexp(q, -1) - q[torch.arange(len(action)), action]
    # The TD part by hand: the unweighted reference's squared errors, reweighted.
    td = _reference_errors(module, batch)
    torch.testing.assert_close(loss, (w * td).mean() + 2.0 * (w * gap).mean(), rtol=1e-4, atol=1e-4)
    # Weight 1 (the default) ignores the marks.
    plain = _module(cql_weight=2.0)
    plain.load_state_dict(module.state_dict())
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.training_step(batch, 0), td.mean() + 2.0 * gap.mean(), rtol=1e-4, atol=1e-4)


def test_failure_reward_on_the_action_that_ends_in_a_hole(tiny_data_dir):
    module = _module(failure_reward=-0.5)
    module.eval()
    batch = _batch(module, tiny_data_dir)
    holes = batch["done"] & (batch["reward"] == 0) & ~batch["truncated"]
    assert holes.sum() >= 1  # the batch has an episode that ends in a hole
    with torch.no_grad():
        loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse", failure=-0.5), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(loss, _reference_loss(module, batch, "mse"), rtol=1e-3, atol=1e-3)


def test_training_step_rejects_non_finite_loss(tiny_data_dir):
    module = _module()
    batch = _batch(module, tiny_data_dir)
    with torch.no_grad():
        module.model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        module.training_step(batch, 0)


def test_state_dict_round_trip_keeps_target():
    module = _module()
    with torch.no_grad():
        for t in module.target_params():
            t.add_(1.0)
    other = _module()
    other.load_state_dict(module.state_dict())
    for a, b in zip(module.target_params(), other.target_params(), strict=True):
        assert torch.equal(a, b)
    for (_, a), (_, b) in zip(module._online, other._online, strict=True):
        assert torch.equal(a, b)


def test_configure_optimizers_warmup():
    module = _module(lr=1e-2, warmup_steps=10)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    assert conf["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-2)
    assert lrs[11] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))


def test_too_small_evaluation_window_fails_before_training(tmp_path, tiny_data_dir):
    module = _module(evaluation=EvalProtocol(max_episode_steps=100))  # 2 x 205 tokens > seq_len 256
    before = [p.detach().clone() for _, p in module._online]
    dm = tiny_datamodule(tiny_data_dir, seq_len=256)
    with pytest.raises(ValueError, match="max_context=256"):
        _trainer(tmp_path, max_steps=2).fit(module, dm)
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, module._online, strict=True))


def test_evaluation_protocol_is_not_a_checkpointed_hyperparameter():
    # LightningCLI applies a checkpoint's hyper-parameters over the command line on
    # `validate --ckpt_path`; keeping the protocol out lets `--model.evaluation.*` take effect.
    module = _module()
    assert "evaluation" not in module.hparams
    assert module.protocol.max_episode_steps == 30


def test_checkpoint_loads_weights_only_and_rebuilds(tmp_path, tiny_data_dir):
    # Backbone specs are plain dicts in the hyper-parameters, so a checkpoint of a module built in
    # code (not through the CLI) loads with weights_only=True, and load_from_checkpoint rebuilds it.
    module = _module()
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=tiny_datamodule(tiny_data_dir))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"]["hidden_size"] == 32
    assert ckpt["hyper_parameters"]["pretrained"] is None
    # Full training: nothing is frozen, so the checkpoint holds every weight.
    assert not module._frozen_keys and ckpt["state_dict"].keys() == module.state_dict().keys()
    loaded = ICRLModule.load_from_checkpoint(tmp_path / "m.ckpt", evaluation=EvalProtocol(max_episode_steps=30))
    for k, v in module.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_missing_trained_weights_are_an_error():
    state = _module().state_dict()
    state.pop("target_0")
    with pytest.raises(RuntimeError, match="target_0"):
        _module().load_state_dict(state)


def test_unknown_q_head_is_an_error():
    with pytest.raises(ValueError, match="model.q_head"):
        _module(q_head="softmax")


def test_linear_q_head_on_the_tiny_model(tmp_path, tiny_data_dir):
    module = _module(q_head="linear")
    assert module._online[-1][0] == "q_head.weight" and len(module.target_params()) == len(module._online)
    check = PolyakCheck(0.1)
    head0 = module.q_head.weight.detach().clone()
    _trainer(tmp_path, max_steps=2, callbacks=[check]).fit(module, datamodule=tiny_datamodule(tiny_data_dir))
    assert check.checked == [True, True] and not torch.equal(module.q_head.weight, head0)
