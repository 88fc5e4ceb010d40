"""Fine-pruning of FFN (MLP) neurons: prune while fine-tuning, on the cubic schedule of the second paper
("What Matters in the Structured Pruning of Generative Language Models?", GUM), with four methods:

  random     frozen random scores drawn once (seeded), so the pruned sets are nested over time
  magnitude  structured magnitude ||W1 rows|| x ||W2 column||, recomputed from the weights every step (GMP)
  movement   learnable per-neuron scores, trained by AdamW through the straight-through mask (see
             finepruning_masks.py for the exact gradient), Top_v per layer (`--selection global` optional)
  gum        global movement + the uniqueness-weighted L1 regulariser on sigmoid(scores) (notes 3.5)

Masks are forward pre-hooks on the down projections (the activation times a 0/1 vector); the dense weights
are kept during training. At the end the final masks (keep fraction v_final, from the final scores) become a
`PruningPlan`, applied with `apply.physical` and saved with `io.save_model(..., plan=plan)`: DIR/model is a
model spec. DIR/results.json holds the metric of the masked model at the end of training, the sparsity, the
time and the per-layer sensitivity and uniqueness of the final (physically pruned) model.

Schedule (notes Sec. 2): T steps, w = int(warmup * T), t_i = w, t_f = 3w; keep fraction v(t) = 1 for t <= t_i,
v_f for t > T - t_f, else v_f + (1 - v_f) c^3 with c = 1 - (t - t_i) / (T - t_i - t_f); t counts finished
optimizer steps from 0. LR (weights and scores alike): linear warm-up over w steps, then linear decay.

Decisions on the notes' open points (Sec. 7), also recorded in every plan's params:
  7.1  GUM is the code's `uniqueness_reg_mask` path: R = sum_l(sum_i sigmoid(s_li) omega_li / m_l) / (3L),
       lambda(t) = lambda_R v(t)/v_f, omega = 1 + lambda_u u from the running |cos| (rho), one step late.
       lambda_R = 2, rho = 0.999 (the code's defaults); lambda_u = 1 (the code's default 0 turns GUM off).
  7.2  `movement` is plain Top_v on the learned scores, no L1 and no soft movement; local by default,
       `--selection global` gives global movement (GUM without the regulariser).
  7.3  magnitude: one score per neuron, the product of the two norms (as `methods.magnitude`), local Top_v,
       so each layer keeps exactly its scheduled count (the code's independent row and column choices keep
       their intersection, which can be fewer).
  7.4  random: Top_v of frozen random scores on the same cubic schedule, local by default.
  7.5  padding tokens are left out of GUM's similarity and of the uniqueness measure.
  7.8  exactly the counted neurons are kept (ties broken by index); counts round as plan.keep_counts does.
  7.10 perplexity: non-overlapping blocks of --max-length tokens (evaluate.perplexity).
  7.11 the reported metric is the masked model at the final sparsity after the last step, which the saved,
       physically pruned model reproduces.
Not done: distillation, WikiSQL / SAMSum; the word embeddings are frozen by default (speed, as finetune.py).
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .classifier import BinaryClassifier
from .data import TextSet, batches, check_max_length, load_splits, read_texts, to_device
from .errors import UserError
from .evaluate import evaluate_classifier, perplexity
from .families import ffn_widths
from .finepruning_masks import (SELECTIONS, NeuronMasks, RunningSimilarity, down_projections, gum_regulariser,
                                neuron_norm_scores, top_masks)
from .io import atomic_dir, now_iso, save_model, write_json
from .models import Loaded, load_model
from .plan import PruningPlan, check_sparsity

log = logging.getLogger(__name__)

METHODS = ("random", "magnitude", "movement", "gum")
DEFAULT_SELECTION = {"random": "local", "magnitude": "local", "movement": "local", "gum": "global"}
TASKS = ("lm", "imdb")


# --- schedule ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CubicSchedule:
    """Keep fraction over training: dense warm-up, cubic decay, final stretch at `keep_final`."""

    total: int
    keep_final: float
    warmup: float = 0.1

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.total)

    @property
    def t_initial(self) -> int:
        return self.warmup_steps

    @property
    def t_final(self) -> int:
        return 3 * self.warmup_steps

    @staticmethod
    def min_steps(warmup: float) -> int:
        """Fewest steps with at least one warm-up step and a cubic stretch (t_i < T - t_f)."""
        t = 1
        while int(warmup * t) < 1 or 4 * int(warmup * t) >= t:
            t += 1
        return t

    def validate(self) -> None:
        if not 0 < self.warmup < 0.25:
            raise UserError(f"--warmup must be in (0, 0.25) so that warm-up, decay and final stretch fit, "
                            f"got {self.warmup}")
        if self.warmup_steps < 1 or self.t_initial >= self.total - self.t_final:
            n = self.min_steps(self.warmup)
            raise UserError(f"--steps {self.total} is below the pruning schedule's warm-up: with --warmup "
                            f"{self.warmup} it needs at least {n} steps (dense warm-up, cubic decay, 3x warm-up "
                            f"at the target)")

    def keep(self, t: int) -> float:
        """v(t), the fraction of neurons kept after t finished steps."""
        if t <= self.t_initial:
            return 1.0
        if t > self.total - self.t_final:
            return self.keep_final
        c = 1.0 - (t - self.t_initial) / (self.total - self.t_initial - self.t_final)
        return self.keep_final + (1.0 - self.keep_final) * c ** 3

    def lr_factor(self, t: int) -> float:
        w = max(1, self.warmup_steps)
        return (t + 1) / w if t < w else max(0.0, (self.total - t) / max(1, self.total - w))


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


# --- tasks --------------------------------------------------------------------------------------------

class Task:
    """Training batches, loss, evaluation and analysis batches for one model."""

    name = ""
    metric = ""

    def __init__(self, loaded: Loaded, cfg: FinepruneConfig, max_length: int):
        self.loaded, self.cfg, self.max_length = loaded, cfg, max_length

    def batch(self, step: int) -> dict:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        raise NotImplementedError

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        raise NotImplementedError

    def evaluate(self, loaded: Loaded) -> dict:
        raise NotImplementedError

    def analysis_batches(self) -> list[dict]:
        raise NotImplementedError


def _epoch_order(n: int, total: int, seed: int) -> list[int]:
    """`total` indices into range(n): seeded shuffles of the whole range, one after another."""
    rng, order = random.Random(seed), []
    while len(order) < total:
        ids = list(range(n))
        rng.shuffle(ids)
        order.extend(ids)
    return order[:total]


class LMTask(Task):
    """Causal-LM loss on blocks of max_length tokens of training text; perplexity on held-out text."""

    name, metric = "lm", "perplexity"

    def __init__(self, loaded: Loaded, cfg: FinepruneConfig, max_length: int):
        super().__init__(loaded, cfg, max_length)
        if loaded.kind != "causal-lm":
            raise UserError(f"--task lm needs a causal language model; '{loaded.spec}' is a {loaded.kind}, "
                            "use --task imdb")
        train, self.eval_texts = lm_text_split(cfg.text, cfg.train_size, cfg.eval_size, cfg.seed)
        tok = loaded.tokenizer
        self.blocks = _blocks(tok, train, max_length)  # [n_blocks, max_length]
        if self.blocks.shape[0] == 0:
            raise UserError(f"the training text has fewer than {max_length} tokens; give more text "
                            "or a smaller --max-length")
        if len(_blocks(tok, self.eval_texts, max_length)) == 0:
            raise UserError(f"the held-out text has fewer than {max_length} tokens, so perplexity has no block; "
                            f"raise --eval-size or lower --max-length")
        self.order = _epoch_order(self.blocks.shape[0], cfg.steps * cfg.batch_size, cfg.seed)

    def batch(self, step: int) -> dict:
        b = self.cfg.batch_size
        ids = self.blocks[self.order[step * b:(step + 1) * b]]
        return {"input_ids": ids.to(self.loaded.device)}

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"]).logits

    def evaluate(self, loaded: Loaded) -> dict:
        return perplexity(loaded, self.eval_texts, self.max_length, batch_size=self.cfg.batch_size, progress=False)

    def analysis_batches(self) -> list[dict]:
        n, b = min(self.cfg.analysis_size, self.blocks.shape[0]), self.cfg.batch_size
        return [{"input_ids": self.blocks[i:min(i + b, n)].to(self.loaded.device)} for i in range(0, n, b)]


def lm_text_split(source: str, train_size: int, eval_size: int, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts). imdb: reviews of the IMDB training split vs its test split (the
    same held-out reviews as data.lm_texts for the same seed); a text file: its non-empty lines shuffled by
    seed, the first `eval_size` (at most half) held out."""
    if source == "imdb":
        splits = load_splits("imdb", (train_size, 0, eval_size), seed)
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


