"""The one linear-algebra core (anatomy_prune.linalg) against direct computations on random problems in
float64: explicit Gram sums, torch.linalg.lstsq, explicit inverses; full-rank and rank-deficient inputs."""
from __future__ import annotations

import logging

import pytest
import torch

from anatomy_prune.linalg import (ILL_POSED_RIDGE, FitSpec, add_gram, column_energy, fit_removed, gram, moment_diagonal,
                                  output_energy, quad, refit, second_moment, unexplained_share)

D = torch.float64


def data(tokens: int = 300, d: int = 12, seed: int = 0, dependent: bool = False) -> torch.Tensor:
    """Random activations [tokens, d] with a non-zero mean; `dependent`: column 5 = 2 x col 3 - col 7 + 1
    and column 9 a copy of column 0 (a rank-deficient problem)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=D) @ torch.randn(d, d, generator=g, dtype=D) + 0.5
    if dependent:
        x[:, 5] = 2 * x[:, 3] - x[:, 7] + 1
        x[:, 9] = x[:, 0]
    return x


def with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)   # [tokens, d+1]


def full_gram(x: torch.Tensor) -> torch.Tensor:
    z = with_ones(x)
    return z.t() @ z                                                          # [d+1, d+1]


def test_gram_sums_batches_of_ones_augmented_rows():
    x = data()
    total = None
    for part in x.split(70):                                                  # uneven batches
        total = add_gram(total, part)
    assert total.dtype == D and total[-1, -1] == x.shape[0]
    torch.testing.assert_close(total, full_gram(x), rtol=1e-5, atol=1e-3)    # float32 per batch
    torch.testing.assert_close(gram(x[:10]), full_gram(x[:10]).float(), rtol=1e-5, atol=1e-4)


def test_moments_quadratic_forms_and_energies_match_direct_sums():
    x = data()
    g = full_gram(x)
    n = x.shape[0]
    centred = x - x.mean(0)
    torch.testing.assert_close(second_moment(g, centred=True), centred.t() @ centred / n)
    torch.testing.assert_close(second_moment(g, centred=False), x.t() @ x / n)
    torch.testing.assert_close(moment_diagonal(g, centred=True), centred.pow(2).mean(0))
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(7, 12, generator=gen, dtype=D), torch.randn(7, generator=gen, dtype=D)
    m = g[:-1, :-1]
    assert quad(w, m, rows=3) == pytest.approx(float(torch.trace(w @ m @ w.t())), rel=1e-12)   # in row chunks
    assert output_energy(w, b, g) == pytest.approx(float((x @ w.t() + b).pow(2).sum()), rel=1e-12)
    assert output_energy(w, None, g) == pytest.approx(float((x @ w.t()).pow(2).sum()), rel=1e-12)
    torch.testing.assert_close(column_energy(w.float(), rows=2), w.pow(2).sum(0), rtol=1e-6, atol=1e-6)


def test_unexplained_share_without_ridge_is_one_minus_r2_of_lstsq():
    """ridge 0, full rank: the share of neuron j is the residual of a least-squares fit of x_j on every
    other column and a constant, over its centred energy (torch.linalg.lstsq, one fit per column)."""
    x = data()
    share = unexplained_share(full_gram(x), ridge=0.0)
    for j in range(x.shape[1]):
        others = with_ones(torch.cat([x[:, :j], x[:, j + 1:]], dim=1))
        coef = torch.linalg.lstsq(others, x[:, j:j + 1]).solution
        resid = (x[:, j:j + 1] - others @ coef).pow(2).sum()
        assert float(share[j]) == pytest.approx(float(resid / (x[:, j] - x[:, j].mean()).pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("ridge", [1e-2, 1e-6])
def test_unexplained_share_with_ridge_matches_the_explicit_inverse_when_rank_deficient(ridge):
    x = data(dependent=True)
    g = full_gram(x)
    c = torch.cov(x.t(), correction=0)                                         # [d, d]
    lam = ridge * float(torch.diagonal(c).mean())
    want = 1.0 / (torch.diagonal(c) * torch.diagonal(torch.linalg.inv(c + lam * torch.eye(12, dtype=D))))
    got = unexplained_share(g, ridge)
    torch.testing.assert_close(got, want.clamp(0, 1), rtol=1e-6, atol=1e-9)
    assert got[5] < 0.05 and got[9] < 0.05 and got[0] < 0.05 and got[1] > 0.05   # rebuilt from the others
    torch.testing.assert_close(unexplained_share(g.float(), ridge), got, rtol=1e-3, atol=1e-5)  # any dtype in


@pytest.mark.parametrize("intercept", [True, False])
def test_fit_without_ridge_is_the_lstsq_solution(intercept):
    x = data(seed=2)
    keep, removed = [0, 2, 3, 6, 8, 10, 11], [1, 4, 5, 7, 9]
    coef, info = fit_removed(full_gram(x), keep, removed, intercept=intercept, ridge=0.0)
    design = with_ones(x[:, keep]) if intercept else x[:, keep]
    want = torch.linalg.lstsq(design, x[:, removed]).solution                 # [|K| (+1), |R|]
    torch.testing.assert_close(coef, want, rtol=1e-6, atol=1e-8)
    assert not info["ill_posed"] and info["ridge"] == 0.0


def test_ridge_fit_matches_the_explicit_normal_equations():
    x = data(seed=3)
    keep, removed, ridge = [1, 2, 5, 7, 8], [0, 3, 4], 0.05
    g = full_gram(x)
    coef, _ = fit_removed(g, keep, removed, ridge=ridge)
    z = with_ones(x[:, keep])
    a = z.t() @ z
    pen = torch.diag(torch.tensor([1.0] * len(keep) + [0.0], dtype=D))        # the constant is not penalised
    scale = float(torch.diagonal(a)[:-1].mean())
    want = torch.linalg.inv(a + ridge * scale * pen) @ (z.t() @ x[:, removed])
    torch.testing.assert_close(coef, want, rtol=1e-8, atol=1e-10)


def test_rank_deficient_kept_inputs_are_regularised_and_fit_as_well_as_lstsq(caplog):
    """Kept columns 3, 7 and 5 = 2 x 3 - 7 + 1 (and a constant) are singular: with ridge 0 the fit says so,
    regularises, and still rebuilds the removed columns about as well as lstsq's minimum-norm solution."""
    x = data(seed=4, dependent=True)
    keep, removed = [0, 1, 3, 5, 7, 9], [2, 4, 6]                             # 9 duplicates 0
    with caplog.at_level(logging.WARNING, logger="anatomy_prune.linalg"):
        coef, info = fit_removed(full_gram(x), keep, removed, ridge=0.0)
    assert "singular" in caplog.text and info["ill_posed"] and info["ridge"] > 0
    z = with_ones(x[:, keep])
    best = torch.linalg.lstsq(z, x[:, removed], driver="gelsd").solution
    resid = (x[:, removed] - z @ coef).pow(2).sum()
    floor = (x[:, removed] - z @ best).pow(2).sum()
    assert float(resid) <= float(floor) * (1 + 1e-4) + 1e-8


