"""The training objective's settings, as four small typed groups of ``ICRLModule``
(``model.td.*``, ``model.target.*``, ``model.cql.*``, ``model.teacher.*`` on the command line). The math they select
is in ``qlearning.py``; ``ICRLModule.training_step`` reads it in one screen."""

from __future__ import annotations

from dataclasses import dataclass

from icrl_lightning.checks import InputError, check_choice, check_range

LOSSES = ("mse", "normalized")
CQL_EPISODES = ("all", "successful")

# Options removed after they did not help (docs/results.md says what was measured), each with the
# value that meant "off": older checkpoints save them in their hyper-parameters.
REMOVED = {"td": {"cross_gamma": 0.0, "novelty_bonus": 0.0, "novelty_aux": 0.0}}
# Settings groups added since older checkpoints were saved, at the value those runs trained with:
# a checkpoint saved before model.teacher existed (session 35) trained without it.
ADDED = {"teacher": None}


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
    (``without_removed``), and every group added since at the value the run trained with
    (``ADDED``); the rest as saved. Empty stays empty (nothing saved)."""
    kept = {k: without_removed(k, v) if k in REMOVED and isinstance(v, dict) else v for k, v in hparams.items()}
    return ADDED | kept if kept else kept


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


@dataclass
class Teacher:
    """An optimistic teacher for in-context exploration, beside the TD loss; not in the paper.
    At every training action position the project's optimistic tabular learner (the
    ``q_optimistic`` baseline's: every entry starts at 1, the largest return; lr 0.5, gamma 0.9)
    replays that position's own context (the earlier steps of the same map in the sequence, in
    order), and a large-margin loss (DQfD, Hester et al. 2018) puts its greedy actions' Q-values
    above the others' by ``margin x td.reward_scale``, averaged over the positions it labels
    (``data.context.teacher_actions``, ``qlearning.margin_loss``). Where a tile has a move the
    context has not tried, that move is among the teacher's greedy ones, so the labels say "try
    what your context has not tried"; they stop once the context has reached a goal on that map,
    where the TD loss alone teaches the model to exploit what it found. Offline double DQN learns
    from its context what worked, not what is left to try: the share of maps whose goal is found
    before the greedy phase stays at what the protocol's random actions find (docs/results.md,
    sessions 32-35). ``model.teacher: null`` (the default) is the paper's objective. Built and
    measured on Frozen Lake, whose only reward (1, the largest return) is the goal's; on another
    family the start value 1 may not be optimistic and the labels stop at its first reward
    (Key-to-Door's key): untested there.

    Args:
        weight: the margin loss's weight against the TD loss (> 0).
        margin: the margin, as a share of ``td.reward_scale`` (> 0).
    """

    weight: float = 3.0
    margin: float = 0.1

    def check(self) -> None:
        check_range("model.teacher.weight", self.weight, 0, None, lo_open=True,
                    why="model.teacher: null turns the teacher off")
        check_range("model.teacher.margin", self.margin, 0, None, lo_open=True)
