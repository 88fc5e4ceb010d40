"""Techniques tried on an encoder classifier (issue 25, item 2), each paired against ours on the same reviews:

1. the head units' removal error after a refit from the other heads' context (`calibrated`'s default since
   issue 25), against the direct error it replaced (`head_rebuilt=False`), under FLOPs targets: heads and FFN
   neurons ranked jointly, as `prune --target-flops F` does;
2. iterative pruning that recalibrates between shares (`prune --iterations N`, pipeline.iterative), against all
   at once, at FFN sparsities, and at the FLOPs targets (--variants iterative-3: heads and neurons);
3. the FFN neurons' error along an elimination path (`neuron_path=True`: the refit updated as the layer's
   neurons go, linalg.elimination_path) against leave-one-out, at the FLOPs targets and the FFN sparsities;
4. other scorer settings at the FLOPs targets (--variants): beta, Taylor, a larger calibration sample;
5. sequential output tuning after pruning (--variants tuned: apply.tune, K-prune's weight tuning in closed form);
6. Kwon et al.'s mask rearrangement (--variants rearranged): each layer keeps as many units as ours keeps, but
   which ones is chosen again by the layer's full Fisher matrix over examples (greedy: the units whose removal
   adds least to 1/2 (1-m)^T F (1-m), interactions within the layer included), then compensated as ours;
7. a search for each layer's share of the budget (--variants searched: EvoPress-style, Sieberling et al. 2024):
   one multiplier per layer and kind on ours' scores, mutated one at a time and kept when the pruned model's KL
   divergence from the dense model's predictions falls on a search sample of its own; the plan stays under the
   same budget, only the layers' shares move.

Accuracy on the validation split (1,000 reviews) and on --eval-size held-out reviews, each with McNemar against
the reference variant. FLOPs targets, not measured speedups, so that the plans do not depend on this machine's
timings (benchmarks/peers.py measures speedups).

    .venv/bin/python benchmarks/encoder_variants.py --model runs/demo/finetune --out runs/encoder-variants
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # the sibling scripts, also when loaded by path
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anatomy_prune.apply.modes import apply_plan  # noqa: E402
from anatomy_prune.apply.tune import TUNE_RIDGE, tune_outputs  # noqa: E402
from anatomy_prune.errors import UserError, exit_status  # noqa: E402
from anatomy_prune.evaluate.cost import flops_cost  # noqa: E402
from anatomy_prune.evaluate.metrics import evaluate_classifier, evaluation_set  # noqa: E402
from anatomy_prune.evaluate.stats import mcnemar  # noqa: E402
from anatomy_prune.models.loading import load_model  # noqa: E402
from anatomy_prune.pipeline.iterative import prune_iterative  # noqa: E402
from anatomy_prune.pipeline.requests import PruneRequest  # noqa: E402
from anatomy_prune.pipeline.step import PruneResult, compensate_with, copy_loaded, prune_step  # noqa: E402
from anatomy_prune.plan.allocate import plan_under_budget  # noqa: E402
from anatomy_prune.runfolder import RunFolder  # noqa: E402
from anatomy_prune.scores.calibration import make_calibration  # noqa: E402
from kwon import fisher_matrices  # noqa: E402  (benchmarks/kwon.py: the Fisher matrices of Kwon et al.'s masks)


# variant: (label, the calibrated scorer's params, calibration reviews or None for --calib-size); neurons go along
# their elimination path whenever heads are scored (the default since issue 25), unless a variant says otherwise
VARIANTS = {"direct": ("heads: direct error (before)", {"head_rebuilt": False, "neuron_path": False}, None),
            "path": ("heads: removal path, neurons leave-one-out", {"neuron_path": False}, None),
            "neuron-path": ("heads: removal path, neurons: elimination path", {}, None),
            "beta-0.5": ("as neuron-path, beta 0.5", {"beta": 0.5}, None),
            "beta-2": ("as neuron-path, beta 2", {"beta": 2.0}, None),
            "taylor": ("as neuron-path, Taylor sensitivity", {"score": "taylor"}, None),
            "calib-256": ("as neuron-path, 256 calibration reviews", {}, 256),
            "tuned": ("as neuron-path, then sequential output tuning", {}, None),
            "tuned-unweighted": ("as tuned-ridge-0.01, tokens not weighted by their RMS", {}, None),
            "tuned-ridge-0.01": ("as tuned, with the refit's ridge 0.01 (the tuning's before it had its own)", {}, None),
            "searched": ("as neuron-path, layers' shares searched on KL", {}, None),
            "iterative-3": ("as neuron-path, in 3 iterations (recalibrated between them)", {}, None),
            "rearranged": ("as neuron-path, units re-chosen by the layers' Fisher matrices (Kwon)", {}, None)}
# refitted toward the dense stream (apply.tune): (tokens weighted by their RMS, the tuning's ridge)
TUNED = {"tuned": (True, TUNE_RIDGE), "tuned-unweighted": (False, 0.01), "tuned-ridge-0.01": (True, 0.01)}


SEARCH_STEPS = 60     # candidate plans the search builds and runs (about 2 s each on the demo model)
SEARCH_TEXTS = 256    # reviews the search reads, and as many again to check its KL on texts it never saw


@torch.no_grad()
def _log_probs(model, cal) -> torch.Tensor:
    """[reviews, classes] log probabilities; a binary head's one logit z is the two classes (-z, z) / sigmoid."""
    model.eval()
    z = torch.cat([model(**b).float() for b in cal.batches()])
    return torch.stack([torch.nn.functional.logsigmoid(-z), torch.nn.functional.logsigmoid(z)], -1) if z.dim() == 1 \
        else torch.log_softmax(z, -1)


