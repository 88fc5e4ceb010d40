"""Which Linear layers make torch's dynamic int8 lose accuracy on a classifier (issue 25, item 4): the float model
against int8 of every Linear, int8 with per-channel weight scales, and int8 with one kind of layer kept in float
(the FFN output projections, the FFN input projections, the attention, the classification head).

    PYTHONPATH=src .venv/bin/python benchmarks/int8_layers.py --model runs/mpnet/finetune --eval-size 500 \
        --out runs/int8-layers-mpnet                                   # the README's run

Every variant is scored on the same held-out reviews, McNemar against the float model. Writes int8.json and
table.md into --out (a run folder).
"""
from __future__ import annotations

import argparse
import copy
import os
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from anatomy_prune.errors import UserError, exit_status  # noqa: E402
from anatomy_prune.evaluate.metrics import evaluate_classifier, evaluation_set  # noqa: E402
from anatomy_prune.evaluate.stats import mcnemar  # noqa: E402
from anatomy_prune.models.families import attention_sites, base_model, ffn_sites, get_module  # noqa: E402
from anatomy_prune.models.loading import Loaded, load_model  # noqa: E402
from anatomy_prune.models.quantize import float_layers  # noqa: E402
from anatomy_prune.runfolder import RunFolder  # noqa: E402


def kinds(model: nn.Module) -> dict[str, set[str]]:
    """Module names of each kind of Linear: FFN output / input projections and attention."""
    base = base_model(model)
    ids = {"FFN input": {id(get_module(base, p)) for s in ffn_sites(model) for p in s.up},
           "attention": {id(get_module(base, p)) for s in attention_sites(model) for p in (s.q, s.k, s.v, s.o)}}
    out = {k: {n for n, m in model.named_modules() if id(m) in v} for k, v in ids.items()}
    out["FFN output"] = float_layers(model, "int8")
    out["head"] = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set().union(*out.values())
    return out


def quantized(model: nn.Module, keep: set[str], per_channel: bool = False) -> nn.Module:
    cfg = (torch.ao.quantization.per_channel_dynamic_qconfig if per_channel
           else torch.ao.quantization.default_dynamic_qconfig)
    m = copy.deepcopy(model).eval()
    spec = {n: cfg for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n not in keep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(m, spec, dtype=torch.qint8, inplace=True)


def measure(args) -> dict:
    clf = load_model(args.model, device="cpu")
    if clf.kind != "classifier":
        raise UserError(f"--model must be a fine-tuned classifier, not a {clf.kind}")
    data = evaluation_set(clf, "imdb", args.eval_size, "heldout")
    dense = evaluate_classifier(clf, data, 64, progress=False)
    groups = kinds(clf.model)
    variants = {"int8, every Linear (int8-all)": quantized(clf.model, set()),
                "int8, every Linear, per-channel weight scales": quantized(clf.model, set(), per_channel=True)}
    variants.update({f"int8, {k} in float": quantized(clf.model, v) for k, v in groups.items()})
    rows = [{"variant": "float", "accuracy": dense["accuracy"], "interval": dense["accuracy_interval"]}]
    for name, model in variants.items():
        ev = evaluate_classifier(Loaded(model, clf.tokenizer, clf.kind, clf.spec, dict(clf.info)), data, 64,
                                 progress=False)
        rows.append({"variant": name, "accuracy": ev["accuracy"], "interval": ev["accuracy_interval"],
                     "vs_float": mcnemar(ev["correct"], dense["correct"])})
        print(f"{name:48s} {100 * ev['accuracy']:.1f}", flush=True)
    return {"model": args.model, "n_eval": len(data), "layers": {k: len(v) for k, v in groups.items()}, "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['model']}: {result['n_eval']} held-out reviews; McNemar against the float model", "",
             "| variant | accuracy % [95%] | vs float (pts), p |", "|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["interval"]
        t = r.get("vs_float")
        lines.append(f"| {r['variant']} | {100 * r['accuracy']:.1f} [{100 * lo:.1f}-{100 * hi:.1f}] | "
                     + (f"{100 * t['diff']:+.1f}, p={t['p_value']:.2g}" if t else "") + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/mpnet/finetune")
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out", default="runs/int8-layers")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def job():
        with RunFolder(args.out, "int8-layers", {**vars(args), "out": None}, force=args.force) as rf:
            result = measure(args)
            rf.write_json("int8.json", result)
            rf.write_text("table.md", table(result))
        print(table(result))

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
