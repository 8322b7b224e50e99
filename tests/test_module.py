"""ICRLModule: training through a real Lightning Trainer, the Polyak target, the target forward."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from icrl_lightning.behaviour import QLearning
from icrl_lightning.checks import InputError
from icrl_lightning.envs.frozen_lake import FrozenLake
from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.module import ICRLModule
from icrl_lightning.objective import CQL, TD, Target, without_removed

# training_step is also called directly, outside a Trainer, where self.log only warns.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture
def make_module(tiny_backbone):
    """``make_module(fmt="compact", **ICRLModule kwargs)``: a tiny module with a fixed init."""

    def make(fmt: str = "compact", **kwargs) -> ICRLModule:
        torch.manual_seed(0)
        # 30-step episodes: two of them fit the 256-token evaluation window the module checks at setup.
        kwargs = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1, "seq_len": 256,
                  "evaluation": EvalProtocol(max_episode_steps=30), **kwargs}
        backbone = tiny_backbone(fmt, max_position_embeddings=kwargs["seq_len"])
        return ICRLModule(backbone=backbone, **kwargs)

    return make


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


def test_target_buffers_start_equal_and_are_not_trained(make_module):
    module = make_module()
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


def test_fit_changes_every_parameter_and_polyak_targets(tmp_path, tiny_data_dir, make_module, module_data):
    alpha = 0.1
    module = make_module(target=Target(alpha=alpha))
    dm = module_data(module, tiny_data_dir)
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


def test_polyak_only_on_optimizer_steps(tmp_path, tiny_data_dir, make_module, module_data):
    module = make_module(target=Target(alpha=0.5))
    dm = module_data(module, tiny_data_dir)
    check = PolyakCheck(0.5)
    _trainer(tmp_path, max_steps=2, callbacks=[check], accumulate_grad_batches=2).fit(module, datamodule=dm)
    assert module.global_step == 2
    assert check.checked == [False, True, False, True]


def test_target_forward_matches_online_when_weights_equal(tiny_data_dir, make_module, make_batch):
    module = make_module()
    module.eval()
    batch = make_batch(module, tiny_data_dir)
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


def test_target_forward_reads_the_target_weights(tiny_data_dir, make_module, make_batch):
    module = make_module()
    module.eval()
    batch = make_batch(module, tiny_data_dir)
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


def _reference_loss(module: ICRLModule, batch: dict, kind: str) -> torch.Tensor:
    """The double-DQN loss written out per sequence, from the full LM logits."""
    return _reference_errors(module, batch, kind).mean()


def _reference_errors(module: ICRLModule, batch: dict, kind: str = "mse") -> torch.Tensor:
    """The squared TD error of each action position (row-major, as ``batch[...][q_mask]``)."""
    td = module.td
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"]).logits[..., module.action_ids]
    errs = []
    for b in range(batch["input_ids"].shape[0]):
        pos = torch.nonzero(batch["q_mask"][b]).flatten().tolist()
        seq_errs, seq_targets = [], []
        for j, p in enumerate(pos):
            y = td.reward_scale * float(batch["reward"][b, p])
            if not bool(batch["done"][b, p]):
                nxt = pos[j + 1]
                y += td.gamma * float(logits[b, nxt].max())  # target == online here
            q = float(logits[b, p, int(batch["action"][b, p])])
            seq_errs.append((q - y) ** 2)
            seq_targets.append(y)
        if kind == "normalized":  # authors' code: divided by the sequence's mean target
            mean_y = abs(sum(seq_targets) / len(seq_targets))
            seq_errs = [e / mean_y for e in seq_errs]
        errs += seq_errs
    return torch.tensor(errs)


def _gap(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per action position: ``logsumexp_a Q - Q(a_taken)`` written out from the action logits."""
    mask = batch["q_mask"]
    q, action = logits[mask], batch["action"][mask]
    return torch.logsumexp(q, -1) - q[torch.arange(len(action)), action]


@pytest.mark.parametrize(("kind", "fmt", "seq_len"), [("mse", "compact", 256), ("normalized", "compact", 256),
                                                     ("mse", "llama3", 1024)])
def test_training_step_loss_matches_reference(tiny_data_dir, make_module, make_batch, kind, fmt, seq_len):
    module = make_module(td=TD(loss=kind), fmt=fmt, seq_len=seq_len)
    module.eval()
    batch = make_batch(module, tiny_data_dir)
    assert batch["done"].sum() >= 2 and batch["reward"].sum() > 0  # the batch exercises both cases
    with torch.no_grad():
        loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, _reference_loss(module, batch, kind), rtol=1e-4, atol=1e-4)
    other = "normalized" if kind == "mse" else "mse"
    assert not torch.allclose(loss, _reference_loss(module, batch, other), rtol=1e-3, atol=1e-3)