def _kl(ref: torch.Tensor, lp: torch.Tensor) -> float:
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


def compensated(clf, calib, plan, recipe: dict):
    """A copy of `clf` compensated for `plan` as `recipe` says (ours' refit), then pruned physically."""
    out = copy_loaded(clf)
    compensate_with(out.model, plan, calib, recipe)
    apply_plan(out.model, plan, "physical")
    return out


def searched(clf, calib, res: PruneResult, flops: float, search, check, steps: int = SEARCH_STEPS) -> tuple:
    """Ours' plan at FLOPs `flops` with each layer's share of the budget searched: a (1+1) search over one log
    multiplier per layer and kind (neurons, heads) on the scores, one coordinate moved by +-0.5 (then +-0.25 in
    the second half), kept when the KL divergence of the compensated, pruned model from the dense model's
    predictions on `search` falls. Returns (the result, a report with the KL on `search` and on `check`)."""
    t0 = time.perf_counter()
    cm = flops_cost(clf, seq_len=128)
    normalize, floor = res.plan.params.get("normalize", "none"), float(res.plan.params.get("floor", 0.0))
    sc, layers = res.scores, len(res.scores.values)
    dense = {"search": _log_probs(clf.model, search), "check": _log_probs(clf.model, check)}

    def make(m):
        scaled = dataclasses.replace(sc, values=[v * math.exp(m[i]) for i, v in enumerate(sc.values)],
                                     head_values=[v * math.exp(m[layers + i]) for i, v in enumerate(sc.head_values)])
        return plan_under_budget(scaled, {"neurons": cm.per_neuron, "heads": cm.per_head}, cm.base, cm.dense * flops,
                                 floor=floor, normalize=normalize)

    built = lambda plan: compensated(clf, calib, plan, res.recipe)  # noqa: E731
    m = [0.0] * (2 * layers)        # all multipliers 1: ours' plan, whose compensated model `res` holds already
    best = first = _kl(dense["search"], _log_probs(res.loaded.model, search))
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        cand = list(m)
        step = 0.5 if i < steps // 2 else 0.25
        cand[int(torch.randint(0, 2 * layers, (1,), generator=g))] += step if torch.rand(1, generator=g) < 0.5 else -step
        k = _kl(dense["search"], _log_probs(built(make(cand)).model, search))
        if k < best:
            best, m = k, cand
    plan = make(m)
    out = built(plan)
    report = {"multipliers": [round(x, 2) for x in m], "kl_search": [first, best],
              "kl_check": [_kl(dense["check"], _log_probs(res.loaded.model, check)),
                           _kl(dense["check"], _log_probs(out.model, check))]}
    print(f"search: KL on its {len(search.texts)} reviews {first:.4f} -> {best:.4f}; on {len(check.texts)} others "
          f"{report['kl_check'][0]:.4f} -> {report['kl_check'][1]:.4f}", flush=True)
    return dataclasses.replace(res, loaded=out, plan=plan, prune_s=res.prune_s + time.perf_counter() - t0), report