def test_too_few_tokens_raise_the_ridge(caplog):
    x = data(tokens=5)
    with caplog.at_level(logging.WARNING, logger="anatomy_prune.linalg"):
        _, info = fit_removed(full_gram(x), list(range(8)), [8, 9], ridge=1e-4, where="layer 3: ")
    assert info["ill_posed"] and info["ridge"] >= ILL_POSED_RIDGE and "layer 3: only 5 calibration tokens" in caplog.text


@pytest.mark.parametrize("dependent", [False, True])
def test_refit_errors_are_the_direct_output_residuals(dependent):
    """A projection y = W x + b losing columns R: the removed error is ||W_R x_R||^2 summed over tokens, the
    compensated error is what is left after adding delta to the kept columns, and with ridge ~0 that equals
    the least-squares minimum over every possible delta (lstsq in output space)."""
    x = data(seed=5, dependent=dependent)
    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(9, 12, generator=gen, dtype=D), torch.randn(9, generator=gen, dtype=D)
    keep, removed = [0, 1, 3, 6, 8, 10], [2, 4, 5, 7, 9, 11]
    fit = refit(w, b, full_gram(x), keep, removed, FitSpec(intercept=True, ridge=1e-9))
    target = x[:, removed] @ w[:, removed].t()                                 # [tokens, out]: what is lost
    z = with_ones(x[:, keep])
    assert fit.total == pytest.approx(float((x @ w.t() + b).pow(2).sum()), rel=1e-10)
    assert fit.removed_error == pytest.approx(float(target.pow(2).sum()), rel=1e-10)
    assert fit.compensated_error == pytest.approx(float((target - z @ fit.delta.t()).pow(2).sum()), rel=1e-6, abs=1e-6)
    best = (target - z @ torch.linalg.lstsq(z, target, driver="gelsd").solution).pow(2).sum()
    assert fit.compensated_error == pytest.approx(float(best), rel=1e-5, abs=1e-6)
    assert fit.compensated_error < 0.9 * fit.removed_error


def test_refit_with_nothing_removed_changes_nothing():
    x = data()
    w = torch.randn(4, 12, dtype=D, generator=torch.Generator().manual_seed(7))
    fit = refit(w, None, full_gram(x), list(range(12)), [], FitSpec(intercept=False))
    assert fit.delta.shape == (4, 12) and not fit.delta.any()
    assert fit.removed_error == fit.compensated_error == 0.0 and fit.info == {"ridge": 0.0, "ill_posed": False}


