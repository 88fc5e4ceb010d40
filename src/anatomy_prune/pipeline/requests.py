"""Request objects: every setting of a prune or sweep job in one frozen dataclass, validated once when built.

The CLI, the notebooks, the benchmarks and the Ray executor build these and pass them on; the jobs trust
them and check only what needs the model. Every fault is a one-line UserError (the CLI's exit status 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..anatomy.measures import DEFAULT_THRESHOLD, check_threshold
from ..data.splits import CALIB_SIZE
from ..errors import UserError
from ..models.offload import Placement, parse_size
from ..models.quantize import QUANTIZE
from ..plan.plan import PruningPlan
from ..linalg import DEFAULT_RIDGE
from ..scores.calibration import CALIB_MAX_LENGTH
from ..scores.registry import check_params, get_scorer
from ..validate import finite, fraction, known_keys, one_of, optional, positive_int, seed32, text, whole
from .allocation import Allocation, check_for, split_params, takes
from .compensation import Compensation, compensation_recipe
from .sweep_schema import load_grid, sweep_from_toml

MAX_TEXTS = 10_000_000     # bounds of sizes, lengths and batches: far above any real job, below absurd
MAX_TOKENS = 1 << 20
MAX_BATCH = 1 << 16
MAX_SEEDS = 100
MAX_TASK_RESOURCES = 1024  # CPUs / GPUs one Ray task may ask for
MAX_ITERATIONS = 16        # iterative pruning: each iteration collects the statistics again

SPLITS = ("test", "validation", "heldout")
MODES = ("mask", "physical")
LAYERWISE = ("sequential", "dense")
EXECUTORS = ("local", "ray")
TARGET_METHODS = ("calibrated", "fluctuation", "magnitude")   # scorers that score neurons and heads
TARGET_KEYS = ("flops", "speedup", "params", "batch_size", "seq_len", "floor", "cost_model", "check")
LAYERWISE_METHOD = "calibrated"    # the recipe the layer-wise path follows (without Fisher)
LAYERWISE_PARAMS = ("rebuilt", "neuron_path")  # its method parameters; and of the request: ridge, floor, multiple_of
LAYERWISE_OPTIONS = ("ridge", "floor", "multiple_of")


def _set(obj, **values) -> None:
    for k, v in values.items():
        object.__setattr__(obj, k, v)


def _spec(value, cls, what: str):
    """A spec given as the dataclass itself or as a mapping of its fields (e.g. a TOML table)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known_keys(value, [f.name for f in fields(cls)], what)
        return cls(**value)
    raise UserError(f"{what} must be a table of settings, got {value!r}")


@dataclass(frozen=True)
class EvalSpec:
    """What a job evaluates on: data (imdb, hf or a CSV/JSONL path), how many texts, which split."""

    data: str = "imdb"
    size: int = 1000
    split: str = "test"
    batch_size: int = 32
    max_length: int | None = None

    def __post_init__(self) -> None:
        _set(self, data=text(str(self.data) if isinstance(self.data, Path) else self.data, "--data"),
             size=positive_int(self.size, "--eval-size", MAX_TEXTS), split=one_of(self.split, SPLITS, "--split"),
             batch_size=positive_int(self.batch_size, "--batch-size", MAX_BATCH),
             max_length=optional(positive_int, self.max_length, "--max-length", MAX_TOKENS))


@dataclass(frozen=True)
class CalibSpec:
    """The calibration sample: size, tokens per text, its data (None: the evaluation data's IMDB) and seed."""

    size: int = CALIB_SIZE
    max_length: int = CALIB_MAX_LENGTH
    data: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, size=positive_int(self.size, "--calib-size", MAX_TEXTS),
             max_length=positive_int(self.max_length, "--calib-max-length", MAX_TOKENS),
             data=optional(text, str(self.data) if isinstance(self.data, Path) else self.data, "--calib-data"),
             seed=seed32(self.seed, "--seed"))

    def source(self, eval_data: str) -> str:
        """The calibration data: the one given, else the evaluation's IMDB source, else imdb."""
        return self.data or (eval_data if eval_data in ("imdb", "hf") else "imdb")


