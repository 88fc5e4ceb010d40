"""The one linear-algebra core of compensation and removal errors, shared by the all-at-once and layer-wise
paths: Gram matrices of [x; 1] over tokens, the quadratic form trace(W M W^T), each input's unexplained share
under a ridge fit on the others, and the ridge least-squares refit of removed inputs from kept ones.

Every statistic is a Gram G = sum over tokens of [x; 1][x; 1]^T (float64, [d+1, d+1]); its last entry counts
the tokens. Matrices are kept to one Gram-sized temporary where the sizes of big models make it matter.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-2      # the ridge, times the mean diagonal of the kept inputs' Gram (or of the variances)
ILL_POSED_RIDGE = 1e-1    # at least this when there are fewer tokens than unknowns per output
QUAD_ROWS = 512           # rows of W squared at a time in quad / column_energy (no [out, n] temporaries)


# --- Gram matrices ------------------------------------------------------------------------------------

def gram(x: Tensor) -> Tensor:
    """The Gram of [x; 1] over the rows of x ([tokens, d]) in float32, one batch's sum: [d+1, d+1]."""
    z = torch.cat([x.float(), torch.ones(x.shape[0], 1, device=x.device)], dim=1)  # [tokens, d+1]
    return z.t() @ z


def add_gram(total: Tensor | None, x: Tensor) -> Tensor:
    """`total` (float64, None for the first batch) plus the float32 Gram of one batch's rows x: [d+1, d+1]."""
    g = gram(x.detach())
    if total is None:
        total = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
    return total.add_(g)


def second_moment(g: Tensor, centred: bool) -> Tensor:
    """Per-token second moment of x from the Gram of [x; 1] (centred: the covariance), a new [d, d] tensor."""
    n = g[-1, -1].clamp(min=1.0)
    m = g[:-1, :-1] / n
    if centred:
        mean = g[:-1, -1] / n                                               # [d]
        m.addr_(mean, mean, alpha=-1.0)
    return m


def moment_diagonal(g: Tensor, centred: bool) -> Tensor:
    """The diagonal of `second_moment` without the [d, d] temporary: [d]."""
    n = float(g[-1, -1].clamp(min=1.0))
    m = torch.diagonal(g)[:-1] / n
    return m - (g[:-1, -1] / n) ** 2 if centred else m


# --- quadratic forms ----------------------------------------------------------------------------------

def quad(w: Tensor, m: Tensor, rows: int = QUAD_ROWS) -> float:
    """trace(w m w^T) for w [out, n] and m [n, n], `rows` rows of w at a time."""
    return float(sum(((w[r:r + rows] @ m) * w[r:r + rows]).sum() for r in range(0, w.shape[0], rows)))


def output_energy(w: Tensor, b: Tensor | None, g: Tensor) -> float:
    """Sum over tokens of ||W x + b||^2 from the Gram of [x; 1] (w [out, d], b [out] or None), float64."""
    total = quad(w, g[:-1, :-1])
    if b is not None:
        total += 2 * float(b @ (w @ g[:-1, -1])) + float(g[-1, -1]) * float(b @ b)
    return total


def column_energy(w: Tensor, rows: int = 4 * QUAD_ROWS) -> Tensor:
    """Squared norm of every column of w ([out, n], any device / dtype), float64 on the CPU: [n]."""
    out = torch.zeros(w.shape[1], dtype=torch.float64)
    for r in range(0, w.shape[0], rows):
        out += w[r:r + rows].detach().double().cpu().pow(2).sum(0)
    return out


# --- what a fit on the other inputs cannot rebuild ----------------------------------------------------

