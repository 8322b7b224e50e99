"""The RL math as pure tensor functions (SPEC "Q-values and networks")."""

from __future__ import annotations

import torch


def action_q_values(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """Q(context, .) = the LM logits of the four action tokens: ``hidden [N, d] @ W[actions].T``.

    Only the four rows of the output layer are used, so the full-vocabulary logits are never
    materialised. The product is float32 with autocast off: under bf16 autocast a bf16 product
    would round Q-values near the x30 reward to steps of 0.125, coarser than many gaps between
    actions that the TD targets and the greedy choice read. Cheap: the product has one column per
    action."""
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.float() @ head_weight.float().T


def double_dqn_targets(
    reward: torch.Tensor,
    done: torch.Tensor,
    q_online_next: torch.Tensor,
    q_target_next: torch.Tensor,
    gamma: float,
    reward_scale: float,
) -> torch.Tensor:
    """y_t = scale * r_t + gamma * (1 - done_t) * Q_target(t+1, argmax_a Q_online(t+1, a)).

    ``q_*_next[i]`` are the Q-values at the action that follows action ``i`` (any value where
    ``done[i]``, whose bootstrap is masked: no bootstrap across episode ends). The argmax runs
    over the four actions only."""
    best = q_online_next.argmax(dim=-1, keepdim=True)
    bootstrap = q_target_next.gather(-1, best).squeeze(-1)
    return reward_scale * reward + gamma * (~done).to(bootstrap.dtype) * bootstrap


def next_step(values: torch.Tensor) -> torch.Tensor:
    """Row ``i`` -> row ``i + 1`` (the last row repeats; it is always an episode end)."""
    return torch.cat([values[1:], values[-1:]], dim=0)


def bellman_loss(
    q_taken: torch.Tensor,
    targets: torch.Tensor,
    kind: str = "mse",
    sequence: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mse``: the paper's mean squared TD error. ``normalized``: the authors' code, each squared
    error divided by the detached mean target of its sequence. ``weight``: per action, multiplies
    its squared error (1 everywhere = unweighted)."""
    err = (q_taken - targets.detach()) ** 2
    if weight is not None:
        err = err * weight
    if kind == "mse":
        return err.mean()
    if kind == "normalized":
        if sequence is None:
            raise ValueError("the normalized loss needs each action's sequence index")
        n_seq = int(sequence.max()) + 1
        sums = torch.zeros(n_seq, dtype=targets.dtype, device=targets.device).index_add_(0, sequence, targets.detach())
        counts = torch.bincount(sequence, minlength=n_seq).clamp(min=1).to(targets.dtype)
        scale = (sums / counts)[sequence].abs().clamp(min=1e-6)
        return (err / scale).mean()
    raise ValueError(f"loss={kind!r}: choose 'mse' or 'normalized'")


def conservative_gap(q: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Per row, ``logsumexp_a Q(., a) - Q(., a_taken)``: the cross-entropy of the action taken under
    softmax(Q)."""
    return torch.logsumexp(q, dim=-1) - q.gather(-1, action[:, None]).squeeze(-1)


def conservative_penalty(q: torch.Tensor, action: torch.Tensor, where: torch.Tensor | None = None,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """CQL(H) regulariser: mean over actions taken of ``logsumexp_a Q(., a) - Q(., a_taken)``.

    Offline data shows one action per context, so the Q-values of the other three are never
    trained and can be over-estimated; this term pushes them below the action the data took.
    ``where`` (bool per action): only those positions are penalised (the others count as zero in
    the mean, so the weight means the same whatever share is selected). ``weight``: per action,
    multiplies its term."""
    gap = conservative_gap(q, action)
    if where is not None:
        gap = gap * where.to(gap.dtype)
    if weight is not None:
        gap = gap * weight
    return gap.mean()


def optimal_action_loss(q: torch.Tensor, optimal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPT's supervised loss (Lee et al. 2023) on the Q readout as logits: per row, ``-log`` of the
    softmax probability of the optimal actions (``optimal``: bool ``[N, actions]``; several optimal
    actions share it), averaged over the rows that have one. Also returns the share of those rows
    whose argmax is optimal."""
    has = optimal.any(dim=-1)
    if not bool(has.any()):
        zero = q.sum() * 0
        return zero, zero.detach()
    q, optimal = q[has], optimal[has]
    loss = torch.logsumexp(q, dim=-1) - torch.logsumexp(q.masked_fill(~optimal, float("-inf")), dim=-1)
    hit = optimal.gather(1, q.argmax(dim=-1, keepdim=True)).float().mean()
    return loss.mean(), hit


def margin_loss(q: torch.Tensor, labels: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DQfD's large-margin loss (Hester et al. 2018) with a set of expert actions: per row,
    ``relu(max over the other actions of Q + margin - max over the labelled actions of Q)``, zero
    on rows labelled with every action (nothing to rank), averaged over the labelled rows (DQfD's
    convention and that of ``optimal_action_loss``; averaging over all rows instead, about a sixth
    of the pull at the quickstart's 16 % labelled share, did worse: docs/results.md, sessions
    34-35). ``labels``: bool ``[N, actions]``. Also returns the share of ranked rows whose argmax
    is labelled."""
    labelled = labels.any(dim=-1)
    ranked = labelled & ~labels.all(dim=-1)
    if not bool(ranked.any()):
        zero = q.sum() * 0
        return zero, zero.detach()
    best_expert = q.masked_fill(~labels, float("-inf")).amax(dim=-1)
    best_other = q.masked_fill(labels, float("-inf")).amax(dim=-1)
    gap = torch.where(ranked, torch.relu(best_other + margin - best_expert), torch.zeros_like(best_expert))
    hit = labels.gather(1, q.argmax(dim=-1, keepdim=True)).squeeze(1)[ranked].float().mean()
    return gap[labelled].mean(), hit


def successful_episode(reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """Per action (rows in sequence order, ``done`` closing each episode): whether its episode
    ends with a nonzero reward, i.e. reached a goal in Frozen Lake."""
    ends = done.long()
    episode = torch.cumsum(ends, 0) - ends  # index of the episode each action belongs to
    if not bool(done[-1]):
        raise ValueError("the last action row must close an episode")
    return (reward[done] != 0)[episode]


def position_weights(marked: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight`` on the ``marked`` rows and 1 elsewhere, scaled to mean 1."""
    w = 1 + (weight - 1) * marked.float()
    return w / w.mean().clamp(min=1e-6)


@torch.no_grad()
def polyak_(target: list[torch.Tensor], online: list[torch.Tensor], alpha: float) -> None:
    """phi <- alpha * theta + (1 - alpha) * phi, in place."""
    # Two products and a sum, each rounded once: bit-identical to the formula written out.
    torch._foreach_mul_(target, 1.0 - alpha)
    torch._foreach_add_(target, torch._foreach_mul(online, alpha))
