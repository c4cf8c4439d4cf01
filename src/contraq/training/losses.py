"""GFlowNet objectives: modified sub-trajectory balance, trajectory balance and VarGrad.

Tensor conventions (docs/ARCHITECTURE.md), for B trajectories with T action slots:

- ``generated_text: LongTensor[B, P + T]``: the (left-padded) prompt of width ``P = prompt_len``
  followed by the actions ``a_0 .. a_{T-1}``; the termination token ends a question and
  padding follows it.
- ``k_b``: the termination step of row ``b`` (``a_k`` is the first termination token).
  States ``s_0 .. s_k`` are the *unterminated part*; ``s_t`` may terminate only when
  ``t >= min_len``.
- ``log_pf[:, t] = log P_F(a_t | s_t)``, ``log_pterm[:, t] = log P_F(term | s_t)``: 0 after
  termination and (``log_pterm``) for ``t < min_len``; ``log_pf[:, k] == log_pterm[:, k]``.
- ``log_r[:, t] = log R(s_t term)`` per prefix (modified SubTB) or ``log_r[b]`` terminal (TB),
  already divided by the reward temperature.

Everything is computed in float32 whatever the dtype of the inputs (bf16 log-probs lose too
much precision once summed over a question), on the inputs' device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "LogZHead",
    "modified_subtb_loss",
    "subtb_valid_transitions",
    "tb_stats",
    "termination_steps",
    "trajectory_balance_loss",
    "trajectory_balance_residual",
    "vargrad_loss",
]


def termination_steps(actions: Tensor, termination_token_id: int) -> Tensor:
    """Index of the first termination token of each row.

    Args:
        actions: ``LongTensor[B, T]``, the generated tokens.
        termination_token_id: the token that ends a question.

    Returns:
        ``LongTensor[B]``: ``k_b`` with ``actions[b, k_b] == termination_token_id``, or ``T``
        where the row holds no termination token. ``k_b + 1`` is the question length.
    """
    is_term = actions == termination_token_id
    T = actions.shape[1]
    # argmax returns the first maximal index; rows without any True get T.
    first = is_term.long().argmax(dim=1)
    return torch.where(is_term.any(dim=1), first, torch.full_like(first, T))


def _split_actions(generated_text: Tensor, prompt_len: int, T: int) -> Tensor:
    """``generated_text[:, prompt_len:]`` after checking that its width is ``prompt_len + T``."""
    if generated_text.dim() != 2 or generated_text.shape[1] != prompt_len + T:
        raise ValueError(
            f"generated_text must be [B, prompt_len + T] = [B, {prompt_len} + {T}], "
            f"got {tuple(generated_text.shape)}"
        )
    return generated_text[:, prompt_len:]


def _check_same_shape(**tensors: Tensor) -> tuple[int, int]:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected tensors of one shape [B, T], got {shapes}")
    return first[0], first[1]


def _graph_zero(*tensors: Tensor) -> Tensor:
    """An exact scalar 0 attached to the graph of ``tensors`` (safe even if they hold inf)."""
    zero = tensors[0].new_zeros(())
    for t in tensors:
        zero = zero + torch.where(torch.zeros_like(t, dtype=torch.bool), t, 0.0).sum()
    return zero


def subtb_valid_transitions(k: Tensor, T: int, min_len: int = 0) -> Tensor:
    """Transitions that modified SubTB may use.

    Transition ``t`` goes ``s_t -> s_{t+1}`` by the non-terminal action ``a_t``. It is usable when
    both ends may terminate and have rewards: ``min_len <= t``, ``t < k`` (``a_t`` is not the
    termination token) and ``t <= T - 2`` (``s_{t+1}`` is inside the tensors).

    Args:
        k: ``LongTensor[B]`` termination steps (:func:`termination_steps`).
        T: number of action slots.
        min_len: first state at which termination is allowed.

    Returns:
        ``BoolTensor[B, T - 1]``.
    """
    t = torch.arange(max(T - 1, 0), device=k.device)
    return (t[None, :] >= min_len) & (t[None, :] < k[:, None])


def modified_subtb_loss(
    log_pf: Tensor,
    log_r: Tensor,
    log_pterm: Tensor,
    generated_text: Tensor,
    termination_token_id: int,
    prompt_len: int,
    subtb_lambda: float = 1.0,
    min_len: int = 0,
) -> Tensor:
    r"""Modified sub-trajectory balance (Hu et al. 2024), every prefix terminable.

    With ``delta_t = log_r[t] + log_pf[t] + log_pterm[t+1] - log_r[t+1] - log_pterm[t]``
    (``t = 0..T-2``), the loss is

    .. math:: \frac{\sum_{b,i,L} \lambda^{L-1} (\sum_{t=i}^{i+L-1} \delta_{b,t})^2}
                   {\sum_{b,i,L} \lambda^{L-1}}

    over every sub-trajectory ``[i, i+L)`` (``L >= 1``) whose transitions are all usable
    (:func:`subtb_valid_transitions`: from a state ``>= min_len`` up to the termination state).
    A row that terminates at a step ``<= min_len`` contributes nothing; a row without a
    termination token (truncated) uses its transitions up to ``s_{T-1}``, which is valid
    sub-trajectory data.

    WARNING: ``log_r`` must be a real reward for EVERY prefix. A reward that is constant along a
    row (e.g. the terminal reward broadcast to all prefixes) cancels out of every ``delta``: the
    loss then does not depend on the reward at all (tests/test_losses.py pins this down).

    Note: states before ``min_len`` cannot terminate, so no sub-trajectory starts there and the
    first ``min_len`` decisions get no learning signal from this loss; only the distribution
    conditioned on those first tokens is trained. Trajectory balance has no such gap.

    Implementation: with ``C[:, j] = sum_{t<j} delta_t`` (zeros at unusable transitions), the sum
    over ``[i, j)`` is ``C[:, j] - C[:, i]``; usable pairs are ``min_len <= i < j <= e_b`` with
    ``e_b = min(k_b, T - 1)``, so all pairs are computed at once as a ``[B, T, T]`` tensor.

    Args:
        log_pf: ``FloatTensor[B, T]``.
        log_r: ``FloatTensor[B, T]`` tempered per-prefix log-rewards.
        log_pterm: ``FloatTensor[B, T]``.
        generated_text: ``LongTensor[B, prompt_len + T]``.
        termination_token_id: the token that ends a question.
        prompt_len: padded prompt width ``P``.
        subtb_lambda: weight ``lambda^(L-1)`` of a sub-trajectory of ``L`` transitions.
        min_len: first state at which termination is allowed.

    Returns:
        Scalar float32 tensor; exactly 0 (still attached to the graph) when the batch has no
        usable sub-trajectory.
    """
    B, T = _check_same_shape(log_pf=log_pf, log_r=log_r, log_pterm=log_pterm)
    actions = _split_actions(generated_text, prompt_len, T)
    if subtb_lambda <= 0:
        raise ValueError(f"subtb_lambda must be > 0, got {subtb_lambda}")
    log_pf, log_r, log_pterm = log_pf.float(), log_r.float(), log_pterm.float()
    if T < 2:  # no transition at all
        return _graph_zero(log_pf, log_r, log_pterm)

    k = termination_steps(actions, termination_token_id)
    valid = subtb_valid_transitions(k, T, min_len)  # [B, T-1]
    delta = log_r[:, :-1] + log_pf[:, :-1] + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]
    # where (not a product): values at unusable slots may be undefined (even inf) and must
    # not leak NaN into the loss or its gradient.
    delta = torch.where(valid, delta, torch.zeros_like(delta))
    cum = torch.cat([delta.new_zeros(B, 1), delta.cumsum(dim=1)], dim=1)  # [B, T]
    sums = cum[:, None, :] - cum[:, :, None]  # sums[b, i, j] = sum_{i <= t < j} delta[b, t]

    idx = torch.arange(T, device=log_pf.device)
    end = torch.clamp(k, max=T - 1)  # last state of the usable part
    i, j = idx[None, :, None], idx[None, None, :]
    pair_ok = (i >= min_len) & (i < j) & (j <= end[:, None, None])  # [B, T, T]
    length = (j - i).clamp(min=1).to(delta.dtype)
    weight = torch.pow(
        torch.tensor(subtb_lambda, dtype=delta.dtype, device=delta.device), length - 1
    )
    weight = torch.where(pair_ok, weight.expand_as(pair_ok), torch.zeros_like(sums))
    # No usable pair: numerator and total are 0 and the clamp makes the loss an exact 0 that is
    # still attached to the graph (and no host sync is needed to test for it).
    total = weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
    return (weight * sums.pow(2)).sum() / total


def trajectory_balance_residual(
    log_z: Tensor,
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    generated_text: Tensor,
    termination_token_id: int,
    prompt_len: int,
) -> Tensor:
    """Per-trajectory TB residual ``log_z + sum_{t<k} log_pf[t] + log_pterm[k] - log_r``.

    Args:
        log_z: ``FloatTensor[B]`` (prompt-conditioned, :class:`LogZHead`).
        log_pf, log_pterm: ``FloatTensor[B, T]``.
        log_r: ``FloatTensor[B]`` terminal log-reward, already divided by the reward temperature.
        generated_text: ``LongTensor[B, prompt_len + T]``.
        termination_token_id, prompt_len: as in :func:`trajectory_balance_loss`.

    Returns:
        ``FloatTensor[B]`` (float32). ``log_r - (residual - log_z)`` is the per-sample estimate
        of log Z, useful to log next to ``log_z``.

    Raises:
        ValueError: a row holds no termination token (the sampler forces one at ``max_len``).
    """
    B, T = _check_same_shape(log_pf=log_pf, log_pterm=log_pterm)
    if tuple(log_z.shape) != (B,) or tuple(log_r.shape) != (B,):
        raise ValueError(
            f"log_z and log_r must be [B] = [{B}], got {tuple(log_z.shape)} and {tuple(log_r.shape)}"
        )
    actions = _split_actions(generated_text, prompt_len, T)
    k = termination_steps(actions, termination_token_id)
    unterminated = (k >= T).nonzero().flatten().tolist()
    if unterminated:
        raise ValueError(
            f"trajectory balance needs complete trajectories: rows {unterminated} hold no "
            f"termination token (id {termination_token_id}) within T={T} action slots"
        )
    t = torch.arange(T, device=log_pf.device)
    before = t[None, :] < k[:, None]  # [B, T]
    log_pf, log_pterm = log_pf.float(), log_pterm.float()
    sum_pf = torch.where(before, log_pf, torch.zeros_like(log_pf)).sum(dim=1)
    stop = log_pterm.gather(1, k[:, None]).squeeze(1)
    return log_z.float() + sum_pf + stop - log_r.float()


def trajectory_balance_loss(
    log_z: Tensor,
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    generated_text: Tensor,
    termination_token_id: int,
    prompt_len: int,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Trajectory balance with a learned, prompt-conditioned log Z.

    ``loss_b = (log_z[b] + sum_{t<k_b} log_pf[b, t] + log_pterm[b, k_b] - log_r[b])^2`` where
    ``k_b`` is the termination step (``log_pterm[k] == log_pf[k]`` by convention; the stop term
    is read from ``log_pterm`` as in docs/DESIGN.md section 3). Cheap: a terminal reward only.

    Args:
        log_z: ``FloatTensor[B]``.
        log_pf, log_pterm: ``FloatTensor[B, T]``.
        log_r: ``FloatTensor[B]`` tempered terminal log-reward (``log R / T_reward``).
        generated_text: ``LongTensor[B, prompt_len + T]``.
        termination_token_id: the token that ends a question.
        prompt_len: padded prompt width ``P``.
        reduction: ``mean`` (scalar), ``sum`` (scalar) or ``none`` (``[B]``).

    Raises:
        ValueError: a row holds no termination token, or an unknown reduction.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    residual = trajectory_balance_residual(
        log_z, log_pf, log_pterm, log_r, generated_text, termination_token_id, prompt_len
    )
    per_sample = residual.pow(2)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def vargrad_loss(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    generated_text: Tensor,
    termination_token_id: int,
    prompt_len: int,
    groups: Tensor,
) -> tuple[Tensor, Tensor]:
    """VarGrad: trajectory balance with log Z replaced by its batch estimate per prompt.

    With ``d_b = sum_{t<k_b} log_pf[b, t] + log_pterm[b, k_b] - log_r[b]`` (the TB residual
    at log Z = 0) and ``g(b)`` the prompt of row ``b``,
    ``loss = mean_b (d_b - mean_{c: g(c) = g(b)} d_c)^2``. Its minimum (0) is again
    ``P(x) proportional to R(x)`` per prompt, the batch's own ``log Z = -mean d`` never lags
    behind the policy (a learned log Z far below balance makes every residual negative and
    pushes all sampled questions up together), and no log Z head is trained.

    Args:
        log_pf, log_pterm, log_r, generated_text, termination_token_id, prompt_len: as in
            :func:`trajectory_balance_loss`.
        groups: ``LongTensor[B]``, the prompt (fact) of each row; every prompt needs >= 2 rows.

    Returns:
        ``(loss, log_z)``: the scalar loss and the ``FloatTensor[B]`` batch estimate of log Z
        of each row's prompt (detached, for logging).

    Raises:
        ValueError: a prompt with a single row, or a row without termination token.
    """
    zeros = torch.zeros(log_r.shape, dtype=torch.float32, device=log_pf.device)
    d = trajectory_balance_residual(
        zeros, log_pf, log_pterm, log_r, generated_text, termination_token_id, prompt_len
    )
    if tuple(groups.shape) != tuple(d.shape):
        raise ValueError(f"groups must be [B] = [{d.shape[0]}], got {tuple(groups.shape)}")
    _, inverse = torch.unique(groups.to(d.device), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    counts = torch.zeros(n_groups, device=d.device).index_add_(0, inverse, torch.ones_like(d))
    if bool((counts < 2).any()):
        raise ValueError("VarGrad needs at least 2 rows per prompt (train.n_samples >= 2)")
    means = torch.zeros(n_groups, device=d.device).index_add_(0, inverse, d) / counts
    centred = d - means[inverse]
    return centred.pow(2).mean(), -means[inverse].detach()


@torch.no_grad()
def tb_stats(residual: Tensor, log_z: Tensor) -> dict[str, float]:
    """Logging statistics of a TB batch.

    Args:
        residual: ``FloatTensor[B]`` from :func:`trajectory_balance_residual`.
        log_z: ``FloatTensor[B]``.

    Returns:
        ``residual_mean`` (signed: > 0 means log Z is over-estimated), ``residual_abs_mean``,
        ``residual_std``, ``log_z_mean`` and ``implied_log_z_mean`` (the per-sample estimate
        ``log_z - residual`` averaged: where log Z heads on-policy).
    """
    residual, log_z = residual.detach().float(), log_z.detach().float()
    return {
        "residual_mean": residual.mean().item(),
        "residual_abs_mean": residual.abs().mean().item(),
        "residual_std": residual.std().item() if residual.numel() > 1 else 0.0,
        "log_z_mean": log_z.mean().item(),
        "implied_log_z_mean": (log_z - residual).mean().item(),
    }


class LogZHead(nn.Module):
    """Prompt-conditioned log Z: a small MLP on the mask-aware mean of the prompt hidden states.

    ``LayerNorm -> Linear(H, hidden_dim) -> GELU -> Linear(hidden_dim, 1)``, computed in float32
    (autocast off) whatever the LM's dtype. The last layer starts at zero weight and bias
    ``init_value``, so every prompt starts at ``log Z = init_value``.

    log Z needs its own, larger learning rate and no weight decay (decay would pull log Z towards
    0). Use :meth:`param_group`::

        optimizer = torch.optim.AdamW(
            [{"params": lora_params, "lr": 1e-4}, log_z_head.param_group(lr=1e-2)]
        )

    Args:
        hidden_size: the LM's hidden size ``H``.
        init_value: initial log Z of every prompt.
        hidden_dim: width of the hidden layer.
        detach_input: stop the TB gradient at the LM's hidden states (default). The policy is
            then trained only through log P_F, and log Z's error signal does not reshape the LM's
            representations; pass ``False`` to share the trunk.
    """

    def __init__(
        self,
        hidden_size: int,
        init_value: float = 0.0,
        hidden_dim: int = 256,
        detach_input: bool = True,
    ) -> None:
        super().__init__()
        self.detach_input = detach_input
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, float(init_value))

    def param_group(self, lr: float, weight_decay: float = 0.0) -> dict:
        """An optimizer parameter group for this head (its own lr, no decay by default)."""
        return {"params": list(self.parameters()), "lr": lr, "weight_decay": weight_decay}

    def forward(self, hidden: Tensor, prompt_mask: Tensor) -> Tensor:
        """log Z per prompt.

        Args:
            hidden: ``FloatTensor[B, P, H]`` prompt hidden states (last layer), any dtype.
            prompt_mask: ``[B, P]``, 1 on real tokens (left padding is ignored).

        Returns:
            ``FloatTensor[B]`` (float32).
        """
        if hidden.dim() != 3 or tuple(prompt_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"hidden must be [B, P, H] and prompt_mask [B, P], got {tuple(hidden.shape)} "
                f"and {tuple(prompt_mask.shape)}"
            )
        if self.detach_input:
            hidden = hidden.detach()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h = hidden.float()
            m = prompt_mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)  # [B, P, 1]
            # where, not h * m: padded positions may hold anything, inf included.
            h = torch.where(m > 0, h, torch.zeros_like(h))
            pooled = h.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B, H]
            x = nn.functional.layer_norm(
                pooled,
                self.norm.normalized_shape,
                self.norm.weight.float(),
                self.norm.bias.float(),
                self.norm.eps,
            )
            x = self.act(self._linear(self.fc1, x))
            return self._linear(self.fc2, x).squeeze(-1)

    @staticmethod
    def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
        # float32 even if someone cast the module to bf16 along with the LM.
        return nn.functional.linear(x, layer.weight.float(), layer.bias.float())
