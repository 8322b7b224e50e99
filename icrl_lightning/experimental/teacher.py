"""Under study (issue 16): an optimistic teacher for in-context exploration.

The learner's found share (a goal reached before the greedy phase) is its ceiling on held-out
maps: the protocol's random actions alone find a goal on about 78 % of maps, and the model's own
early actions mostly copy its context instead of trying what it has not tried. The optimistic
tabular learner (every entry starts at 1, the largest return) finds a goal systematically. Here
it teaches that behaviour in context: at every training action position it replays that
position's own context (the earlier steps of the same map in the sequence, in order) and labels
its greedy actions there; a large-margin loss (DQfD, Hester et al. 2018) puts those actions'
Q-values above the others by ``teacher_margin x reward_scale``, beside the double-DQN loss. The
labels stop once the context has reached a goal on that map: from there on the TD loss alone
teaches the model to exploit what it found.

Run it through its own command (the core's CLI with these two classes), or a sweep setting's
``cli: icrl_lightning.experimental.teacher``::

    python -m icrl_lightning.experimental.teacher fit -c conf/experiment/quickstart.yaml \\
        --model.teacher_weight 3

Results: docs/results.md, "an optimistic teacher for in-context exploration".
"""

from __future__ import annotations

import numpy as np
import torch

from icrl_lightning.behaviour import TabularQLearner
from icrl_lightning.checks import InputError, check_choice, check_range
from icrl_lightning.cli import main as core_main
from icrl_lightning.data.module import ReplayDataModule
from icrl_lightning.data.stream import ReplayStream
from icrl_lightning.module import ICRLModule
from icrl_lightning.serialize import EncodedEpisode

# The teacher: the q_optimistic evaluation baseline's learner (behaviour.TabularQLearner).
TEACHER_Q_INIT, TEACHER_LR, TEACHER_GAMMA = 1.0, 0.5, 0.9


def teacher_actions(chunk: list[EncodedEpisode], n_actions: int, q_init: float = TEACHER_Q_INIT,
                    lr: float = TEACHER_LR, gamma: float = TEACHER_GAMMA) -> list[np.ndarray]:
    """Per episode of a packed sequence, ``[steps, n_actions]`` bool: at each step, the greedy
    actions (all ties) of a tabular Q-learner that starts every entry at ``q_init`` and has
    learned from every earlier step of the same map in the sequence, in order; all False from the
    step after the sequence first reaches a goal on that map (a positive reward), and throughout
    for an episode of an unknown map (``map_id < 0``). Every episode end is terminal (the
    double-DQN loss does not bootstrap across one either)."""
    size = max((int(e.tiles.max()) + 1 for e in chunk if len(e.tiles)), default=1)
    learners: dict[int, TabularQLearner] = {}
    found: set[int] = set()
    out = []
    for e in chunk:
        labels = np.zeros((len(e.actions), n_actions), dtype=bool)
        out.append(labels)
        if e.map_id < 0 or e.map_id in found:
            continue  # no labels, and the learner is no longer needed
        if e.map_id not in learners:
            learners[e.map_id] = TabularQLearner(size, lr=lr, gamma=gamma, q_init=q_init, n_actions=n_actions)
        learner = learners[e.map_id]
        tiles, actions, rewards = e.tiles, e.actions, e.rewards
        for t in range(len(actions)):
            s, r = int(tiles[t]), float(rewards[t])
            row = learner.q[s]
            labels[t] = row == row.max()
            if r > 0:
                found.add(e.map_id)
                break
            last = t + 1 == len(actions)
            learner.update(s, int(actions[t]), r, s if last else int(tiles[t + 1]), terminated=last)
    return out