def _blocks(tokenizer, texts: list[str], length: int) -> Tensor:
    """Texts joined with EOS and cut into non-overlapping blocks: [n_blocks, length] (the tail dropped)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // length
    return torch.tensor(ids[:n * length], dtype=torch.long).view(n, length)


class ClassifyTask(Task):
    """IMDB (or a labelled file) binary classification: BCE on the readout logit; accuracy."""

    name, metric = "imdb", "accuracy"

    def __init__(self, loaded: Loaded, cfg: FinepruneConfig, max_length: int):
        super().__init__(loaded, cfg, max_length)
        splits = load_splits(cfg.data, (cfg.train_size, 0, cfg.eval_size), cfg.seed)
        if len(set(splits.train.labels)) < 2:
            raise UserError("the training split has a single class; give more data or another seed")
        self.train, self.eval_set = splits.train, splits.test
        self.order = _epoch_order(len(self.train), cfg.steps * cfg.batch_size, cfg.seed)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def _encode(self, ids: list[int], data: TextSet) -> dict:
        b = next(batches(self.loaded.tokenizer, [data.texts[i] for i in ids], len(ids), self.max_length,
                         [data.labels[i] for i in ids]))
        return to_device(b, self.loaded.device)

    def batch(self, step: int) -> dict:
        b = self.cfg.batch_size
        return self._encode(self.order[step * b:(step + 1) * b], self.train)

    def loss(self, model: nn.Module, batch: dict) -> Tensor:
        return self.loss_fn(self.outputs(model, batch), batch["labels"])

    def outputs(self, model: nn.Module, batch: dict) -> Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def evaluate(self, loaded: Loaded) -> dict:
        return evaluate_classifier(loaded, self.eval_set, self.cfg.batch_size * 4, self.max_length, progress=False)

    def analysis_batches(self) -> list[dict]:
        n, b = min(self.cfg.analysis_size, len(self.train)), self.cfg.batch_size
        return [self._encode(list(range(i, min(i + b, n))), self.train) for i in range(0, n, b)]


def as_task_model(loaded: Loaded, task: str, seed: int) -> Loaded:
    """The model the task trains: a causal LM as is; for imdb a classifier as is, else a BinaryClassifier
    (head seeded) on the backbone."""
    if task == "imdb" and loaded.kind != "classifier":
        torch.manual_seed(seed)
        model = BinaryClassifier(loaded.model).to(loaded.device)
        return Loaded(model=model, tokenizer=loaded.tokenizer, kind="classifier", spec=loaded.spec,
                      info={"base_model": loaded.base_spec})
    return loaded


def make_task(loaded: Loaded, cfg: FinepruneConfig) -> Task:
    """Build the task for an already task-shaped model (see as_task_model); validates data up front."""
    max_length = cfg.max_length or int(loaded.info.get("max_length")
                                       or loaded.info.get("finetune", {}).get("max_length") or 128)
    check_max_length(loaded.tokenizer, max_length, loaded.max_positions)
    return (LMTask if cfg.task == "lm" else ClassifyTask)(loaded, cfg, max_length)


# --- training ------------------------------------------------------------------------------------------

def _scores_now(method: str, model: nn.Module, masks: NeuronMasks, frozen: list[Tensor] | None) -> list[Tensor]:
    if method == "random":
        return frozen
    if method == "magnitude":
        return neuron_norm_scores(model)
    return [s.detach() for s in masks.scores]


def _freeze_embeddings(model: nn.Module) -> list[nn.Parameter]:
    """Freeze the input (word) embeddings, tied LM heads included; returns what was frozen."""
    inner = getattr(model, "backbone", model)
    emb = inner.get_input_embeddings().weight
    if emb.requires_grad:
        emb.requires_grad_(False)
        return [emb]
    return []


def train_masked(task: Task, cfg: FinepruneConfig, progress: bool = True) -> tuple[NeuronMasks, dict]:
    """Fine-prune task.loaded.model in place; returns the masks (set to the final keep fraction, from the
    final scores) and the training history. The masks' hooks are not installed on return."""
    model, device = task.loaded.model, task.loaded.device
    method, selection, sched = cfg.method, cfg.chosen_selection, cfg.schedule
    widths = ffn_widths(model)
    learnable = method in ("movement", "gum")
    masks = NeuronMasks(down_projections(model), widths, device, learnable=learnable)
    frozen = None
    if method == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        frozen = [torch.rand(w, generator=g).to(device) for w in widths]
    sim = RunningSimilarity(widths, cfg.rho, device) if method == "gum" else None
    omegas = [torch.ones(w, device=device) for w in widths]
    if sim is not None:
        masks.on_activation = sim.update

    frozen_params = _freeze_embeddings(model) if cfg.freeze_embeddings else []
    weights = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if learnable:
        groups.append({"params": masks.scores, "lr": cfg.mask_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, eps=cfg.adam_eps)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.lr_factor)
    hist: dict[str, list] = {"step": [], "keep": [], "kept": [], "loss": [], "reg": []}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"fine-prune {method}", disable=not progress)
    try:
        with masks.installed():
            for t in bar:
                v = sched.keep(t)
                masks.set(top_masks(_scores_now(method, model, masks, frozen), v, selection))
                batch = task.batch(t)
                masks.token_mask, masks.record = batch.get("attention_mask"), sim is not None
                loss = task.loss(model, batch)
                reg = torch.zeros((), device=device)
                if method == "gum" and cfg.lambda_r > 0:
                    reg = cfg.lambda_r * v / sched.keep_final * gum_regulariser(masks.scores, omegas)
                (loss + reg).backward()
                masks.record = False
                if sim is not None:  # omega from this batch's statistics enters the next step (the code's lag)
                    omegas = sim.weights(v, cfg.lambda_u, widths, device)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
                opt.step()
                lr_sched.step()
                opt.zero_grad(set_to_none=True)
                hist["step"].append(t)
                hist["keep"].append(round(v, 6))
                hist["kept"].append(int(sum(float(m.sum()) for m in masks.hard)))
                hist["loss"].append(loss.item())
                hist["reg"].append(reg.item())
                if not math.isfinite(hist["loss"][-1]):
                    raise UserError(f"the loss became {hist['loss'][-1]} at step {t}; lower --lr")
                bar.set_postfix(loss=f"{sum(hist['loss'][-10:]) / len(hist['loss'][-10:]):.3f}", keep=f"{v:.2f}")
    finally:
        for p in frozen_params:
            p.requires_grad_(True)
        model.eval()
    hist["train_s"] = time.perf_counter() - start
    masks.set(top_masks(_scores_now(method, model, masks, frozen), sched.keep_final, selection))
    if sim is not None:
        hist["omega_mean_last"] = [float(o.mean()) for o in omegas]
    return masks, hist