def test_unexplained_blocks_is_the_schur_complement_plus_the_ridge():
    """A block's covariance left after a ridge fit on every other input (and a constant), checked against the
    Schur complement written out; a one-input block agrees with unexplained_share; a block that copies
    other inputs is left with (almost) nothing."""
    from anatomy_prune.linalg import gram, second_moment, unexplained_blocks, unexplained_share

    torch.manual_seed(0)
    x = torch.randn(400, 9, dtype=torch.float64) @ torch.randn(9, 9, dtype=torch.float64) + 0.5
    g = gram(x).double()
    c = second_moment(g, centred=True)
    lam = 1e-2 * float(torch.diagonal(c).mean())
    blocks = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    got = unexplained_blocks(g, blocks, ridge=1e-2)
    for b, s in zip(blocks, got):
        o = [j for j in range(9) if j not in b]
        bi, oi = torch.tensor(b), torch.tensor(o)
        c_oo = c[oi][:, oi] + lam * torch.eye(len(o), dtype=torch.float64)
        want = c[bi][:, bi] - c[bi][:, oi] @ torch.linalg.solve(c_oo, c[oi][:, bi]) + lam * torch.eye(3, dtype=torch.float64)
        torch.testing.assert_close(s, want, rtol=1e-6, atol=1e-9)
    single = unexplained_blocks(g, [[j] for j in range(9)], ridge=1e-2)
    share = unexplained_share(g, ridge=1e-2)
    torch.testing.assert_close(torch.cat([s.reshape(1) for s in single]), torch.diagonal(c) * share, rtol=1e-6, atol=1e-12)
    copied = torch.cat([x[:, :3], x[:, :3] * 2.0 + 1.0, x[:, 3:6]], dim=1)   # block 1 is block 0, scaled and shifted
    left = unexplained_blocks(gram(copied).double(), blocks, ridge=1e-6)
    raw = second_moment(gram(copied).double(), centred=True)
    assert float(torch.trace(left[0])) < 1e-3 * float(torch.trace(raw[:3, :3]))
    assert float(torch.trace(left[2])) > 0.5 * float(torch.trace(raw[6:, 6:]))    # independent inputs stay


def test_removal_path_removes_a_copied_block_first_and_pays_for_the_pair_at_the_end():
    """Two copies of one block and an independent one: either copy can be rebuilt from the other, so it goes
    first at almost no error; once one copy is gone the other carries the signal alone, and removing everything
    costs the direct error of all blocks. A leave-one-out score would call both copies free."""
    from anatomy_prune.linalg import gram, quad, removal_path, second_moment

    g0 = torch.Generator().manual_seed(0)
    base = torch.randn(400, 3, generator=g0, dtype=torch.float64)
    other = torch.randn(400, 3, generator=g0, dtype=torch.float64)
    x = torch.cat([base, base, other], dim=1)                          # blocks [0-2], [3-5] (copy), [6-8]
    w = torch.randn(5, 9, generator=g0, dtype=torch.float64)
    g = gram(x).double()
    m2 = second_moment(g, centred=True)
    blocks = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    order, path = removal_path(g, w, m2, blocks, ridge=1e-6)
    assert set(order[:1]) <= {0, 1} and path[0] < 1e-3 * path[-1]
    assert path[-1] == pytest.approx(quad(w, m2), rel=1e-3)
    assert path[1] > 10 * path[0] and path[2] >= path[1] * (1 - 1e-6)


@pytest.mark.parametrize("steps", [12, 4])
def test_elimination_path_starts_at_leave_one_out_and_adds_up_to_the_refit_error(steps):
    """The path's first step is leave-one-out's error (||w_j||^2 C_jj x unexplained share); the steps of the first
    blocks add up to the exact error of removing them together with the refit ((H^-1_SS)^-1); and a copied
    neuron, free while its twin is kept, pays for the pair once the twin is gone."""
    from anatomy_prune.linalg import elimination_path

    x = data(d=12)
    x[:, 9] = x[:, 0]                                                       # neuron 9 copies neuron 0
    w = torch.randn(4, 12, generator=torch.Generator().manual_seed(1), dtype=D)
    g = full_gram(x)
    ridge = 1e-6
    order, path = elimination_path(g, w, centred=True, ridge=ridge, steps=steps)
    loo = column_energy(w) * moment_diagonal(g, True) * unexplained_share(g, ridge)
    if steps == 12:                                                          # one at a time: the first step is LOO's
        assert float(path.min()) == pytest.approx(float(loo.min()), rel=1e-6)
    assert float(loo[0]) < 1e-3 * float(loo.max()) and float(loo[9]) < 1e-3 * float(loo.max())   # both look free
    assert max(float(path[0]), float(path[9])) > 10 * float(loo[0] + loo[9])                     # the path: not both
    c = second_moment(g, centred=True)
    h_inv = torch.linalg.inv(c + ridge * float(c.diagonal().mean()) * torch.eye(12, dtype=D))
    assert sorted(order.tolist()) == list(range(12))
    assert bool((path[order].diff() >= 0).all())                             # non-decreasing along the path
    block = -(-12 // steps)
    for k in range(block, 12, block):                                        # block boundaries: exact, one at a time
        s = order[:k]
        exact = float(((w[:, s] @ torch.linalg.inv(h_inv[s][:, s])) * w[:, s]).sum())
        assert float(path[s].sum()) >= exact * (1 - 1e-6)     # equal before the steps are made non-decreasing