def rearranged_keep(fisher: torch.Tensor, n_keep: int) -> list[int]:
    """The n_keep units to keep so that the removed set S has a small 1/2 sum_{i,j in S} F_ij, greedily: each
    step removes the unit that adds least (F_ii + 2 sum_{j in S} F_ij)."""
    n = fisher.shape[0]
    cost, gone = fisher.diagonal().clone(), torch.zeros(n, dtype=torch.bool)
    for _ in range(n - n_keep):
        i = int(torch.argmin(cost.masked_fill(gone, float("inf"))))
        gone[i] = True
        cost += 2 * fisher[:, i]
    return [i for i in range(n) if not gone[i]]


def rearranged(clf, calib, res: PruneResult, fisher: dict) -> PruneResult:
    """Ours' plan with each layer's kept units re-chosen by rearranged_keep (the counts stay), compensated as
    ours is."""
    t0 = time.perf_counter()
    plan = res.plan
    keep = [rearranged_keep(f, len(k)) for f, k in zip(fisher["neurons"], plan.keep)]
    heads = [rearranged_keep(f, len(k)) for f, k in zip(fisher["heads"], plan.heads)]
    plan = dataclasses.replace(plan, keep=keep, heads=heads)
    out = compensated(clf, calib, plan, res.recipe)
    moved = sum(len(set(a) - set(b)) for a, b in zip(plan.keep, res.plan.keep))
    moved_h = sum(len(set(a) - set(b)) for a, b in zip(plan.heads, res.plan.heads))
    print(f"rearranged: {moved} of {sum(map(len, plan.keep))} kept neurons and {moved_h} of "
          f"{sum(map(len, plan.heads))} kept heads differ from ours", flush=True)
    return dataclasses.replace(res, loaded=out, plan=plan, prune_s=res.prune_s + time.perf_counter() - t0)


def _row(name: str, setting: str, res, sets: dict, ref: dict | None) -> dict:
    """One variant's row; `_correct` (per split, for the paired tests) is dropped before the row is written."""
    row = {"variant": name, "setting": setting, "ffn_widths": res.plan.kept_widths, "heads": res.plan.kept_heads,
           "prune_s": round(res.prune_s, 1), "_correct": {}}
    for split, data in sets.items():
        ev = evaluate_classifier(res.loaded, data, 64, progress=False)
        row["_correct"][split] = ev["correct"]
        row[split] = {"accuracy": ev["accuracy"], "interval": ev["accuracy_interval"]}
        if ref is not None:
            row[split]["vs_ref"] = mcnemar(ev["correct"], ref["_correct"][split])
    print(f"{setting:12s} {name:34s} " + "  ".join(f"{k} {100 * row[k]['accuracy']:.2f}" for k in sets), flush=True)
    return row