def margin_loss(q: torch.Tensor, labels: torch.Tensor, margin: float,
                average: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """DQfD's large-margin loss with a set of expert actions: per row, ``relu(max over the other
    actions of Q + margin - max over the labelled actions of Q)``, zero on rows labelled with no
    action or with every action (nothing to rank), averaged over *all* rows (``average="all"``: the
    weight means the same whatever share is labelled, as ``qlearning.conservative_penalty``) or
    over the labelled rows only (``"labelled"``, as DPT's ``qlearning.optimal_action_loss``; about
    six times the pull at the quickstart's 16 % labelled share). Also returns the share of ranked
    rows whose argmax is labelled."""
    labelled = labels.any(dim=-1)
    ranked = labelled & ~labels.all(dim=-1)
    if not bool(ranked.any()):
        zero = q.sum() * 0
        return zero, zero.detach()
    best_expert = q.masked_fill(~labels, float("-inf")).amax(dim=-1)
    best_other = q.masked_fill(labels, float("-inf")).amax(dim=-1)
    gap = torch.where(ranked, torch.relu(best_other + margin - best_expert), torch.zeros_like(best_expert))
    hit = labels.gather(1, q.argmax(dim=-1, keepdim=True)).squeeze(1)[ranked].float().mean()
    return (gap.mean() if average == "all" else gap[labelled].mean()), hit


class TeacherStream(ReplayStream):
    """The replay stream with one more batch field, ``teacher`` (``[seq_len, actions]`` bool: the
    teacher's greedy actions at each action position, ``teacher_actions``)."""

    def __init__(self, *args, fields=frozenset(), **kwargs):
        self.teacher = "teacher" in fields
        super().__init__(*args, fields=frozenset(fields) - {"teacher"}, **kwargs)

    n_actions = 4  # the family's action count; TeacherDataModule sets it from data.env

    def pack(self, chunk: list[EncodedEpisode]) -> dict[str, torch.Tensor]:
        batch = super().pack(chunk)
        if self.teacher:
            teacher = np.zeros((self.seq_len, self.n_actions), dtype=bool)
            at = 0
            for e, labels in zip(chunk, teacher_actions(chunk, self.n_actions), strict=True):
                if len(e.q_pos):
                    teacher[e.q_pos + at] = labels
                at += len(e)
            batch["teacher"] = torch.from_numpy(teacher)
        return batch


class TeacherDataModule(ReplayDataModule):
    """``ReplayDataModule`` whose stream can add the ``teacher`` batch field (``TeacherStream``)."""

    stream_class = TeacherStream

    def stream(self, *args, **kwargs) -> ReplayStream:
        s = super().stream(*args, **kwargs)
        s.n_actions = len(self.env.actions)
        return s


class TeacherModule(ICRLModule):
    """``ICRLModule`` with the teacher's large-margin loss beside the double-DQN loss.

    Args:
        teacher_weight: the margin loss's weight against the TD loss; 0 = off (the core module).
        teacher_margin: the margin, as a share of ``td.reward_scale`` (0.1 x 30 = 3 on the
            quickstart's scale).
        teacher_average: ``all``: the margin loss averaged over all action positions; ``labelled``:
            over the labelled ones only (``margin_loss``).
        **kwargs: ``ICRLModule``'s arguments.
    """

    def __init__(self, teacher_weight: float = 3.0, teacher_margin: float = 0.1, teacher_average: str = "all",
                 **kwargs):
        check_range("model.teacher_weight", teacher_weight, 0, None, why="0 turns the teacher off")
        check_range("model.teacher_margin", teacher_margin, 0, None, lo_open=True)
        check_choice("model.teacher_average", teacher_average, ("all", "labelled"))
        if teacher_weight and kwargs.get("objective", "dqn") != "dqn":
            raise InputError(f"model.teacher_weight={teacher_weight}: the teacher's margin loss sits beside the "
                             f"dqn objective, not {kwargs['objective']!r}; set model.teacher_weight: 0")
        super().__init__(**kwargs)
        self.teacher_weight, self.teacher_margin, self.teacher_average = teacher_weight, teacher_margin, teacher_average
        self._online_q: torch.Tensor | None = None

    @property
    def batch_fields(self) -> frozenset[str]:
        return super().batch_fields | ({"teacher"} if self.teacher_weight else frozenset())

    def q_values(self, input_ids, q_mask, target: bool = False) -> torch.Tensor:
        q = super().q_values(input_ids, q_mask, target)
        if self.teacher_weight and not target and self.training:
            self._online_q = q  # the training step's online Q-values, for the margin loss
        return q

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if not self.teacher_weight:
            return loss
        labels = batch["teacher"][batch["q_mask"]]
        margin, hit = margin_loss(self._online_q, labels, self.teacher_margin * self.td.reward_scale,
                                  self.teacher_average)
        self._online_q = None
        bs = batch["input_ids"].shape[0]
        self.log("train/teacher_loss", margin.detach(), batch_size=bs)
        self.log("train/teacher_accuracy", hit, batch_size=bs)
        self.log("train/teacher_share", labels.any(dim=-1).float().mean(), batch_size=bs)
        loss = loss + self.teacher_weight * margin
        self._check_finite(loss, "teacher")
        return loss


def main(args: list[str] | None = None, run: bool = True):
    """``python -m icrl_lightning.experimental.teacher fit|validate ...``: the core CLI with the
    teacher's module and data module (``run=False``: built, not run, as ``cli.main``)."""
    return core_main(args, TeacherModule, TeacherDataModule, prog="python -m icrl_lightning.experimental.teacher",
                     run=run)


if __name__ == "__main__":
    main()
