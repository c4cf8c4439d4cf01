"""GFlowNet objectives: exact values against the definitions, gradients, and that minimising
them really makes P(x) proportional to R(x) on a small tree (exact enumeration)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from contraq.training.losses import (
    LogZHead,
    modified_subtb_loss,
    tb_stats,
    termination_steps,
    trajectory_balance_loss,
    trajectory_balance_residual,
    vargrad_loss,
)

TERM = 7
PAD = 0
VOCAB = 10


def random_batch(
    B: int, T: int, P: int, term_steps: list[int | None], seed: int, garbage: float = 50.0
) -> dict[str, torch.Tensor]:
    """Random log-probs and rewards; actions end at `term_steps[b]` (None: no termination).

    Everything after termination (and log_pterm before min_len, set by the caller) holds large
    garbage rather than the conventional 0, so a loss that reads it would be caught. The prompt
    deliberately contains the termination token.
    """
    g = torch.Generator().manual_seed(seed)
    assert len(term_steps) == B
    prompt = torch.randint(1, VOCAB, (B, P), generator=g)
    prompt[:, 0] = TERM
    non_term = torch.tensor([v for v in range(1, VOCAB) if v != TERM])
    actions = non_term[torch.randint(0, len(non_term), (B, T), generator=g)]
    for b, k in enumerate(term_steps):
        if k is not None:
            actions[b, k] = TERM
            actions[b, k + 1 :] = PAD
    log_pf = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    log_pterm = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    log_r = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    for b, k in enumerate(term_steps):
        if k is not None:
            log_pf[b, k] = log_pterm[b, k]
            log_pf[b, k + 1 :] = garbage
            log_pterm[b, k + 1 :] = garbage
            log_r[b, k + 1 :] = garbage
    return {
        "generated_text": torch.cat([prompt, actions], dim=1),
        "log_pf": log_pf,
        "log_pterm": log_pterm,
        "log_r": log_r,
    }


def brute_subtb(log_pf, log_r, log_pterm, actions, lam: float, min_len: int) -> float:
    """Straight from the definition: plain loops over rows, start states and lengths."""
    B, T = log_pf.shape
    num = den = 0.0
    for b in range(B):
        row = actions[b].tolist()
        k = row.index(TERM) if TERM in row else T
        for i in range(T):
            for L in range(1, T):
                last = i + L - 1  # last transition s_last -> s_{last+1}
                if i < min_len or last >= k or last > T - 2:
                    continue
                s = 0.0
                for t in range(i, i + L):
                    s += (
                        log_r[b, t].item()
                        + log_pf[b, t].item()
                        + log_pterm[b, t + 1].item()
                        - log_r[b, t + 1].item()
                        - log_pterm[b, t].item()
                    )
                w = lam ** (L - 1)
                num += w * s * s
                den += w
    return num / den if den else 0.0


def brute_tb(log_z, log_pf, log_pterm, log_r, actions) -> float:
    total = 0.0
    B = log_pf.shape[0]
    for b in range(B):
        k = actions[b].tolist().index(TERM)
        s = log_z[b].item() + sum(log_pf[b, t].item() for t in range(k))
        s += log_pterm[b, k].item() - log_r[b].item()
        total += s * s
    return total / B


def test_termination_steps():
    actions = torch.tensor([[1, TERM, PAD], [TERM, PAD, PAD], [1, 2, 3], [1, 2, TERM]])
    assert termination_steps(actions, TERM).tolist() == [1, 0, 3, 2]


@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subtb_matches_brute_force(lam: float, seed: int):
    T, P = 9, 4
    # step 0, the last slot, never, and random points in between
    rng = torch.Generator().manual_seed(100 + seed)
    middle = torch.randint(1, T - 1, (4,), generator=rng).tolist()
    steps: list[int | None] = [0, T - 1, None, *middle]
    min_len = int(torch.randint(0, 4, (1,), generator=rng))
    batch = random_batch(len(steps), T, P, steps, seed)
    # log_pterm before min_len is undefined: garbage there must not matter
    batch["log_pterm"][:, :min_len] = 123.0
    got = modified_subtb_loss(
        batch["log_pf"],
        batch["log_r"],
        batch["log_pterm"],
        batch["generated_text"],
        TERM,
        P,
        subtb_lambda=lam,
        min_len=min_len,
    )
    actions = batch["generated_text"][:, P:]
    want = brute_subtb(batch["log_pf"], batch["log_r"], batch["log_pterm"], actions, lam, min_len)
    assert got.shape == ()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert want > 0


def test_subtb_degenerate_batch_is_zero_with_graph():
    # every row terminates at a step <= min_len: no usable sub-trajectory
    T, P, min_len = 8, 3, 2
    batch = random_batch(3, T, P, [0, 1, 2], seed=5)
    log_pf = batch["log_pf"].clone().requires_grad_(True)
    log_pterm = batch["log_pterm"].clone()
    log_pterm[:, :min_len] = -math.inf  # masked termination: -inf must not give NaN
    loss = modified_subtb_loss(
        log_pf, batch["log_r"], log_pterm, batch["generated_text"], TERM, P, min_len=min_len
    )
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(log_pf.grad, torch.zeros_like(log_pf))


def test_subtb_non_finite_values_where_undefined_are_ignored():
    # -inf before min_len (masked termination) and NaN after termination: neither may leak
    T, P, min_len = 8, 3, 2
    batch = random_batch(4, T, P, [5, 7, None, 3], seed=6, garbage=math.nan)
    log_pf = batch["log_pf"].clone().requires_grad_(True)
    log_pterm = batch["log_pterm"].clone()
    log_pterm[:, :min_len] = -math.inf
    loss = modified_subtb_loss(
        log_pf, batch["log_r"], log_pterm, batch["generated_text"], TERM, P, min_len=min_len
    )
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(log_pf.grad).all()
    # states before min_len and tokens after termination get no gradient
    assert torch.all(log_pf.grad[:, :min_len] == 0)
    assert torch.all(log_pf.grad[0, 5:] == 0) and torch.all(log_pf.grad[3, 3:] == 0)


def test_subtb_rejects_bad_shapes():
    batch = random_batch(2, 6, 3, [2, 3], seed=0)
    with pytest.raises(ValueError, match="prompt_len"):
        modified_subtb_loss(
            batch["log_pf"], batch["log_r"], batch["log_pterm"], batch["generated_text"], TERM, 4
        )
    with pytest.raises(ValueError, match="one shape"):
        modified_subtb_loss(
            batch["log_pf"],
            batch["log_r"][:, :5],
            batch["log_pterm"],
            batch["generated_text"],
            TERM,
            3,
        )


def _subtb_grad(log_r: torch.Tensor, batch: dict, P: int) -> tuple[float, torch.Tensor]:
    log_pf = batch["log_pf"].clone().requires_grad_(True)
    loss = modified_subtb_loss(
        log_pf, log_r, batch["log_pterm"], batch["generated_text"], TERM, P, subtb_lambda=0.9
    )
    loss.backward()
    return loss.item(), log_pf.grad


def test_subtb_gradient_depends_on_per_prefix_rewards():
    P, T = 3, 8
    batch = random_batch(4, T, P, [6, 7, 4, 5], seed=11)
    loss_a, grad_a = _subtb_grad(batch["log_r"], batch, P)
    shifted = batch["log_r"].clone()
    shifted[:, 2] += 1.5  # one prefix reward changes
    loss_b, grad_b = _subtb_grad(shifted, batch, P)
    assert loss_a != pytest.approx(loss_b)
    assert not torch.allclose(grad_a, grad_b)


def test_broadcast_terminal_reward_cancels_out():
    """docs/DESIGN.md section 3: a reward constant along each row cancels from every delta.

    Broadcasting the terminal reward to all prefixes therefore gives a loss (and gradient)
    that do not depend on the reward at all. This test pins that down so nobody trains that way.
    """
    P, T = 3, 8
    batch = random_batch(4, T, P, [6, 7, 4, 5], seed=12)
    terminal = torch.randn(4, dtype=torch.float64)
    loss_1, grad_1 = _subtb_grad(terminal[:, None].expand(4, T).clone(), batch, P)
    loss_2, grad_2 = _subtb_grad((terminal * 7 - 3)[:, None].expand(4, T).clone(), batch, P)
    assert loss_1 == pytest.approx(loss_2, rel=1e-6)
    assert torch.allclose(grad_1, grad_2, atol=1e-6)
    # while distinct per-prefix rewards do change it
    loss_3, grad_3 = _subtb_grad(batch["log_r"], batch, P)
    assert loss_3 != pytest.approx(loss_1, rel=1e-3)
    assert not torch.allclose(grad_1, grad_3, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_tb_matches_brute_force(seed: int):
    T, P = 9, 4
    steps = [0, T - 1, 3, 5, 1]
    batch = random_batch(len(steps), T, P, steps, seed)
    log_z = torch.randn(len(steps), dtype=torch.float64)
    log_r = batch["log_r"][:, 0].clone()
    got = trajectory_balance_loss(
        log_z, batch["log_pf"], batch["log_pterm"], log_r, batch["generated_text"], TERM, P
    )
    want = brute_tb(
        log_z, batch["log_pf"], batch["log_pterm"], log_r, batch["generated_text"][:, P:]
    )
    assert got.item() == pytest.approx(want, rel=1e-5)
    per_sample = trajectory_balance_loss(
        log_z,
        batch["log_pf"],
        batch["log_pterm"],
        log_r,
        batch["generated_text"],
        TERM,
        P,
        reduction="none",
    )
    assert per_sample.shape == (len(steps),)
    assert per_sample.mean().item() == pytest.approx(want, rel=1e-5)


def test_tb_rejects_unterminated_rows():
    batch = random_batch(3, 6, 2, [2, None, 5], seed=0)
    args = (torch.zeros(3), batch["log_pf"], batch["log_pterm"], torch.zeros(3))
    with pytest.raises(ValueError, match=r"rows \[1\] hold no termination token"):
        trajectory_balance_loss(*args, batch["generated_text"], TERM, 2)
    with pytest.raises(ValueError, match="reduction"):
        trajectory_balance_loss(
            *args,
            batch["generated_text"],
            TERM,
            2,
            reduction="avg",  # type: ignore[arg-type]
        )


def test_tb_gradient_depends_on_reward():
    T, P = 6, 2
    batch = random_batch(3, T, P, [2, 4, 5], seed=3)

    def grads(log_r):
        log_pf = batch["log_pf"].clone().requires_grad_(True)
        log_z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        trajectory_balance_loss(
            log_z, log_pf, batch["log_pterm"], log_r, batch["generated_text"], TERM, P
        ).backward()
        return log_pf.grad, log_z.grad

    pf_a, z_a = grads(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    pf_b, z_b = grads(torch.tensor([0.0, 3.0, 2.0], dtype=torch.float64))
    assert not torch.allclose(pf_a, pf_b) and not torch.allclose(z_a, z_b)
    # only the row whose reward changed moves, and only before its termination step
    assert torch.allclose(pf_a[[0, 2]], pf_b[[0, 2]])
    assert torch.all(pf_a[0, 2:] == 0)  # t > k = 2 (t == k enters via log_pterm)


def test_tb_stats_consistency():
    batch = random_batch(3, 6, 2, [2, 4, 5], seed=4)
    log_z = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    log_r = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    res = trajectory_balance_residual(
        log_z, batch["log_pf"], batch["log_pterm"], log_r, batch["generated_text"], TERM, 2
    )
    stats = tb_stats(res, log_z)
    assert stats["residual_mean"] == pytest.approx(res.mean().item())
    assert stats["implied_log_z_mean"] == pytest.approx((log_z - res).mean().item())


def brute_vargrad(log_pf, log_pterm, log_r, actions, groups) -> tuple[float, list[float]]:
    """Loops: each row's log P(x) - log R(x) minus its prompt's mean of the same."""
    d = []
    for b in range(log_pf.shape[0]):
        k = actions[b].tolist().index(TERM)
        s = sum(log_pf[b, t].item() for t in range(k)) + log_pterm[b, k].item()
        d.append(s - log_r[b].item())
    total, log_z = 0.0, []
    for b, g in enumerate(groups):
        same = [d[c] for c, h in enumerate(groups) if h == g]
        total += (d[b] - sum(same) / len(same)) ** 2
        log_z.append(-sum(same) / len(same))
    return total / len(d), log_z


@pytest.mark.parametrize("groups", [[2, 4, 9, 9, 9, 4, 2], [4, 4, 9, 9, 9, 4, 9]])
def test_vargrad_matches_brute_force(groups: list[int]):
    T, P = 9, 4
    steps = [0, T - 1, 3, 5, 1, 2, 6]
    batch = random_batch(len(steps), T, P, steps, seed=len(set(groups)))
    log_r = batch["log_r"][:, 0].clone()
    args = (batch["log_pf"], batch["log_pterm"], log_r, batch["generated_text"], TERM, P)
    loss, log_z = vargrad_loss(*args, torch.tensor(groups))
    want, want_z = brute_vargrad(
        batch["log_pf"], batch["log_pterm"], log_r, batch["generated_text"][:, P:], groups
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert log_z.tolist() == pytest.approx(want_z, rel=1e-5)


def test_vargrad_is_tb_at_the_batch_optimal_log_z():
    """VarGrad equals TB whose log Z per prompt minimises the TB loss on the batch."""
    batch = random_batch(6, 7, 3, [2, 4, 6, 1, 3, 5], seed=5)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    rest = (batch["log_pf"], batch["log_pterm"], batch["log_r"][:, 0])
    loss, log_z = vargrad_loss(*rest, batch["generated_text"], TERM, 3, groups)
    tb = trajectory_balance_loss(log_z, *rest, batch["generated_text"], TERM, 3)
    assert loss.item() == pytest.approx(tb.item(), rel=1e-6)
    for shift in (-0.3, 0.3):  # any other log Z gives a larger TB loss
        moved = log_z + shift * (groups == 0)
        worse = trajectory_balance_loss(moved, *rest, batch["generated_text"], TERM, 3)
        assert worse.item() > tb.item()


def test_vargrad_gradient_depends_on_reward():
    T, P = 6, 2
    batch = random_batch(4, T, P, [2, 4, 5, 3], seed=3)
    groups = torch.tensor([0, 0, 1, 1])

    def grad(log_r):
        log_pf = batch["log_pf"].clone().requires_grad_(True)
        loss, _ = vargrad_loss(
            log_pf, batch["log_pterm"], log_r, batch["generated_text"], TERM, P, groups
        )
        loss.backward()
        return log_pf.grad

    base = torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=torch.float64)
    g_a = grad(base)
    g_b = grad(base + torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    assert not torch.allclose(g_a[:2], g_b[:2])
    assert torch.allclose(g_a[2:], g_b[2:])  # the other prompt is untouched
    # a reward shift shared by all rows of a prompt cancels (its log Z absorbs it)
    g_c = grad(base + torch.tensor([5.0, 5.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(g_a, g_c)


def test_vargrad_rejects_a_prompt_with_one_row():
    batch = random_batch(3, 6, 2, [2, 4, 5], seed=0)
    args = (batch["log_pf"], batch["log_pterm"], torch.zeros(3), batch["generated_text"], TERM, 2)
    with pytest.raises(ValueError, match="at least 2 rows per prompt"):
        vargrad_loss(*args, torch.tensor([0, 0, 1]))


# ---------------------------------------------------------------------------------------------
# The objectives, not only the arithmetic: a tabular policy on a small tree of questions.
# Tokens: 0 = "a", 1 = "b", 2 = "?" (termination), 3 = pad; T = 3 action slots, so at most two
# letters and then "?" (at s_2 only termination is allowed, like max_len in the sampler).
A_TOK, B_TOK, Q_TOK, PAD_TOK = 0, 1, 2, 3
T_TREE = 3


class TabularTree:
    """All prefixes over {a, b} of length < T_TREE; one row of logits per prefix."""

    def __init__(self, min_len: int, seed: int) -> None:
        self.min_len = min_len
        self.states = [
            p for n in range(T_TREE) for p in itertools.product((A_TOK, B_TOK), repeat=n)
        ]
        self.index = {p: i for i, p in enumerate(self.states)}
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.randn(len(self.states), 3, generator=g, dtype=torch.float64)
        self.theta.requires_grad_(True)
        # legal actions per state: no "?" before min_len, only "?" at the last slot
        self.allowed = torch.ones(len(self.states), 3, dtype=torch.bool)
        for p, i in self.index.items():
            if len(p) < min_len:
                self.allowed[i, Q_TOK] = False
            if len(p) == T_TREE - 1:
                self.allowed[i, [A_TOK, B_TOK]] = False
        # every complete question = a prefix of length >= min_len, then "?"
        self.objects = [p for p in self.states if len(p) >= min_len]
        B = len(self.objects)
        self.actions = torch.full((B, T_TREE), PAD_TOK)
        self.state_at = torch.zeros(B, T_TREE, dtype=torch.long)
        self.k = torch.tensor([len(p) for p in self.objects])
        for b, p in enumerate(self.objects):
            for t in range(len(p) + 1):
                self.state_at[b, t] = self.index[p[:t]]
            self.actions[b, : len(p)] = torch.tensor(p, dtype=torch.long)
            self.actions[b, len(p)] = Q_TOK
        self.generated_text = torch.cat([torch.full((B, 2), 9), self.actions], dim=1)

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log_pf, log_pterm [B, T] in the conventions of docs/ARCHITECTURE.md."""
        logits = self.theta.masked_fill(~self.allowed, -math.inf)
        lp = torch.log_softmax(logits, dim=-1)[self.state_at]  # [B, T, 3]
        t = torch.arange(T_TREE)
        active = t[None, :] <= self.k[:, None]
        act = self.actions.clamp(max=Q_TOK)
        log_pf = lp.gather(2, act[..., None]).squeeze(-1)
        log_pf = torch.where(active, log_pf, torch.zeros_like(log_pf))
        can_stop = active & (t[None, :] >= self.min_len)
        log_pterm = torch.where(can_stop, lp[..., Q_TOK], torch.zeros_like(log_pf))
        return log_pf, log_pterm

    def terminal_probs(self) -> torch.Tensor:
        log_pf, _ = self.log_probs()
        return log_pf.sum(dim=1).exp()