def measure(args) -> dict:
    clf = load_model(args.model, device="cpu")
    if clf.kind != "classifier":
        raise UserError(f"--model must be a fine-tuned classifier, not a {clf.kind}")
    sets = {"validation": evaluation_set(clf, "imdb", 1000, "validation"),
            "heldout": evaluation_set(clf, "imdb", args.eval_size, "heldout")}
    calib = make_calibration(clf, args.calib_size, exclude=sets["validation"].texts + sets["heldout"].texts)
    rows = []
    calibs = {args.calib_size: calib}
    fisher = None                     # the layers' Fisher matrices (--variants rearranged), computed once
    if "searched" in args.variants:   # the search's own reviews, and others to check its KL on
        seen = sets["validation"].texts + sets["heldout"].texts + calib.texts
        search = make_calibration(clf, SEARCH_TEXTS, seed=1, exclude=seen)
        check = make_calibration(clf, SEARCH_TEXTS, seed=2, exclude=seen + search.texts)
    for f in args.flops:
        target = {"flops": f, "batch_size": 32, "seq_len": 128}
        ref = None
        for v in args.variants:        # the first variant is the reference of the others
            name, params, n = VARIANTS[v]
            n = n or args.calib_size
            if n not in calibs:
                calibs[n] = make_calibration(clf, n, exclude=sets["validation"].texts + sets["heldout"].texts)
            req = PruneRequest(method="calibrated", target=target, params=params,
                               iterations=3 if v == "iterative-3" else 1)
            res = prune_iterative(calibs[n], req) if req.iterations > 1 else prune_step(calibs[n], req)
            if v in TUNED:
                tune_outputs(res.loaded, clf, calibs[n], normalized=TUNED[v][0], ridge=TUNED[v][1])
            report = None
            if v == "searched":
                res, report = searched(clf, calibs[n], res, f, search, check, args.search_steps)
            if v == "rearranged":
                if fisher is None:
                    fisher = fisher_matrices(calibs[n])
                    res = dataclasses.replace(res, prune_s=res.prune_s + fisher["seconds"])
                res = rearranged(clf, calibs[n], res, fisher)
            row = _row(name, f"flops {f}", res, sets, ref)
            if report:
                row["search"] = report
            ref = ref or row
            rows.append(row)
    for s in args.sparsity:
        ref = _row("all at once", f"FFN {s:.0%}", prune_step(calib, PruneRequest(method="calibrated", sparsity=s)),
                   sets, None)
        rows.append(ref)
        if args.neuron_path:
            res = prune_step(calib, PruneRequest(method="calibrated", sparsity=s, params={"neuron_path": True}))
            rows.append(_row("neurons: elimination path", f"FFN {s:.0%}", res, sets, ref))
        for n in args.steps:
            res = prune_iterative(calib, PruneRequest(method="calibrated", sparsity=s, iterations=n))
            rows.append(_row(f"iterative, {n} iterations", f"FFN {s:.0%}", res, sets, ref))
    return {"model": args.model, "calib_size": args.calib_size, "n": {k: len(v) for k, v in sets.items()},
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['n']['validation']} validation and {result['n']['heldout']} held-out reviews, "
             f"{result['calib_size']} calibration reviews; McNemar against the first variant of each setting", "",
             "| setting | variant | heads kept | FFN kept | validation % (vs ref, p) | held-out % [95%] (vs ref, p) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = []
        for split in ("validation", "heldout"):
            x = r[split]
            lo, hi = x["interval"]
            t = x.get("vs_ref")
            vs = f" ({100 * t['diff']:+.1f}, p={t['p_value']:.2g})" if t else ""
            cells.append(f"{100 * x['accuracy']:.1f}" + (f" [{100 * lo:.1f}-{100 * hi:.1f}]" if split == "heldout" else "") + vs)
        heads = sum(r["heads"]) if r["heads"] else "all"
        lines.append(f"| {r['setting']} | {r['variant']} | {heads} | {sum(r['ffn_widths'])} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo/finetune")
    p.add_argument("--eval-size", type=int, default=2000, help="held-out reviews (default: 2000)")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--flops", type=float, nargs="*", default=[0.5, 0.33], help="FLOPs targets (fractions kept)")
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.7, 0.85], help="FFN sparsities, iterative")
    p.add_argument("--steps", type=int, nargs="*", default=[2, 4], help="iterations of the iterative variants")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   default=["direct", "path", "neuron-path"], help="scoring variants at the FLOPs targets (the first "
                   "is the reference)")
    p.add_argument("--search-steps", type=int, default=SEARCH_STEPS, help="candidate plans of --variants searched")
    p.add_argument("--neuron-path", action="store_true", help="at each FFN sparsity, the elimination path too")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default="runs/encoder-variants")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def job():
        if not 0 <= args.search_steps <= 10_000:
            raise UserError(f"--search-steps must be in [0, 10000], got {args.search_steps}")
        if any(n < 2 for n in args.steps):
            raise UserError("--steps: each iterative variant needs at least 2 iterations (1 is all at once)")
        with RunFolder(args.out, "encoder-variants", {**vars(args), "out": None}, force=args.force) as rf:
            result = measure(args)
            rf.write_json("variants.json", {**result, "rows": [{k: v for k, v in r.items() if k != "_correct"}
                                                               for r in result["rows"]]})
            rf.write_text("table.md", table(result))
        print(table(result))

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