def test_gamma_and_reward_scale_reach_the_td_target(tiny_data_dir, make_module, make_batch):
    module = make_module(td={"gamma": 0.5, "reward_scale": 7.0})
    assert module.td == TD(gamma=0.5, reward_scale=7.0)
    module.eval()
    batch = make_batch(module, tiny_data_dir)
    with torch.no_grad():
        loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse"), rtol=1e-4, atol=1e-4)
    default = make_module()
    assert not torch.allclose(loss, _reference_loss(default, batch, "mse"), rtol=1e-3, atol=1e-3)


def _step(module: ICRLModule, make_batch, data_dir) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One training step's loss (eval mode, no grad) on a fresh batch, the batch and the
    action-token logits at every position."""
    module.eval()
    batch = make_batch(module, data_dir)
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        logits = module.model(input_ids=batch["input_ids"]).logits[..., module.action_ids]
    return loss, batch, logits


def test_no_cql_is_pure_double_dqn(tmp_path, tiny_data_dir, make_module, make_batch, module_data):
    """``model.cql: null`` (the default): the loss is the TD loss alone and no penalty is logged."""
    module = make_module(cql=None)
    assert module.cql is None and make_module().cql is None
    loss, batch, logits = _step(module, make_batch, tiny_data_dir)
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse"), rtol=1e-4, atol=1e-4)
    assert _gap(logits, batch).mean() > 0.1  # a penalty would have changed the loss
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module.train(), datamodule=module_data(module, tiny_data_dir))
    logged = set(trainer.callback_metrics)
    assert "train/td_loss" in logged and "train/cql_penalty" not in logged
    # With the penalty on, it is logged beside the TD loss.
    with_cql = make_module(cql=CQL(weight=2.0))
    trainer = _trainer(tmp_path / "cql", max_steps=2)
    trainer.fit(with_cql, datamodule=module_data(with_cql, tiny_data_dir))
    assert {"train/td_loss", "train/cql_penalty"} <= set(trainer.callback_metrics)


def test_cql_null_on_the_command_line(print_config, repo_root):
    config = print_config(["fit", "-c", str(repo_root / "conf/experiment/quickstart.yaml"),
                           "--model.cql", "null", "--print_config"])
    assert config["model"]["cql"] is None
    config = print_config(["fit", "-c", str(repo_root / "conf/experiment/quickstart.yaml"), "--print_config"])
    assert config["model"]["cql"] == {"weight": 10.0, "episodes": "successful"}


def test_conservative_penalty_is_added_to_the_td_loss(tiny_data_dir, make_module, make_batch):
    module = make_module(cql=CQL(weight=2.0))
    loss, batch, logits = _step(module, make_batch, tiny_data_dir)
    penalty = _gap(logits, batch).mean()
    assert penalty > 0.1
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse") + 2.0 * penalty, rtol=1e-4, atol=1e-4)


def test_conservative_penalty_on_successful_episodes_only(tiny_data_dir, make_module, make_batch):
    module = make_module(cql=CQL(weight=2.0, episodes="successful"))
    loss, batch, logits = _step(module, make_batch, tiny_data_dir)
    mask = batch["q_mask"]
    reward, done = batch["reward"][mask], batch["done"][mask]
    # By hand: walk the episodes backwards, carrying whether the current one ends on a reward.
    success, ok = [], False
    for r, d in zip(reversed(reward.tolist()), reversed(done.tolist()), strict=True):
        ok = r != 0 if d else ok
        success.append(ok)
    success = torch.tensor(success[::-1])
    assert 0 < success.sum() < len(success)  # the batch mixes successes and failures
    gap = _gap(logits, batch)
    penalty = (gap * success).sum() / len(gap)
    torch.testing.assert_close(loss, _reference_loss(module, batch, "mse") + 2.0 * penalty, rtol=1e-4, atol=1e-4)


def test_conflict_weight_reweighs_the_marked_positions(tiny_data_dir, make_module, make_batch):
    module = make_module(td=TD(conflict_weight=5.0), cql=CQL(weight=2.0))
    module.eval()
    batch = make_batch(module, tiny_data_dir)
    assert "conflict" in batch  # the module asked the data for it
    mask = batch["q_mask"]
    marked = torch.zeros_like(mask)
    marked[mask.nonzero()[::3].unbind(1)] = True  # every third action position
    batch["conflict"] = marked
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        logits = module.model(input_ids=batch["input_ids"]).logits[..., module.action_ids]
    w = torch.where(marked[mask], 5.0, 1.0)
    w = w / w.mean()
    gap = _gap(logits, batch)
    # The TD part by hand: the unweighted reference's squared errors, reweighted.
    td = _reference_errors(module, batch)
    torch.testing.assert_close(loss, (w * td).mean() + 2.0 * (w * gap).mean(), rtol=1e-4, atol=1e-4)
    # Weight 1 (the default) ignores the marks.
    plain = make_module(cql=CQL(weight=2.0))
    plain.load_state_dict(module.state_dict())
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.training_step(batch, 0), td.mean() + 2.0 * gap.mean(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight", [1.0, 5.0, 0.5, 0.0])
def test_batch_fields_ask_for_conflict_only_when_weighted(tiny_data_dir, make_module, make_batch, weight):
    module = make_module(td=TD(conflict_weight=weight))
    assert isinstance(module.batch_fields, frozenset)
    assert module.batch_fields == (frozenset() if weight == 1 else frozenset({"conflict"}))
    # Handed over, they decide the batch's keys.
    batch = make_batch(module, tiny_data_dir, n=1)
    assert set(batch) == {"input_ids", "q_mask", "action", "reward", "done", "n_tokens"} | module.batch_fields
    if weight != 1:
        assert batch["conflict"].dtype == torch.bool and not (batch["conflict"] & ~batch["q_mask"]).any()


@pytest.mark.parametrize("saved", [0.0, 0.5])
def test_checkpoints_with_a_removed_option_load_when_it_was_off(tmp_path, make_module, saved):
    # model.td.cross_gamma was removed (docs/results.md); checkpoints of older versions save it.
    module = make_module()
    hp = dict(module.hparams) | {"td": {"gamma": 0.9, "reward_scale": 30.0, "loss": "mse", "conflict_weight": 1.0,
                                        "cross_gamma": saved}}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp,
                "pytorch-lightning_version": L.__version__}, tmp_path / "old.ckpt")
    protocol = EvalProtocol(max_episode_steps=30)
    if saved:
        with pytest.raises(InputError, match=r"model\.td\.cross_gamma=0\.5: .*removed"):
            ICRLModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True, evaluation=protocol)
        return
    loaded = ICRLModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True, evaluation=protocol)
    assert loaded.td == TD()
    assert without_removed("td", {"gamma": 0.8}) == {"gamma": 0.8}


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"cql": CQL(weight=0)}, r"model\.cql\.weight"),
    ({"cql": {"weight": 0.0}}, r"model\.cql\.weight"),
    ({"cql": CQL(weight=-1.0)}, r"model\.cql\.weight"),
    ({"cql": CQL(episodes="oracle")}, r"model\.cql\.episodes"),
    ({"td": TD(gamma=1.0)}, r"model\.td\.gamma"),
    ({"td": {"reward_scale": 0.0}}, r"model\.td\.reward_scale"),
    ({"td": TD(loss="huber")}, r"model\.td\.loss"),
    ({"td": TD(conflict_weight=-1.0)}, r"model\.td\.conflict_weight"),
    ({"target": Target(alpha=0.0)}, r"model\.target\.alpha"),
    ({"target": {"alpha": 1.5}}, r"model\.target\.alpha"),
])
def test_bad_objective_values_name_the_key(make_module, kwargs, key):
    with pytest.raises(ValueError, match=key) as err:
        make_module(**kwargs)
    if "cql" in kwargs and "weight" in key:  # weight 0 is no way to turn the penalty off
        assert "model.cql: null" in str(err.value)


def test_objective_groups_from_dicts(make_module):
    module = make_module(td={"loss": "normalized", "conflict_weight": 3.0}, target={"alpha": 0.25},
                         cql={"weight": 4.0, "episodes": "successful"})
    assert module.td == TD(loss="normalized", conflict_weight=3.0)
    assert module.target == Target(alpha=0.25)
    assert module.cql == CQL(weight=4.0, episodes="successful")
    defaults = make_module()
    assert (defaults.td, defaults.target, defaults.cql) == (TD(), Target(), None)


def test_training_step_rejects_non_finite_loss(tiny_data_dir, make_module, make_batch):
    module = make_module()
    batch = make_batch(module, tiny_data_dir)
    with torch.no_grad():
        module.model.get_output_embeddings().weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        module.training_step(batch, 0)


def test_state_dict_round_trip_keeps_target(make_module):
    module = make_module()
    with torch.no_grad():
        for t in module.target_params():
            t.add_(1.0)
    other = make_module()
    other.load_state_dict(module.state_dict())
    for a, b in zip(module.target_params(), other.target_params(), strict=True):
        assert torch.equal(a, b)
    for (_, a), (_, b) in zip(module._online, other._online, strict=True):
        assert torch.equal(a, b)


def test_configure_optimizers_warmup(make_module):
    module = make_module(lr=1e-2, warmup_steps=10)
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


def test_too_small_evaluation_window_fails_before_training(tmp_path, tiny_data_dir, make_module, module_data):
    module = make_module(evaluation=EvalProtocol(max_episode_steps=100))  # 2 x 205 tokens > seq_len 256
    before = [p.detach().clone() for _, p in module._online]
    dm = module_data(module, tiny_data_dir, seq_len=256)
    with pytest.raises(ValueError, match="max_context=256"):
        _trainer(tmp_path, max_steps=2).fit(module, dm)
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, module._online, strict=True))


def test_evaluation_protocol_is_not_a_checkpointed_hyperparameter(make_module):
    # LightningCLI applies a checkpoint's hyper-parameters over the command line on
    # `validate --ckpt_path`; keeping the protocol out lets `--model.evaluation.*` take effect.
    module = make_module()
    assert "evaluation" not in module.hparams
    assert module.protocol.max_episode_steps == 30


# A checkpoint also holds the data module's hyper-parameters: plain values both for env / behaviour
# given as instances (as the CLI builds them) and for the data module's own lazy defaults.
DATA_MODULES = [pytest.param({"env": FrozenLake(), "behaviour": QLearning()}, id="explicit_env"),
                pytest.param({}, id="default_env")]


@pytest.mark.parametrize("data_kwargs", DATA_MODULES)
def test_checkpoint_loads_weights_only_and_rebuilds(tmp_path, tiny_data_dir, make_module, module_data, data_kwargs):
    # Backbone specs are plain dicts in the hyper-parameters, so a checkpoint of a module built in
    # code (not through the CLI) loads with weights_only=True, and load_from_checkpoint rebuilds it.
    module = make_module()
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=module_data(module, tiny_data_dir, **data_kwargs))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"]["hidden_size"] == 32
    assert ckpt["hyper_parameters"]["pretrained"] is None
    # Full training: nothing is frozen, so the checkpoint holds every weight.
    assert not module._frozen_keys and ckpt["state_dict"].keys() == module.state_dict().keys()
    loaded = ICRLModule.load_from_checkpoint(tmp_path / "m.ckpt", evaluation=EvalProtocol(max_episode_steps=30))
    for k, v in module.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("data_kwargs", DATA_MODULES)
def test_checkpoint_holds_the_objective_as_plain_dicts(tmp_path, tiny_data_dir, make_module, module_data,
                                                       data_kwargs):
    td, target, cql = TD(gamma=0.8, reward_scale=20.0, loss="normalized", conflict_weight=4.0), \
        Target(alpha=0.05), CQL(weight=3.0, episodes="successful")
    module = make_module(td=td, target=target, cql=cql)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=module_data(module, tiny_data_dir, **data_kwargs))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    hp = torch.load(tmp_path / "m.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert type(hp["td"]) is dict and hp["td"] == {"gamma": 0.8, "reward_scale": 20.0, "loss": "normalized",
                                                    "conflict_weight": 4.0}
    assert type(hp["target"]) is dict and hp["target"] == {"alpha": 0.05}
    assert type(hp["cql"]) is dict and hp["cql"] == {"weight": 3.0, "episodes": "successful"}
    loaded = ICRLModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True,
                                             evaluation=EvalProtocol(max_episode_steps=30))
    assert (loaded.td, loaded.target, loaded.cql) == (td, target, cql)
    assert loaded.batch_fields == frozenset({"conflict"})
    for k, v in module.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # No penalty: saved as null, restored as None.
    plain = make_module()
    trainer = _trainer(tmp_path / "plain", max_steps=1)
    trainer.fit(plain, datamodule=module_data(plain, tiny_data_dir, **data_kwargs))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    hp = torch.load(tmp_path / "plain.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    # Groups left at their defaults are saved as given (None) or as their plain dicts.
    assert hp["cql"] is None
    assert hp["td"] in (None, {"gamma": 0.9, "reward_scale": 30.0, "loss": "mse", "conflict_weight": 1.0})
    assert hp["target"] in (None, {"alpha": 0.1})
    loaded = ICRLModule.load_from_checkpoint(tmp_path / "plain.ckpt", weights_only=True,
                                             evaluation=EvalProtocol(max_episode_steps=30))
    assert (loaded.td, loaded.target, loaded.cql) == (TD(), Target(), None)


def test_missing_trained_weights_are_an_error(make_module):
    state = make_module().state_dict()
    state.pop("target_0")
    with pytest.raises(RuntimeError, match="target_0"):
        make_module().load_state_dict(state)


def test_unknown_q_head_is_an_error(make_module):
    with pytest.raises(ValueError, match="model.q_head"):
        make_module(q_head="softmax")


def test_linear_q_head_on_the_tiny_model(tmp_path, tiny_data_dir, make_module, module_data):
    module = make_module(q_head="linear")
    assert module._online[-1][0] == "q_head.weight" and len(module.target_params()) == len(module._online)
    check = PolyakCheck(0.1)
    head0 = module.q_head.weight.detach().clone()
    _trainer(tmp_path, max_steps=2, callbacks=[check]).fit(module, datamodule=module_data(module, tiny_data_dir))
    assert check.checked == [True, True] and not torch.equal(module.q_head.weight, head0)


@pytest.mark.parametrize("saved", [False, True])
def test_data_settings_drop_a_removed_data_option_when_it_was_off(tmp_path, make_module, saved):
    from icrl_lightning.checkpoints import data_settings

    # data.as_played was removed (docs/results.md); checkpoints of the version that had it save it.
    module = make_module()
    data = {"data_dir": "data", "num_train_maps": 4, "as_played": saved}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": data, "pytorch-lightning_version": L.__version__}, tmp_path / "old.ckpt")
    if saved:
        with pytest.raises(InputError, match=r"trained with data\.as_played=True, an option removed since"):
            data_settings(tmp_path / "old.ckpt")
        return
    assert data_settings(tmp_path / "old.ckpt") == {"data_dir": "data", "num_train_maps": 4}


def test_compiled_training_forward_matches_eager_and_reads_the_target(tiny_data_dir, make_module, make_batch):
    torch._dynamo.reset()
    module = make_module(compile=True)
    module.setup("fit")
    batch = make_batch(module, tiny_data_dir)
    ids, mask = batch["input_ids"], batch["q_mask"]
    names = [n for n, _ in module._online]
    layer_k = names.index("model.layers.0.self_attn.v_proj.weight")
    with torch.no_grad():
        module.target_params()[layer_k].mul_(3.0)  # the target now differs from the online network

        def both():
            module.eval()  # eager: the compiled decoder runs in training only
            eager = module.q_values(ids, mask), module.q_values(ids, mask, target=True)
            module.train()
            return eager, (module.q_values(ids, mask), module.q_values(ids, mask, target=True))

        (online, target), (c_online, c_target) = both()
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled decoder ran
        assert module._compiled is not None
        assert not any("_orig_mod" in k or "_compiled" in k for k in module.state_dict())
        assert (target - online).abs().max() > 1e-3
        torch.testing.assert_close(c_online, online, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c_target, target, rtol=1e-4, atol=1e-4)
        # A later change of the target's weights reaches the compiled target forward too.
        module.target_params()[layer_k].mul_(-1.0)
        (online2, target2), (c_online2, c_target2) = both()
        assert (target2 - target).abs().max() > 1e-3
        torch.testing.assert_close(c_target2, target2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c_online2, online, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("choice", "precision", "compiled"), [
    ("auto", "bf16-mixed", True), ("auto", "32-true", False), (False, "bf16-mixed", False), (True, "32-true", True),
])
def test_compile_choice(tmp_path, make_module, choice, precision, compiled):
    module = make_module(compile=choice)
    module.trainer = _trainer(tmp_path, max_steps=1, precision=precision)
    assert module.resolve_compile() is compiled


def test_compile_value_checked(make_module):
    with pytest.raises(InputError, match="model.compile"):
        make_module(compile="yes")


def test_fit_with_compile_trains_through_the_compiled_decoder(tmp_path, tiny_data_dir, make_module, module_data):
    module = make_module(compile=True)
    dm = module_data(module, tiny_data_dir)
    before = [p.detach().clone() for _, p in module._online]
    _trainer(tmp_path, max_steps=2).fit(module, datamodule=dm)
    assert module.global_step == 2 and module._compiled is not None
    assert all(not torch.equal(b, p) for b, (_, p) in zip(before, module._online, strict=True) if p.ndim == 2)
    assert not any("_orig_mod" in k for k in module.state_dict())