@dataclass(frozen=True)
class AnatomySpec:
    """How the anatomy is measured: the cosine threshold, tokens per input (None: models.max_length_for's
    rule), the inference batch size, and whether figures are drawn."""

    threshold: float = DEFAULT_THRESHOLD
    max_length: int | None = None
    batch_size: int = 16
    figures: bool = True

    def __post_init__(self) -> None:
        _set(self, threshold=check_threshold(self.threshold), batch_size=positive_int(self.batch_size, "--batch-size"),
             max_length=optional(positive_int, self.max_length, "--max-length"), figures=bool(self.figures))


@dataclass(frozen=True)
class AnatomyRequest:
    """`anatomy-prune anatomy`: a model (loaded with device and dtype), its inputs (probes, a file or a named
    set, read by data.texts.resolve_inputs) and how they are measured."""

    model: str
    inputs: str = "probes"
    spec: AnatomySpec = field(default_factory=AnatomySpec)
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        _set(self, spec=_spec(self.spec, AnatomySpec, "anatomy"))


@dataclass(frozen=True)
class TimingSpec:
    """How the latency benchmark builds and times its variants: untimed warm-up calls per variant, rounding
    multiples of the kept widths (1 always added), a strided control copy, and the seed of the token ids."""

    warmup: int = 1
    multiples: tuple[int, ...] = (1,)
    strided: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        multiples = sorted(set(whole(k, "rounding multiple") for k in _tuple(self.multiples, "multiples")) | {1})
        if multiples[0] < 1:
            raise UserError(f"rounding multiples must be >= 1, got {multiples}")
        _set(self, warmup=whole(self.warmup, "warmup", 0), multiples=tuple(multiples), strided=bool(self.strided),
             seed=seed32(self.seed, "seed"))


def check_target(target: Mapping, floor: float | None = None) -> dict:
    """{"flops": f} or {"params": f} (keep at most f of the dense FLOPs per token or parameters, 0 < f < 1) or
    {"speedup": s} (s > 1, measured at batch_size x seq_len), with optional batch_size, seq_len, floor;
    defaults filled."""
    if not isinstance(target, Mapping):
        raise UserError(f"a target must be a table like {{flops = 0.5}} or {{speedup = 2.0}}, got {target!r}")
    known_keys(target, TARGET_KEYS, "target")
    t = {"batch_size": 32, "seq_len": 128, "floor": 0.0 if floor is None else floor, **target}
    if sum(k in t for k in ("flops", "speedup", "params")) != 1:
        raise UserError("give one target: --target-flops F, --target-params F or --target-speedup S")
    t["batch_size"] = positive_int(t["batch_size"], "--target-batch", MAX_BATCH)
    t["seq_len"] = positive_int(t["seq_len"], "--target-length", MAX_TOKENS)
    for key, what in (("flops", "FLOPs"), ("params", "parameters")):
        if key in t:
            t[key] = finite(t[key], f"--target-{key} (a fraction of the dense {what})", 0.0, strict_lo=True)
            if t[key] >= 1:
                raise UserError(f"--target-{key} must be a fraction in (0, 1) of the dense model's {what}, got {t[key]}")
    if "speedup" in t:
        t["speedup"] = finite(t["speedup"], "--target-speedup (a speedup of the dense model)", 1.0, strict_lo=True)
    if t.get("cost_model") is not None:
        if "speedup" not in t or not isinstance(t["cost_model"], str) or not t["cost_model"]:
            raise UserError("--cost-model FILE (a run folder's cost_model.json) goes with --target-speedup")
    else:
        t.pop("cost_model", None)
    if "check" in t and ("speedup" not in t or not isinstance(t["check"], bool)):
        raise UserError("a target's check (time the plan and correct it) is true or false, for --target-speedup only")
    t["floor"] = fraction(t["floor"], "--floor")
    return t