def _rewards(tree: TabularTree, seed: int) -> dict[tuple[int, ...], float]:
    g = torch.Generator().manual_seed(seed)
    return {p: float(torch.rand(1, generator=g)) * 4 + 0.2 for p in tree.states}


def _tree_far_from_target(tree_seed: int) -> tuple[TabularTree, torch.Tensor, torch.Tensor]:
    """A tree (min_len 1), terminal log-rewards of its objects and the target P ~ R, which the
    tree's initial policy is far from."""
    tree = TabularTree(min_len=1, seed=tree_seed)
    reward = _rewards(tree, seed=tree_seed + 1)
    log_r = torch.tensor([math.log(reward[p]) for p in tree.objects], dtype=torch.float64)
    target = log_r.exp() / log_r.exp().sum()
    with torch.no_grad():
        assert (tree.terminal_probs() - target).abs().max() > 0.05  # far from it at the start
    return tree, log_r, target


def test_tb_minimisation_gives_p_proportional_to_r():
    tree, log_r, target = _tree_far_from_target(0)
    log_z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([tree.theta, log_z], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        log_pf, log_pterm = tree.log_probs()
        loss = trajectory_balance_loss(
            log_z.expand(len(tree.objects)), log_pf, log_pterm, log_r, tree.generated_text, Q_TOK, 2
        )
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = tree.terminal_probs()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(p, target, atol=1e-3), (p, target)
    assert log_z.item() == pytest.approx(math.log(log_r.exp().sum().item()), abs=1e-3)


def test_vargrad_minimisation_gives_p_proportional_to_r():
    tree, log_r, target = _tree_far_from_target(6)
    opt = torch.optim.Adam([tree.theta], lr=0.1)
    groups = torch.zeros(len(tree.objects), dtype=torch.long)  # one prompt
    for _ in range(200):
        opt.zero_grad()
        log_pf, log_pterm = tree.log_probs()
        loss, _ = vargrad_loss(log_pf, log_pterm, log_r, tree.generated_text, Q_TOK, 2, groups)
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = tree.terminal_probs()
    assert torch.allclose(p, target, atol=1e-3), (p, target)


def _train_subtb(tree: TabularTree, reward: dict, steps: int = 200) -> None:
    # per-prefix rewards: log_r[b, t] = log R(s_t + "?"), 0 where undefined
    log_r = torch.zeros(len(tree.objects), T_TREE, dtype=torch.float64)
    for b, p in enumerate(tree.objects):
        for t in range(tree.min_len, len(p) + 1):
            log_r[b, t] = math.log(reward[p[:t]])
    opt = torch.optim.Adam([tree.theta], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        log_pf, log_pterm = tree.log_probs()
        loss = modified_subtb_loss(
            log_pf, log_r, log_pterm, tree.generated_text, Q_TOK, 2, min_len=tree.min_len
        )
        loss.backward()
        opt.step()


def test_subtb_minimisation_gives_p_proportional_to_r():
    tree = TabularTree(min_len=0, seed=2)
    reward = _rewards(tree, seed=3)
    r = torch.tensor([reward[x] for x in tree.objects], dtype=torch.float64)
    with torch.no_grad():
        assert (tree.terminal_probs() - r / r.sum()).abs().max() > 0.05
    _train_subtb(tree, reward)
    with torch.no_grad():
        p = tree.terminal_probs()
    assert torch.allclose(p, r / r.sum(), atol=1e-3), (p, r / r.sum())


def test_subtb_with_min_len_trains_only_conditionals():
    """States before min_len cannot terminate, so no sub-trajectory starts there: the first
    decision keeps its initial value and only P(x | first token) becomes proportional to R."""
    tree = TabularTree(min_len=1, seed=4)
    reward = _rewards(tree, seed=5)
    root = tree.index[()]
    root_before = tree.theta[root].detach().clone()
    _train_subtb(tree, reward)
    assert torch.equal(tree.theta[root].detach(), root_before)
    with torch.no_grad():
        p = tree.terminal_probs()
    for first in (A_TOK, B_TOK):
        group = [b for b, x in enumerate(tree.objects) if x[0] == first]
        r = torch.tensor([reward[tree.objects[b]] for b in group], dtype=torch.float64)
        cond = p[group] / p[group].sum()
        assert torch.allclose(cond, r / r.sum(), atol=1e-3), (cond, r / r.sum())


# ---------------------------------------------------------------------------------------------
def test_logz_head_masked_pooling_and_shape():
    torch.manual_seed(0)
    head = LogZHead(hidden_size=16, init_value=1.5, hidden_dim=8)
    hidden = torch.randn(3, 5, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    out = head(hidden, mask)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full((3,), 1.5))  # zero-initialised last layer
    with torch.no_grad():
        head.fc2.weight.normal_()  # a non-trivial head for the pooling checks
    out = head(hidden, mask)
    # padding values (even inf) and extra padding columns do not change the output
    noisy = hidden.clone()
    noisy[mask == 0] = math.inf
    assert torch.allclose(head(noisy, mask), out)
    wider = torch.cat([torch.randn(3, 2, 16), hidden], dim=1)
    wider_mask = torch.cat([torch.zeros(3, 2, dtype=torch.long), mask], dim=1)
    assert torch.allclose(head(wider, wider_mask), out, atol=1e-6)
    # equals the head applied to the manual masked mean
    row2 = head(hidden[2:3, 4:], torch.ones(1, 1, dtype=torch.long))
    assert torch.allclose(row2, out[2:3], atol=1e-6)
    # rows differ: the head is prompt-conditioned
    assert not torch.allclose(out[0], out[1])


def test_logz_head_float32_under_bf16_and_grad_flow():
    torch.manual_seed(1)
    head = LogZHead(hidden_size=8, hidden_dim=4)
    hidden = torch.randn(2, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.long)
    out = head(hidden, mask)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad is None  # detached by default
    assert head.fc2.weight.grad is not None and head.fc2.weight.grad.abs().sum() > 0
    group = head.param_group(lr=1e-2)
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(p) for p in head.parameters()}
    shared = LogZHead(hidden_size=8, hidden_dim=4, detach_input=False)
    with torch.no_grad():
        shared.fc2.weight.fill_(0.1)
    shared(hidden, mask).sum().backward()
    assert hidden.grad is not None


def test_subtb_single_slot_and_bf16_inputs():
    gen = torch.tensor([[5, TERM], [5, 3]])
    log_pf = torch.zeros(2, 1, requires_grad=True)
    loss = modified_subtb_loss(log_pf, torch.zeros(2, 1), torch.zeros(2, 1), gen, TERM, 1)
    assert loss.item() == 0.0 and loss.requires_grad
    batch = random_batch(3, 8, 2, [4, 7, 5], seed=9)
    args = (batch["generated_text"], TERM, 2)
    full = modified_subtb_loss(batch["log_pf"], batch["log_r"], batch["log_pterm"], *args)
    half = modified_subtb_loss(
        batch["log_pf"].bfloat16(), batch["log_r"].bfloat16(), batch["log_pterm"].bfloat16(), *args
    )
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)
