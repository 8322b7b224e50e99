"""The training objective's settings, as three small typed groups of ``ICRLModule``
(``model.td.*``, ``model.target.*``, ``model.cql.*`` on the command line). The math they select
is in ``qlearning.py``; ``ICRLModule.training_step`` reads it in one screen."""

from __future__ import annotations

from dataclasses import dataclass

from icrl_lightning.checks import InputError, check_choice, check_range

LOSSES = ("mse", "normalized")
CQL_EPISODES = ("all", "successful")

# Options removed after they did not help (docs/results.md says what was measured), each with the
# value that meant "off": older checkpoints save them in their hyper-parameters.
REMOVED = {"td": {"cross_gamma": 0.0, "novelty_bonus": 0.0, "novelty_aux": 0.0}}


def without_removed(group: str, saved: dict) -> dict:
    """A checkpoint's saved settings ``group`` (``td``, ...) less the options removed since: one at
    its "off" value is dropped (the run is what this version trains); one that was used is an
    ``InputError`` naming it, since this version cannot reproduce that objective."""
    kept = dict(saved)
    for key, off in REMOVED.get(group, {}).items():
        if key in kept and kept.pop(key) != off:
            raise InputError(f"model.{group}.{key}={saved[key]!r}: this checkpoint was trained with an option "
                             f"removed since (it did not help, see docs/results.md); evaluate it with the "
                             f"version that trained it")
    return kept


def without_removed_options(hparams: dict) -> dict:
    """A checkpoint's saved hyper-parameters with every settings group less its removed options
    (``without_removed``); the rest as saved."""
    return {k: without_removed(k, v) if k in REMOVED and isinstance(v, dict) else v for k, v in hparams.items()}


@dataclass
class TD:
    """The double-DQN temporal-difference loss (SPEC "Q-values and networks").

    Args:
        gamma: discount (SPEC: 0.9).
        reward_scale: rewards are multiplied by this in the TD target (SPEC: 30).
        loss: ``mse`` (paper) or ``normalized`` (authors' code: each squared error divided by the
            detached mean target of its sequence).
        conflict_weight: loss weight (TD error and penalty) of the action positions where, in the
            context, the most recent visit of the tile failed and took another action than the most
            recent successful visit (``data.context.conflicts``); weights are scaled to mean 1 in each
            batch. 1 (paper) weighs every position alike. There "copy the nearest visit" and "follow
            the success" disagree; such positions are rare in packed sequences, so a small model
            learns the simpler copy first unless they weigh more.
    """

    gamma: float = 0.9
    reward_scale: float = 30.0
    loss: str = "mse"
    conflict_weight: float = 1.0

    def check(self) -> None:
        check_range("model.td.gamma", self.gamma, 0, 1, hi_open=True)
        check_range("model.td.reward_scale", self.reward_scale, 0, None, lo_open=True)
        check_choice("model.td.loss", self.loss, LOSSES)
        check_range("model.td.conflict_weight", self.conflict_weight, 0, None)


@dataclass
class Target:
    """The target network phi (SPEC): after every optimizer step phi <- alpha * theta + (1 - alpha) * phi.

    Args:
        alpha: Polyak rate (SPEC: 0.1; the paper's figures: 0.1 >> 0.01).
    """

    alpha: float = 0.1

    def check(self) -> None:
        check_range("model.target.alpha", self.alpha, 0, 1, lo_open=True)


@dataclass
class CQL:
    """A conservative penalty beside the TD loss (CQL(H): ``logsumexp_a Q - Q(a_taken)`` at each
    penalised action position); not in the paper. Offline data shows one action per context, so
    plain double DQN never trains the other actions' Q-values; the penalty keeps them below the
    action the data took. ``model.cql: null`` (the default) is the paper's pure double DQN.

    Args:
        weight: the penalty's weight against the TD loss (> 0).
        episodes: whose actions are penalised: ``all`` episodes', or only those of ``successful``
            episodes (those that reach a goal), so that a data action that led into a hole is not
            pushed above the untried ones.
    """

    weight: float = 1.0
    episodes: str = "all"

    def check(self) -> None:
        check_range("model.cql.weight", self.weight, 0, None, lo_open=True,
                    why="model.cql: null turns the penalty off")
        check_choice("model.cql.episodes", self.episodes, CQL_EPISODES)