def unexplained_share(g: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """Per input, the share of its centred energy that a ridge fit on all other inputs (and a constant)
    leaves unexplained, in [0, 1]: 1 / (C_jj (C + lam I)^-1_jj), C the covariance, lam = ridge x mean(C_jj).
    One Gram-sized temporary (inverted in place on the CPU); a general inverse where it is not SPD: [d]."""
    g = g.detach()
    if g.device.type != "cpu" or g.dtype != torch.float64:
        g = g.double().cpu()
    a = second_moment(g, centred=True)                                       # [d, d], the only big temporary
    var = torch.diagonal(a).clamp(min=1e-12)                                 # a copy
    lam = ridge * float(var.mean())
    a.diagonal().add_(lam)
    inv_diag = _inverse_diagonal_inplace(a)
    if inv_diag is None:                                                     # not positive definite
        a = second_moment(g, centred=True)
        a.diagonal().add_(lam)
        inv_diag = torch.diagonal(torch.linalg.inv(a))
    return (1.0 / (var * inv_diag)).clamp(0.0, 1.0)


def _ridged_inverse(g: Tensor, ridge: float, centred: bool = True) -> Tensor:
    """(C + lam I)^-1, C the covariance (or, not `centred`, the second moment) from the Gram of [x; 1],
    lam = ridge x mean(C_jj): float64 on the CPU (torch.linalg.inv: torch.cholesky_inverse is far slower here)."""
    a = second_moment(g.detach().double().cpu(), centred=centred)
    a.diagonal().add_(ridge * float(torch.diagonal(a).clamp(min=1e-12).mean()))
    return torch.linalg.inv(a)


def _unexplained(inv: Tensor, idx: Tensor) -> Tensor:
    """The covariance of inputs idx that a fit on the others leaves: ((C + lam I)^-1_idx,idx)^-1."""
    return torch.linalg.inv(inv.index_select(0, idx).index_select(1, idx))


def unexplained_blocks(g: Tensor, blocks: list[list[int]], ridge: float = DEFAULT_RIDGE) -> list[Tensor]:
    """Per block of inputs (a head's context features), the covariance that a ridge fit on all other inputs
    (and a constant) leaves unexplained: the Schur complement C_bb - C_bo (C_oo + lam I)^-1 C_ob, plus lam I,
    read off one inverse as ((C + lam I)^-1_bb)^-1 (the block version of `unexplained_share`'s 1 / inv_jj,
    lam = ridge x mean(C_jj)): [|b|, |b|] each, float64 on the CPU."""
    inv = _ridged_inverse(g, ridge)
    return [_unexplained(inv, torch.as_tensor(b, dtype=torch.long)) for b in blocks]


def removal_path(g: Tensor, w: Tensor, m2: Tensor, blocks: list[list[int]], ridge: float = DEFAULT_RIDGE
                 ) -> tuple[list[int], list[float]]:
    """Backward elimination of input blocks (a layer's head units) feeding one projection w [out, n]: at each step
    the block whose removal, together with those already removed, leaves the least output error after a ridge
    refit from the blocks still kept; returns (the order, the error of removing the first k blocks, k = 1..n).

    The error of removing a set S is trace(W_S C W_S^T), C the Schur complement of S given the kept blocks, read
    off one inverse as ((C_all + lam I)^-1_SS)^-1 (unexplained_blocks' rule for a set), and never above the
    direct error trace(W_S m2_SS W_S^T) (m2: the second moment the direct error uses). With every block removed
    nothing is left to refit from, so the last step costs what the layer's blocks carry together: what
    leave-one-out errors miss when each block can be rebuilt from the others but not all of them at once."""
    inv = _ridged_inverse(g, ridge)
    w, m2 = w.detach().double().cpu(), m2.detach().double().cpu()

    def error(idx: Tensor) -> float:
        direct = quad(w[:, idx], m2.index_select(0, idx).index_select(1, idx))
        return min(direct, quad(w[:, idx], _unexplained(inv, idx)))

    order: list[int] = []
    path: list[float] = []
    remaining = list(range(len(blocks)))
    while remaining:
        tried = {u: error(torch.as_tensor([j for b in order + [u] for j in blocks[b]], dtype=torch.long))
                 for u in remaining}
        u = min(tried, key=tried.get)
        order.append(u)
        path.append(tried[u])
        remaining.remove(u)
    return order, path


def elimination_path(g: Tensor, w: Tensor, centred: bool, ridge: float = DEFAULT_RIDGE, steps: int = 64
                     ) -> tuple[Tensor, Tensor]:
    """The backward-elimination path of the inputs of one projection w [out, n] (a layer's FFN neurons), with the
    refit of the kept inputs updated as inputs go (optimal brain surgeon, in blocks of n / steps): (the order
    [n], each input's step [n], indexed by input).

    Each block is the inputs whose removal leaves the least error ||w_j||^2 / H^-1_jj given the inputs still kept
    (H: the covariance, or the second moment when not `centred`, plus lam I, lam = ridge x mean(H_jj)); the block's
    error trace(W_S (H^-1_SS)^-1 W_S^T) is shared among its inputs in proportion to those errors, W takes the
    refit (W -= W_S (H^-1_SS)^-1 H^-1_S.) and H^-1 loses the block. Steps are made non-decreasing along the path,
    so the inputs a layer loses last carry what the others can no longer rebuild: the path starts where
    leave-one-out's error (unexplained_share) is least (with blocks of one, the first step is that error), and later
    steps are at least as large."""
    inv = _ridged_inverse(g, ridge, centred)
    w = w.detach().double().cpu().clone()
    n = w.shape[1]
    alive = torch.arange(n)
    block = max(1, -(-n // max(1, int(steps))))
    order, marginal = [], []
    while alive.numel():
        err = w.pow(2).sum(0) / torch.diagonal(inv).clamp(min=1e-30)           # [remaining]
        pick = torch.topk(err, min(block, alive.numel()), largest=False).indices
        a, rows = inv.index_select(0, pick).index_select(1, pick), inv.index_select(0, pick)
        a_inv = torch.linalg.inv(a)
        x = a_inv @ rows                                                        # [k, remaining]
        w_s = w.index_select(1, pick)
        total = float(((w_s @ a_inv) * w_s).sum())                              # the block's error
        share = err[pick] * (total / float(err[pick].sum().clamp(min=1e-30)))
        order.append(alive[pick])
        marginal.append(share)
        mask = torch.ones(alive.numel(), dtype=torch.bool)
        mask[pick] = False
        keep = mask.nonzero().squeeze(1)
        x = x.index_select(1, keep)
        w = torch.addmm(w.index_select(1, keep), w_s, x, alpha=-1.0)
        inv = torch.addmm(inv.index_select(0, keep).index_select(1, keep), rows.index_select(1, keep).t(), x, alpha=-1.0)
        alive = alive.index_select(0, keep)
    path = torch.cummax(torch.cat(marginal).clamp(min=0.0), dim=0).values
    order_ = torch.cat(order)
    out = torch.empty(n, dtype=torch.float64)
    out[order_] = path
    return order_, out


def _inverse_diagonal_inplace(a: Tensor) -> Tensor | None:
    """diag(a^-1) for a symmetric positive definite float64 CPU matrix, overwriting `a` (LAPACK potrf and
    potri in place). None if `a` is not positive definite."""
    from scipy.linalg import lapack

    try:  # as many BLAS threads as torch uses (oversubscribed threads are much slower on a shared CPU)
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(limits=torch.get_num_threads(), user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limit = contextlib.nullcontext()
    with limit:
        arr = a.contiguous().numpy().T                                       # F-ordered view (a is symmetric)
        chol, info = lapack.dpotrf(arr, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            return None
        inv, info = lapack.dpotri(chol, lower=1, overwrite_c=1)
        return torch.from_numpy(inv.diagonal().copy()) if info == 0 else None


# --- the ridge least-squares refit --------------------------------------------------------------------

def fit_removed(g: Tensor, keep: list[int], removed: list[int], *, intercept: bool = True,
                ridge: float = DEFAULT_RIDGE, n_samples: float | None = None, where: str = "") -> tuple[Tensor, dict]:
    """Ridge least squares of the removed inputs on the kept ones (and a constant when `intercept`):
    B [|K| (+1), |R|] with x_R ~ B^T [x_K; 1]. The constant is not penalised; the ridge is `ridge` times the
    kept block's mean diagonal, raised when the fit is ill-posed. n_samples: tokens, if not g[-1, -1]."""
    d = g.shape[0] - 1
    n_tok = float(g[-1, -1]) if n_samples is None else float(n_samples)
    cols = list(keep) + ([d] if intercept else [])
    info = {"ill_posed": False, "ridge": float(ridge)}
    if not removed or not cols:
        return g.new_zeros(len(cols), len(removed)), info
    kidx, ridx = torch.tensor(cols, dtype=torch.long), torch.tensor(removed, dtype=torch.long)
    a = g.index_select(0, kidx).index_select(1, kidx)                        # [|K|+1, |K|+1]
    rhs = g.index_select(0, kidx).index_select(1, ridx)                      # [|K|+1, |R|]
    if n_tok < len(cols):
        info["ill_posed"] = True
        if ridge < ILL_POSED_RIDGE:
            log.warning("%sonly %d calibration tokens for %d unknowns per removed neuron: the fit is "
                        "ill-posed; regularising with ridge %.3g (use more or longer calibration texts)",
                        where, int(n_tok), len(cols), ILL_POSED_RIDGE)
            ridge = ILL_POSED_RIDGE
    pen = torch.ones(len(cols), dtype=g.dtype)
    if intercept:
        pen[-1] = 0.0
    scale = float(torch.diagonal(a)[: len(keep)].mean().clamp(min=1e-12)) if keep else 1.0
    for attempt in range(8):
        chol, bad = torch.linalg.cholesky_ex(a + torch.diag(ridge * scale * pen))
        if bad == 0:
            break
        new = ridge * 10 if ridge > 0 else 1e-8
        if attempt == 0:
            log.warning("%sthe kept neurons' Gram matrix is singular (dead or duplicate neurons, or too few "
                        "tokens); regularising more (ridge %.3g -> %.3g)", where, ridge, new)
        info["ill_posed"] = True
        ridge = new
    else:
        raise UserError(f"{where}could not fit the compensation even with strong regularisation; "
                        "check the calibration data (is it empty or constant?)")
    info["ridge"] = float(ridge)
    return torch.cholesky_solve(rhs, chol), info


@dataclass(frozen=True)
class FitSpec:
    """How a refit is solved: with a constant input (`intercept`), the ridge, the token count the ridge and the
    ill-posed check rest on (None: the Gram's own), and a prefix naming the layer in messages."""

    intercept: bool = True
    ridge: float = DEFAULT_RIDGE
    n_samples: float | None = None
    where: str = ""


@dataclass
class Refit:
    """A refit of one projection: delta [out, |K| (+1)] to add to the kept columns (and, last, the bias),
    and the output energy on the calibration tokens: in total, lost by plain removal, left after the refit."""

    delta: Tensor
    total: float
    removed_error: float
    compensated_error: float
    info: dict = field(default_factory=dict)


def refit(w: Tensor, b: Tensor | None, g: Tensor, keep: list[int], removed: list[int],
          spec: FitSpec = FitSpec()) -> Refit:
    """The least-squares refit of a projection y = W x + b (w [out, d], b [out] or None, float64 CPU) that
    loses its `removed` inputs: W_R x_R is rebuilt from the kept inputs (and a constant when spec.intercept)."""
    d = g.shape[0] - 1
    cols = list(keep) + ([d] if spec.intercept else [])
    total = output_energy(w, b, g)
    if not removed:
        return Refit(w.new_zeros(w.shape[0], len(cols)), total, 0.0, 0.0, {"ridge": 0.0, "ill_posed": False})
    coef, info = fit_removed(g, keep, removed, intercept=spec.intercept, ridge=spec.ridge, n_samples=spec.n_samples,
                             where=spec.where)
    kidx, ridx = torch.tensor(cols, dtype=torch.long), torch.tensor(removed, dtype=torch.long)
    w_r = w.index_select(1, ridx)                                            # [out, |R|]
    g_r = g.index_select(0, ridx)                                            # [|R|, d+1]
    before = quad(w_r, g_r.index_select(1, ridx))
    g_kr = g_r.index_select(1, kidx).t()                                     # [|K| (+1), |R|]
    del g_r
    delta = w_r @ coef.t()                                                   # [out, |K| (+1)]
    # sum over tokens of ||W_R x_R - delta z_K||^2, expanded in Gram blocks
    after = before - 2 * float(((delta @ g_kr) * w_r).sum()) + quad(delta, g.index_select(0, kidx).index_select(1, kidx))
    return Refit(delta, total, before, after, info)
