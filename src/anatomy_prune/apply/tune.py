"""Sequential output tuning: after a plan is applied, each sublayer's output projection (the attention's output
projection, then the FFN's down projection, block after block) is refitted so that the residual stream it
writes matches the DENSE model's, given the inputs the pruned model now gives it. What earlier blocks lost is
thus partly made up by later ones; the within-layer refit (apply.compensate) only rebuilds a layer's removed
inputs on the dense model's own activations.

The fit, per projection with kept inputs h (and a constant where it has a bias), over real calibration tokens:

    min_theta  || [h, 1] theta - (s_dense - x_pruned) ||^2 + lambda || theta - theta_now ||^2

where s is what the projection's output is added to the residual stream to give (the input of the norm that
follows it in the block, or the block's output where no norm follows: pre-norm decoders' FFN), x_pruned =
s_pruned - o_pruned is the pruned model's residual input, and lambda = ridge x the mean diagonal of the Gram
(toward the current weights, so a poorly determined direction stays where it is). This is K-prune's
knowledge-preserving weight tuning (Park et al., ICLR 2024) as one closed-form ridge solve per sublayer, on
the representations only (not its predictive term), from the calibration sample's forward passes.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..models.families import attention_sites, base_model, ffn_sites, get_module, in_features, weight_out_in
from ..scores.calibration import Calibration
from ..scores.layerwise import block_inputs, blocks_of, run_block

log = logging.getLogger(__name__)

# The tuning's ridge, times the mean diagonal of the Gram (as the within-layer refit's DEFAULT_RIDGE, which it does
# not share): chosen on 100 IMDB validation reviews for SmolLM2-135M at 50% of the FFN, where held-out perplexity
# fell from 0.01 up to it (README, decoder section); the test reviews were not looked at to choose it.
TUNE_RIDGE = 0.3


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm", "Norm"))


class _Capture:
    """Forward hooks on a block's projections and its norms: for each projection, its input and output and the
    input of the first norm called after it (real tokens only, float32 rows [n, d]), one block call at a time."""

    def __init__(self, block: nn.Module, projs: list[nn.Module]):
        self.block, self.projs = block, projs
        self.norms = [m for m in block.modules() if _is_norm(m)]
        self.mask: Tensor | None = None
        self.got: list[dict] = []
        self._open: list[int] = []         # projections called whose norm has not come yet

    def _rows(self, x: Tensor) -> Tensor:
        return x.detach()[self.mask.to(x.device)].float().cpu()

    def _on_proj(self, i: int):
        def hook(_m, args, out):
            self.got[i].update(h=self._rows(args[0]), o=self._rows(out))
            self._open.append(i)
        return hook

    def _on_norm(self, _m, args):
        for i in self._open:
            self.got[i]["s"] = self._rows(args[0])
        self._open = []

    def run(self, loaded, batch, hidden: Tensor) -> tuple[list[dict], Tensor]:
        """Per projection {h, o, s} for one batch through the block (s: the block's output where no norm
        follows), and the block's output [batch, pos, d_model]."""
        self.mask, self.got, self._open = batch.mask, [{} for _ in self.projs], []
        handles = [p.register_forward_hook(self._on_proj(i)) for i, p in enumerate(self.projs)]
        handles += [n.register_forward_pre_hook(self._on_norm) for n in self.norms]
        try:
            out = run_block(loaded, self.block, [batch], [hidden])[0]
        finally:
            for h in handles:
                h.remove()
        if any("h" not in g for g in self.got):
            raise RuntimeError("the block never called a projection being tuned")
        for i in self._open:
            self.got[i]["s"] = self._rows(out)
        return self.got, out