@dataclass(frozen=True)
class PruneRequest:
    """One pruning job: a method at a sparsity (or a target, or a plan), how its scores become a plan
    (allocation) and how the pruned model is compensated, how to apply it, what to evaluate. Big models:
    layerwise (sequential | dense) and the placement options of models.offload.Placement."""

    model: str = ""
    method: str | None = None
    sparsity: float | None = None
    params: Mapping = field(default_factory=dict)
    plan_file: str | None = None
    mode: str = "physical"
    compensate: bool = False           # True: compensate with the default recipe (Compensation())
    allocation: Allocation = field(default_factory=Allocation)
    target: Mapping | None = None
    quantize: str | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    device: str | None = None
    dtype: str | None = None
    layerwise: str | None = None
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    weights_dtype: str | None = None
    max_shard_size: str | None = None
    plan: PruningPlan | None = None    # a plan already in memory (plan_file is read into it)
    compensation: Compensation | None = None   # None: the method's own recipe (calibrated's), else none
    iterations: int = 1                # > 1: iterative, the sparsity in equal shares, recalibrated between them

    def __post_init__(self) -> None:
        one_of(self.mode, MODES, "--mode")
        _set(self, eval=_spec(self.eval, EvalSpec, "eval"), calib=_spec(self.calib, CalibSpec, "calib"),
             allocation=_spec(self.allocation, Allocation, "allocation"),
             compensation=optional(_spec, self.compensation, Compensation, "compensation"),
             quantize=None if self.quantize in (None, "", "none") else one_of(self.quantize, QUANTIZE, "--quantize"))
        self._split_params()
        if self.plan_file is not None and self.plan is None:
            _set(self, plan=PruningPlan.load(self.plan_file))
        self._check_what()
        if self.plan is not None:
            compensation_recipe(self.plan, self.compensation)  # a plan's ridge / readout_mix
        self._check_big()

    def _split_params(self) -> None:
        """Allocation and compensation options given as method parameters (a TOML row, the CLI's, older
        callers') move to `allocation` and `compensation`; compensate=True is Compensation()."""
        if not isinstance(self.params, Mapping):
            raise UserError(f"params must be a mapping of method parameters, got {self.params!r}")
        split = split_params(self.params)
        if split.allocation is not None:
            if self.allocation != Allocation():
                raise UserError("give allocation options once: in allocation, not also in params")
            _set(self, allocation=split.allocation)
        comp = Compensation() if self.compensate and self.compensation is None else self.compensation
        if split.compensation is not None:
            if comp not in (None, Compensation()):
                raise UserError("give compensation options once: in compensation, not also in params")
            comp = split.compensation
        _set(self, params=split.params, compensation=comp)

    def _check_what(self) -> None:
        """Method or plan, sparsity or target, and the method's parameters."""
        if (self.method is None) == (self.plan is None):
            raise UserError("give either a method (--method) or a plan (--plan)")
        if self.sparsity is not None:
            _set(self, sparsity=fraction(self.sparsity, "--sparsity"))
        if self.target:
            if self.sparsity is not None or self.plan is not None:
                raise UserError("a target (--target-flops / --target-speedup) decides the sparsity itself; give no "
                                "--sparsity and no --plan with it")
            if self.method not in TARGET_METHODS:
                raise UserError(f"a target needs a method that scores neurons and heads: "
                                f"{', '.join(TARGET_METHODS)}")
            _set(self, target=check_target(self.target, self.allocation.floor))
        else:
            _set(self, target=None)
        if self.method is None:
            return
        get_scorer(self.method)
        if not self.layerwise:
            check_for(self.method, self.allocation, self.compensation)
            check_params(self.method, self.scorer_params())
        if self.sparsity is None and not self.target and get_scorer(self.method).needs_sparsity:
            raise UserError(f"method '{self.method}' needs --sparsity (the fraction of FFN neurons to remove, "
                            "in [0, 1))")

    def _check_big(self) -> None:
        """The layer-wise and placement options' checks that need no model."""
        if self.layerwise is not None:
            one_of(self.layerwise, LAYERWISE, "--layerwise")
            if self.plan is not None or self.quantize:
                raise UserError("--layerwise makes its own plan and keeps float weights; leave out --plan and --quantize")
            if self.sparsity is None:
                raise UserError("--layerwise needs --sparsity (the fraction of each block's FFN neurons to remove)")
            if self.method != LAYERWISE_METHOD:
                raise UserError(f"--layerwise prunes with the {LAYERWISE_METHOD} recipe (its error term, without "
                                f"Fisher); give --method {LAYERWISE_METHOD}, not {self.method}")
            if self.mode != "physical":
                raise UserError("--layerwise removes neurons physically, block by block; give --mode physical")
            if self.allocation.scope not in (None, "local"):
                raise UserError("--layerwise allocates each block on its own (local); it cannot rank all layers at once")
            comp = self.compensation or Compensation()
            given = set(self.allocation.given()) - {"allocation"} | set(comp.given())
            unknown = sorted(set(self.params) - set(LAYERWISE_PARAMS)) + sorted(given - set(LAYERWISE_OPTIONS))
            if unknown:
                raise UserError(f"--layerwise takes the parameters {', '.join(LAYERWISE_PARAMS + LAYERWISE_OPTIONS)}; "
                                f"not {', '.join(unknown)}")
            get_scorer(LAYERWISE_METHOD).options(**check_params(LAYERWISE_METHOD, self.params))   # their values
        _set(self, iterations=whole(self.iterations, "--iterations", 1))
        if self.iterations > MAX_ITERATIONS:
            raise UserError(f"--iterations must be at most {MAX_ITERATIONS}, got {self.iterations}")
        if self.iterations > 1 and (self.sparsity is None and not self.target or self.plan is not None
                                    or (self.target and "speedup" in self.target) or self.layerwise
                                    or self.quantize or self.mode != "physical"
                                    or self.allocation.head_sparsity is not None):
            raise UserError("--iterations N prunes a --sparsity of FFN neurons, or what --target-flops / "
                            "--target-params removes, in N shares, physically, recalibrating between them; leave out "
                            "--plan, --target-speedup, --head-sparsity, --layerwise and --quantize, and keep --mode "
                            "physical")
        Placement.make(self.device_map, self.max_memory, self.offload_folder, self.weights_dtype, bool(self.layerwise))
        if self.max_shard_size is not None:
            parse_size(self.max_shard_size, "--max-shard-size")

    def scorer_params(self, heads: bool = False) -> dict:
        """The method's parameters, with heads=True where head units are scored (a target, a head_sparsity);
        a scorer with a ridge of its own (calibrated's error term) gets the compensation's, one ridge for both."""
        params = dict(self.params)
        if heads or self.allocation.head_sparsity is not None:
            params["heads"] = True
        ridge = self.compensation.ridge if self.compensation is not None else None
        if ridge is not None and "ridge" in get_scorer(self.method).params:
            params["ridge"] = ridge
        return params

    def layerwise_settings(self) -> dict:
        """The layer-wise path's ridge, rebuilt, neuron_path (None: the scorer's default), floor and multiple_of,
        defaults filled."""
        ridge = self.compensation.ridge if self.compensation is not None else None
        return {"ridge": DEFAULT_RIDGE if ridge is None else ridge, "rebuilt": bool(self.params.get("rebuilt", True)),
                "neuron_path": self.params.get("neuron_path"),
                "floor": self.allocation.floor or 0.0, "multiple_of": self.allocation.multiple_of}

    def big_options(self) -> dict:
        """The big-model options given (for a run's settings)."""
        opts = dict(layerwise=self.layerwise, device_map=self.device_map, max_memory=self.max_memory,
                    offload_folder=self.offload_folder, weights_dtype=self.weights_dtype,
                    max_shard_size=self.max_shard_size)
        return {k: v for k, v in opts.items() if v is not None}

    def settings(self) -> dict:
        """What a run folder records (and digests) for this request (request options by parameter name)."""
        comp = self.compensation or Compensation()
        params = {**self.params, **self.allocation.given(), **comp.given()}
        return dict(model=self.model, method=self.method, sparsity=self.sparsity, params=params, mode=self.mode,
                    plan=self.plan.to_dict() if self.plan is not None else None,
                    compensate=self.compensate or self.compensation == Compensation(),
                    calib_size=self.calib.size, calib_max_length=self.calib.max_length,
                    calib_data=self.calib.source(self.eval.data), data=self.eval.data, eval_size=self.eval.size,
                    split=self.eval.split, batch_size=self.eval.batch_size, max_length=self.eval.max_length,
                    seed=self.calib.seed, quantize=self.quantize, target=self.target, **self.big_options(),
                    **({"iterations": self.iterations} if self.iterations > 1 else {}))


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: methods x sparsities (x seeds of stochastic methods), a TOML grid's rows, targets; where
    the points run (executor local or ray, with address and per-task CPUs / GPUs)."""

    model: str
    methods: tuple[str, ...] = ("random", "magnitude", "strategy", "activation")
    sparsities: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    mode: str = "physical"
    params: Mapping = field(default_factory=dict)
    config: str | None = None
    targets: tuple[Mapping, ...] = ()
    compensate: bool = False
    quantize: str | None = None
    seeds: int = 5
    eval: EvalSpec = field(default_factory=EvalSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    device: str | None = None
    dtype: str | None = None
    executor: str = "local"
    address: str | None = None
    num_cpus_per_task: float = 1
    num_gpus_per_task: float = 0
    ray_init: Mapping | None = None
    figures: bool = True
    reference: Mapping | None = None
    allocation: Allocation = field(default_factory=Allocation)
    grid: Mapping | None = field(default=None, compare=False)   # the config file, read and checked
    compensation: Compensation | None = None   # every point's recipe (None: each method's own; see compensate)

    def __post_init__(self) -> None:
        text(self.model, "--model")
        one_of(self.mode, MODES, "--mode")
        methods, sparsities, targets = (_tuple(self.methods, "--methods"), _tuple(self.sparsities, "--sparsities"),
                                        _tuple(self.targets, "--targets"))
        for m in methods:
            get_scorer(m)
        if not isinstance(self.params, Mapping) or not all(isinstance(p, Mapping) for p in self.params.values()):
            raise UserError("params must map a method name to its parameters, e.g. {'strategy': {'beta': 0.0}}")
        params = {name: dict(p) for name, p in self.params.items()}
        for name, p in params.items():
            split = split_params(p)
            check_params(name, split.params)
            check_for(name, split.allocation or Allocation(), split.compensation)
        _set(self, methods=methods, sparsities=tuple(fraction(s, "--sparsities") for s in sparsities),
             targets=tuple(check_target(t) for t in targets), params=params,
             eval=_spec(self.eval, EvalSpec, "eval"), calib=_spec(self.calib, CalibSpec, "calib"),
             allocation=_spec(self.allocation, Allocation, "allocation"), seeds=whole(self.seeds, "--seeds", 1, MAX_SEEDS),
             compensation=optional(_spec, self.compensation, Compensation, "compensation"),
             quantize=None if self.quantize in (None, "", "none") else one_of(self.quantize, QUANTIZE, "--quantize"),
             config=None if self.config is None else str(self.config))
        self._check_executor()
        if self.config is not None and self.grid is None:
            _set(self, grid=load_grid(self.config))
        if not self.grid and not self.targets and not (self.methods and any(s > 0 for s in self.sparsities)):
            raise UserError("nothing to sweep: give --methods and non-zero --sparsities, or --config")

    def _check_executor(self) -> None:
        one_of(self.executor, EXECUTORS, "executor")
        cpus = finite(self.num_cpus_per_task, "--num-cpus-per-task", 0.0, MAX_TASK_RESOURCES, strict_lo=True)
        gpus = finite(self.num_gpus_per_task, "--num-gpus-per-task", 0.0, MAX_TASK_RESOURCES)
        _set(self, num_cpus_per_task=cpus, num_gpus_per_task=gpus)
        if self.executor == "local":
            given = [n for n, v, d in (("--address", self.address, None), ("--num-cpus-per-task", cpus, 1.0),
                                       ("--num-gpus-per-task", gpus, 0.0)) if v != d]
            given += ["ray_init"] if self.ray_init else []
            if given:
                raise UserError(f"{', '.join(given)}: only for --executor ray (the default executor is local)")
        elif self.device is not None and str(self.device).startswith("cuda") and gpus == 0:
            raise UserError("--device cuda with --executor ray needs --num-gpus-per-task > 0 (Ray hides the GPUs "
                            "from tasks that do not ask for one)")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "SweepConfig":
        """A sweep described by a TOML file (its keys are this class's fields; [eval], [calib] and
        [allocation] tables; [[row]] tables make it its own grid); `overrides` win over the file."""
        return sweep_from_toml(cls, path, overrides)

    def point_request(self, point: Mapping) -> PruneRequest:
        """The PruneRequest of one point of this sweep (target points are pruned physically); the sweep's
        allocation and compensation apply where a point gives none of its own."""
        split = split_params(point.get("params") or {})
        alloc = split.allocation or self.allocation
        method = point["method"]
        if not point.get("target") and alloc != Allocation():   # each method takes the options it has
            alloc = alloc.only(takes(method))
        return PruneRequest(model=self.model, method=method, sparsity=point.get("sparsity"), params=split.params,
                            mode="physical" if point.get("target") else self.mode, compensate=self.compensate,
                            allocation=alloc, target=point.get("target"), quantize=self.quantize, eval=self.eval,
                            calib=self.calib, device=self.device, dtype=self.dtype,
                            compensation=split.compensation or self.compensation)


def _tuple(value, what: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise UserError(f"{what} must be a list, got {value!r}")
    return tuple(value)