# --- the whole run ---------------------------------------------------------------------------------------

def make_plan(loaded: Loaded, masks: NeuronMasks, cfg: FinepruneConfig) -> PruningPlan:
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
                figures: bool = True) -> FinepruneResult:
    """Fine-prune `cfg.model`; write DIR/results.json, DIR/plan.json, DIR/redundancy.json, DIR/model/
    and DIR/figures/. Bad input fails before training and leaves nothing behind."""
    from .apply import physical
    from .redundancy import measure, summary

    cfg.validate()
    t0 = time.perf_counter()
    loaded = as_task_model(load_model(cfg.model, device=device), cfg.task, cfg.seed)
    torch.manual_seed(cfg.seed)
    task = make_task(loaded, cfg)
    load_s = time.perf_counter() - t0
    dense = task.evaluate(loaded) if cfg.eval_dense else None
    masks, hist = train_masked(task, cfg, progress)

    plan = make_plan(loaded, masks, cfg)
    probe = task.analysis_batches()[0]
    with masks.installed(), torch.no_grad():
        probe_out = task.outputs(loaded.model.eval(), probe).detach().clone()
        t_eval = time.perf_counter()
        final = task.evaluate(loaded)
        eval_s = time.perf_counter() - t_eval
    physical(loaded.model, plan)
    with torch.no_grad():
        diff = float((task.outputs(loaded.model, probe) - probe_out).abs().max())
    red = measure(loaded.model, task.analysis_batches(), task.loss, progress=progress)

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
    with atomic_dir(out) as tmp:
        save_model(loaded, tmp / "model", plan=plan, max_length=task.max_length, finepruning=asdict(cfg))
        plan.save(tmp / "plan.json")
        write_json(tmp / "redundancy.json", red)
        write_json(tmp / "results.json", results)
        if figures:
            from .plotting.redundancy import plot_per_layer, plot_training
            plot_training(results, tmp / "figures")
            plot_per_layer({cfg.method: results}, tmp / "figures")
    log.info("fine-pruned %s with %s to sparsity %.3f in %.0f s: %s %.4g (dense %s)", cfg.model, cfg.method,
             plan.sparsity, hist["train_s"], metric, final[metric], dense[metric] if dense else "-")
    return FinepruneResult(Path(out), results, plan, loaded, probe, probe_out)


def redundancy_of(spec: str, out: str | Path, cfg: FinepruneConfig, plan_file: str | None = None,
                  device: str | None = None, progress: bool = True, figures: bool = True) -> dict:
    """Sensitivity and uniqueness of a model (optionally after physically applying a plan file) on the
    task's analysis batches; writes DIR/redundancy.json and a figure."""
    from .apply import physical
    from .redundancy import measure, summary

    loaded = as_task_model(load_model(spec, device=device), cfg.task, cfg.seed)
    plan = PruningPlan.load(plan_file) if plan_file else None
    if plan is not None:
        plan.check_fits(loaded.model)
    task = make_task(loaded, cfg)
    if plan is not None:
        physical(loaded.model, plan)
    red = measure(loaded.model, task.analysis_batches(), task.loss, progress=progress)
    red.update(model=spec, plan=plan_file, task=cfg.task, created=now_iso())
    with atomic_dir(out) as tmp:
        write_json(tmp / "redundancy.json", red)
        if figures:
            from .plotting.redundancy import plot_per_layer
            plot_per_layer({Path(spec).name or spec: {"redundancy": summary(red),
                                                      "kept_widths": [lay["width"] for lay in red["layers"]]}},
                           tmp / "figures")
    return red