@torch.no_grad()
def _tune_projection(loaded, block: nn.Module, path: str, batches: list, hidden: list[Tensor],
                     dense_s: list[Tensor], ridge: float, normalized: bool) -> dict:
    """Refit one projection of the pruned block (path under the base model) toward the dense stream `dense_s`
    (per batch, real tokens), in place; returns its diagnostics."""
    base = base_model(loaded.model)
    proj = get_module(base, path)
    k = in_features(proj)
    w_view = weight_out_in(proj)                                              # [d_out, k] (a view)
    bias = getattr(proj, "bias", None)
    if k == 0:
        return {"path": path, "inputs": 0, "skipped": True}
    cap = _Capture(block, [proj])
    n_feat = k + (bias is not None)
    g = torch.zeros(n_feat, n_feat, dtype=torch.float64)
    c = torch.zeros(n_feat, w_view.shape[0], dtype=torch.float64)
    before = total = 0.0
    for b, x, s_dense in zip(batches, hidden, dense_s):
        got = cap.run(loaded, b, x)[0][0]
        h, o, s = got["h"], got["o"], got["s"]
        target = s_dense - (s - o)                                            # what o should be [n, d_out]
        z = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) if bias is not None else h
        if normalized:      # each token's rows over its dense stream's RMS: errors as the next norm sees them
            wt = s_dense.pow(2).mean(1, keepdim=True).clamp(min=1e-12).rsqrt()
            z, target, s, s_dense = z * wt, target * wt, s * wt, s_dense * wt
        g += (z.T @ z).double()
        c += (z.T @ target).double()
        before += float((s_dense - s).double().pow(2).sum())
        total += float(s_dense.double().pow(2).sum())
    theta_now = w_view.detach().double().cpu().T                              # [k, d_out]
    if bias is not None:
        theta_now = torch.cat([theta_now, bias.detach().double().cpu()[None]], 0)
    lam = ridge * float(g.diagonal()[:k].mean().clamp(min=1e-12))
    theta = torch.linalg.solve(g + lam * torch.eye(n_feat, dtype=g.dtype), c + lam * theta_now)
    delta = theta - theta_now            # ||z theta - target||^2 = before + d'Gd + 2 d'(G theta_now - c), stably
    after = before + float((delta * (g @ delta)).sum()) + 2 * float((delta * (g @ theta_now - c)).sum())
    w_view.copy_(theta[:k].T.to(w_view.dtype))
    if bias is not None:
        bias.copy_(theta[k].to(bias.dtype))
    return {"path": path, "inputs": k, "rel_err_before": before / max(total, 1e-30),
            "rel_err_after": max(after, 0.0) / max(total, 1e-30)}


def _dense_pass(dense, dblock: nn.Module, paths: list[str], batches: list, hidden: list[Tensor]
                ) -> tuple[list[list[Tensor]], list[Tensor]]:
    """One pass of the dense block: per tuned path, the dense stream after it (per batch); the block's outputs."""
    cap = _Capture(dblock, [get_module(base_model(dense.model), p) for p in paths])
    streams: list[list[Tensor]] = [[] for _ in paths]
    outs = []
    for b, x in zip(batches, hidden):
        got, out = cap.run(dense, b, x)
        for i, g in enumerate(got):
            streams[i].append(g["s"])
        outs.append(out)
    return streams, outs


@torch.no_grad()
def tune_outputs(loaded, dense, calib: Calibration, ridge: float = TUNE_RIDGE, normalized: bool = True) -> dict:
    """Refit every sublayer's output projection of the pruned `loaded` (in place) toward the dense model
    `dense` (a Loaded of the same family, unpruned) on `calib`'s texts; see the module doc. Returns the
    per-sublayer diagnostics (each sublayer's residual error before its refit, relative to the dense stream)."""
    if not calib.texts:
        raise UserError("output tuning needs calibration texts; give --calib-size N with N > 0")
    start = time.perf_counter()
    model, was_training = loaded.model, loaded.model.training
    model.eval()
    dense.model.eval()
    try:
        batches, hidden = block_inputs(loaded, calib.for_model(loaded))
        dense_hidden = list(hidden)
        blocks, dense_blocks = blocks_of(model), blocks_of(dense.model)
        atts, ffns = attention_sites(model), ffn_sites(model)
        entries = []
        for i, (block, dblock) in enumerate(zip(blocks, dense_blocks)):
            paths = [atts[i].o, ffns[i].down]
            streams, dense_hidden = _dense_pass(dense, dblock, paths, batches, dense_hidden)
            for j, path in enumerate(paths):
                entries.append({"layer": i, **_tune_projection(loaded, block, path, batches, hidden, streams[j],
                                                                  ridge, normalized)})
            del streams
            hidden = run_block(loaded, block, batches, hidden)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    log.info("output tuning: %d sublayers refitted toward the dense stream in %.1f s", len(entries), seconds)
    return {"sublayers": entries, "ridge": ridge, "seconds": round(seconds, 2)}
