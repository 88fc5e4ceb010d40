"""Fine-pruning of FFN neurons (the second paper, GUM): prune while fine-tuning on the cubic schedule, with the
random, magnitude, movement or gum method, masks as hooks on the FFN hidden activations, then the final masks
as a PruningPlan applied physically and saved (DIR/model, DIR/results.json). The methods and every decision on
the paper's open points are in docs/finepruning.md (§3, §7); each plan records them in its params.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..anatomy.redundancy import redundancy_of, summary
from ..apply.modes import physical
from ..data.reviews import TextSet
from ..data.splits import load_splits
from ..data.texts import read_texts
from ..errors import UserError
from ..evaluate.metrics import evaluate_classifier, perplexity
from ..models.classifier import BinaryClassifier
from ..models.families import ffn_widths
from ..models.loading import Loaded, load_model, max_length_for
from ..models.saved import save_model
from ..plan.plan import PruningPlan, check_sparsity
from ..runfolder import RunFolder, now_iso
from ..scores.basic import magnitude_scores
from ..train.loop import LoopHooks, Optim, Precision, train_loop
from ..train.tasks import ClassifyTask, LMTask, lm_blocks
from .masks import SELECTIONS, NeuronMasks, RunningSimilarity, gum_regulariser, top_masks
from .schedule import CubicSchedule

log = logging.getLogger(__name__)

METHODS = ("random", "magnitude", "movement", "gum")
DEFAULT_SELECTION = {"random": "local", "magnitude": "local", "movement": "local", "gum": "global"}
TASKS = ("lm", "imdb")


# --- configuration ----------------------------------------------------------------------------------

@dataclass
class FinepruneConfig:
    """Everything that decides a fine-pruning run (saved in results.json and the plan)."""

    model: str
    method: str = "movement"
    sparsity: float = 0.5
    steps: int = 100
    task: str = "lm"                   # lm (causal-LM loss, perplexity) or imdb (binary classification)
    text: str = "imdb"                 # lm: imdb (review text), wikitext (hub) or a text file
    data: str = "imdb"                 # imdb task: imdb, hf or a CSV / JSONL file
    selection: str | None = None       # local or global; None: the method's default
    batch_size: int = 4
    max_length: int | None = None      # default: the fine-tune's, else 128
    lr: float = 5e-5
    mask_lr: float = 1e-2
    weight_decay: float = 0.1
    adam_eps: float = 1e-4
    warmup: float = 0.1
    lambda_r: float = 2.0
    lambda_u: float = 1.0
    rho: float = 0.999
    train_size: int = 2000             # training reviews / texts (lm: at most this many)
    eval_size: int = 40                # held-out reviews / texts evaluated
    analysis_size: int = 32            # sequences for sensitivity and uniqueness
    freeze_embeddings: bool = True
    max_grad_norm: float = 1.0
    eval_dense: bool = True            # also evaluate the starting model
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown fine-pruning method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise UserError(f"unknown task '{self.task}'; choose lm or imdb")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise UserError(f"--selection must be local or global, got {self.selection}")
        check_sparsity(self.sparsity)
        if self.steps <= 0:
            raise UserError(f"--steps must be positive, got {self.steps}")
        self.schedule.validate()
        for name in ("batch_size", "train_size", "eval_size", "analysis_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lr", "mask_lr"):
            if not 0 < getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(self, name)}")
        if not 0 < self.rho <= 1:
            raise UserError(f"--rho must be in (0, 1], got {self.rho}")
        if self.lambda_r < 0 or self.lambda_u < 0:
            raise UserError("--lambda-r and --lambda-u must be non-negative")

    @property
    def schedule(self) -> CubicSchedule:
        return CubicSchedule(self.steps, 1.0 - self.sparsity, self.warmup)

    @property
    def chosen_selection(self) -> str:
        return self.selection or DEFAULT_SELECTION[self.method]


# --- tasks: the training tasks of fine-tuning, with held-out text ------------------------------------

def lm_text_split(source: str, train_size: int, eval_size: int, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts). imdb: reviews of the IMDB training split vs its test split (the
    same held-out reviews as data.lm_texts for the same seed); a text file: its non-empty lines shuffled by
    seed, the first `eval_size` (at most half) held out."""
    if source in ("imdb", "hf"):
        splits = load_splits(source, (train_size, 0, eval_size), seed)
        return splits.train.texts, splits.test.texts
    if source == "wikitext":  # pragma: no cover - needs the network
        try:
            from datasets import load_dataset
            train = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
            test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as exc:
            raise UserError(f"could not load wikitext ({type(exc).__name__}); offline, use imdb or a text file") from None
        return [t for t in train if t.strip()][:train_size], [t for t in test if t.strip()][:eval_size]
    lines = read_texts(source)  # UserError when the file is missing or has no text
    if len(lines) < 2:
        raise UserError(f"text file '{source}' has one line; give at least two (training and held-out text)")
    random.Random(seed).shuffle(lines)
    n_eval = min(eval_size, len(lines) // 2)
    return lines[n_eval:n_eval + train_size], lines[:n_eval]


def as_task_model(loaded: Loaded, task: str, seed: int) -> Loaded:
    """The model the task trains: a causal LM as is; for imdb a classifier as is, else a BinaryClassifier
    (head seeded) on the backbone."""
    if task == "imdb" and loaded.kind != "classifier":
        torch.manual_seed(seed)
        model = BinaryClassifier(loaded.model).to(loaded.device)
        return Loaded(model=model, tokenizer=loaded.tokenizer, kind="classifier", spec=loaded.spec,
                      info={"base_model": loaded.base_spec}, dtype=loaded.dtype)
    return loaded


def make_task(loaded: Loaded, cfg: FinepruneConfig):
    """The training task for an already task-shaped model (see as_task_model) and its held-out data;
    validates the data up front. Returns (task, held-out TextSet)."""
    max_length = max_length_for(loaded, cfg.max_length, fallback=128)
    if cfg.task == "lm":
        if loaded.kind != "causal-lm":
            raise UserError(f"--task lm needs a causal language model; '{loaded.spec}' is a {loaded.kind}, "
                            "use --task imdb")
        train, held_out = lm_text_split(cfg.text, cfg.train_size, cfg.eval_size, cfg.seed)
        task = LMTask(loaded, train, cfg.batch_size, max_length, cfg.steps, cfg.seed)
        if len(lm_blocks(loaded.tokenizer, held_out, max_length)) == 0:
            raise UserError(f"the held-out text has fewer than {max_length} tokens, so perplexity has no block; "
                            f"raise --eval-size or lower --max-length")
        return task, TextSet(held_out, [-1] * len(held_out))
    splits = load_splits(cfg.data, (cfg.train_size, 0, cfg.eval_size), cfg.seed)
    return ClassifyTask(loaded, splits.train, cfg.batch_size, max_length, cfg.steps * cfg.batch_size, cfg.seed), \
        splits.test


def evaluate_task(task, held_out: TextSet, loaded: Loaded, batch_size: int) -> dict:
    if task.metric == "perplexity":
        return perplexity(loaded, held_out.texts, task.max_length, batch_size=batch_size, progress=False)
    return evaluate_classifier(loaded, held_out, batch_size * 4, task.max_length, progress=False)


# --- training ------------------------------------------------------------------------------------------

def _scores_now(method: str, model: nn.Module, masks: NeuronMasks, frozen: list[Tensor] | None) -> list[Tensor]:
    if method == "random":
        return frozen
    if method == "magnitude":
        return magnitude_scores(model)
    return [s.detach() for s in masks.scores]


def train_masked(task, cfg: FinepruneConfig, progress: bool = True) -> tuple[NeuronMasks, dict]:
    """Fine-prune task.loaded.model in place; returns the masks (set to the final keep fraction, from the
    final scores) and the training history. The masks' hooks are not installed on return."""
    model, device = task.loaded.model, task.loaded.device
    method, selection, sched = cfg.method, cfg.chosen_selection, cfg.schedule
    widths = ffn_widths(model)
    learnable = method in ("movement", "gum")
    masks = NeuronMasks(model, widths, device, learnable=learnable)
    frozen = None
    if method == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        frozen = [torch.rand(w, generator=g).to(device) for w in widths]
    sim = RunningSimilarity(widths, cfg.rho, device) if method == "gum" else None
    state = {"omegas": [torch.ones(w, device=device) for w in widths], "keep": [], "kept": []}
    if sim is not None:
        masks.on_activation = sim.update

    def step_loss(t: int) -> dict[str, Tensor]:
        v = sched.keep(t)
        masks.set(top_masks(_scores_now(method, model, masks, frozen), v, selection))
        batch = task.batch(t)
        masks.token_mask, masks.record = batch.get("attention_mask"), sim is not None
        loss = task.loss(model, batch)
        reg = torch.zeros((), device=device)
        if method == "gum" and cfg.lambda_r > 0:
            reg = cfg.lambda_r * v / sched.keep_final * gum_regulariser(masks.scores, state["omegas"])
        state["keep"].append(round(v, 6))
        state["kept"].append(int(sum(float(m.sum()) for m in masks.hard)))
        return {"loss": loss, "reg": reg}

    def after_backward(t: int) -> None:
        masks.record = False
        if sim is not None:  # omega from this batch's statistics enters the next step (the code's lag)
            state["omegas"] = sim.weights(sched.keep(t), cfg.lambda_u, widths, device)

    optim = Optim(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, adam_eps=cfg.adam_eps,
                  max_grad_norm=cfg.max_grad_norm, freeze_embeddings=cfg.freeze_embeddings)
    extra = [{"params": masks.scores, "lr": cfg.mask_lr, "weight_decay": 0.0}] if learnable else []
    with masks.installed():
        hooks = LoopHooks(extra, after_backward, postfix=lambda t: {"keep": f"{sched.keep(t):.2f}"})
        hist = train_loop(model, cfg.steps, step_loss, optim, hooks=hooks, precision=Precision.of(task.loaded),
                          desc=f"fine-prune {method}", progress=progress)
    hist.update(step=list(range(cfg.steps)), keep=state["keep"], kept=state["kept"])
    masks.set(top_masks(_scores_now(method, model, masks, frozen), sched.keep_final, selection))
    if sim is not None:
        hist["omega_mean_last"] = [float(o.mean()) for o in state["omegas"]]
    return masks, hist


# --- the whole run ---------------------------------------------------------------------------------------

def plan_of(loaded: Loaded, masks: NeuronMasks, cfg: FinepruneConfig) -> PruningPlan:
    """The final masks as a PruningPlan (method and settings recorded)."""
    params = {"sparsity": cfg.sparsity, "selection": cfg.chosen_selection, "steps": cfg.steps,
              "task": cfg.task, "warmup": cfg.warmup, "lr": cfg.lr}
    if cfg.method in ("movement", "gum"):
        params["mask_lr"] = cfg.mask_lr
    if cfg.method == "gum":
        params.update(lambda_r=cfg.lambda_r, lambda_u=cfg.lambda_u, rho=cfg.rho)
    if cfg.method == "magnitude":
        params["score"] = "||W_in rows|| * ||W_out column||, recomputed each step"
    return PruningPlan(keep=masks.kept(), widths=ffn_widths(loaded.model), base_model=loaded.base_spec,
                       method=f"finepruning-{cfg.method}", params=params, seed=cfg.seed)


@dataclass
class FinepruneResult:
    out: Path
    results: dict
    plan: PruningPlan
    loaded: Loaded                  # the physically pruned model (as saved)
    probe: dict                     # a batch, and the masked model's outputs on it at the end of training
    probe_outputs: Tensor


def finepruning(cfg: FinepruneConfig, out: str | Path, device: str | None = None, progress: bool = True,
                figures: bool = True, force: bool = False, dtype: str | None = None) -> FinepruneResult:
    """Fine-prune `cfg.model`; write DIR/results.json, DIR/plan.json, DIR/redundancy.json, DIR/model/
    and DIR/figures/. Bad input fails before training and leaves nothing behind."""
    cfg.validate()
    with RunFolder(out, "finepruning", asdict(cfg), force=force) as rf:
        t0 = time.perf_counter()
        loaded = as_task_model(load_model(cfg.model, device=device, dtype=dtype), cfg.task, cfg.seed)
        torch.manual_seed(cfg.seed)
        task, held_out = make_task(loaded, cfg)
        load_s = time.perf_counter() - t0
        dense = evaluate_task(task, held_out, loaded, cfg.batch_size) if cfg.eval_dense else None
        masks, hist = train_masked(task, cfg, progress)

        plan = plan_of(loaded, masks, cfg)
        probe = task.analysis_batches(cfg.analysis_size)[0]
        with masks.installed(), torch.no_grad():
            probe_out = task.outputs(loaded.model.eval(), probe).detach().clone()
            t_eval = time.perf_counter()
            final = evaluate_task(task, held_out, loaded, cfg.batch_size)
            eval_s = time.perf_counter() - t_eval
        physical(loaded.model, plan)
        with torch.no_grad():
            diff = float((task.outputs(loaded.model, probe) - probe_out).abs().max())
        red = redundancy_of(loaded.model, task, cfg.analysis_size, progress=progress)

        metric = task.metric
        results = {
            "model": cfg.model, "method": cfg.method, "selection": cfg.chosen_selection, "task": cfg.task,
            "metric": metric, metric: final[metric], "dense_" + metric: dense[metric] if dense else None,
            "sparsity": plan.sparsity, "target_sparsity": cfg.sparsity, "steps": cfg.steps,
            "kept_widths": plan.kept_widths, "neurons_removed": plan.neurons_removed,
            "time": {"train_s": hist["train_s"], "s_per_step": hist["train_s"] / cfg.steps, "eval_s": eval_s,
                     "load_s": load_s, "total_s": time.perf_counter() - t0},
            "max_length": task.max_length, "eval": final, "dense_eval": dense,
            "physical_vs_masked_max_abs_diff": diff,
            "redundancy": summary(red),
            "history": {k: v for k, v in hist.items() if k != "train_s"},
            "schedule": {"warmup_steps": cfg.schedule.warmup_steps, "t_initial": cfg.schedule.t_initial,
                         "t_final": cfg.schedule.t_final, "keep_final": cfg.schedule.keep_final},
            "config": asdict(cfg), "device": str(loaded.device), "threads": torch.get_num_threads(),
            "created": now_iso(),
        }
        save_model(loaded, rf.stage("model"), plan=plan.to_dict(), max_length=task.max_length,
                   finepruning=asdict(cfg))
        plan.save(rf.stage("plan.json"))
        rf.write_json("redundancy.json", red)
        rf.write_json("results.json", results)
        if figures:
            from ..plotting.redundancy import plot_per_layer, plot_training
            plot_training(results, rf.stage_dir("figures"))
            plot_per_layer({cfg.method: results}, rf.stage_dir("figures"))
    log.info("fine-pruned %s with %s to sparsity %.3f in %.0f s: %s %.4g (dense %s)", cfg.model, cfg.method,
             plan.sparsity, hist["train_s"], metric, final[metric], dense[metric] if dense else "-")
    return FinepruneResult(Path(out), results, plan, loaded, probe, probe_out)
