"""Peers side by side (issue 16, part 6): prune our BinaryClassifier with Torch-Pruning and with TextPruner.

Both functions prune the model IN PLACE and physically (smaller nn.Linear weights), on BERT's layout (BERT,
RoBERTa) and on MPNet's (all-mpnet-base-v2, the paper's scale; issue 25), whose modules are found through our
family adapters (models.families), and return

    {"seconds": wall time of the whole call (importance passes included),
     "ffn_widths": [FFN width per layer], "heads_per_layer": [attention heads per layer],
     "params": parameters of the whole classifier after pruning, "notes": "what the peer did"}

    prune_with_torch_pruning(model, calib_batches, ffn_sparsity=0.5, head_sparsity=0.25, importance="taylor",
                             loss_fn=loss_fn)
    prune_with_textpruner(model, calib_batches, ffn_sparsity=0.5, head_sparsity=0.25, loss_fn=loss_fn)

`model` is anatomy_prune.classifier.BinaryClassifier (.backbone a BertModel or MPNetModel, .dense the head);
`calib_batches` a list of {"input_ids", "attention_mask", "labels"}; `loss_fn(model, batch)` a scalar loss.
The peers are used as libraries (pip: torch-pruning==1.6.1, textpruner==1.1.post2 installed --no-deps:
its metadata wrongly pins numpy<1.22 on Python >= 3.10); only glue is written here: the head removal that
transformers 5 no longer has (BertModel.prune_heads, which TextPruner calls) and, for MPNet, its layer names
registered with TextPruner, its shared relative position bias detached while Torch-Pruning traces (so that
each layer's heads stay their own group), and each pruned layer's rows of that bias (`head_index`).

After pruning, every attention module is consistent: num_attention_heads = heads kept, all_head_size =
query.out_features, attention_head_size unchanged (whole heads are removed, never head dimensions); the
nn.Linear in_features / out_features fields match their weights. The backbone config still says the dense
sizes (intermediate_size, num_attention_heads), as with our own physical pruning of per-layer widths.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from anatomy_prune.models.families import attention_sites, base_model, ffn_sites, get_module
from anatomy_prune.models.surgery import keep_heads, select_position_bias

PEER_MODEL_TYPES = ("bert", "roberta", "mpnet")   # separate q / k / v / o projections and whole heads

LossFn = Callable[[nn.Module, dict], Tensor]


# --- the layout both peers work on ----------------------------------------------------------------------

class _Block(NamedTuple):
    """One block's modules, found through our family adapters (models.families): `attn` holds the head-count
    fields; q, k, v are None once a layer lost every head (its attention is then a HeadlessAttention)."""
    attn: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    up: nn.Module
    down: nn.Module
    head_size: int


def _blocks(model: nn.Module) -> list[_Block]:
    """BERT's layout (separate q / k / v / o nn.Linear, whole heads, one FFN up projection) and MPNet's, which
    differs in names and in one relative position bias shared by every layer (see models.surgery)."""
    base = base_model(model)
    mt = getattr(getattr(base, "config", None), "model_type", "?")
    if mt not in PEER_MODEL_TYPES:
        raise ValueError(f"the peer adapters support model types {', '.join(PEER_MODEL_TYPES)}, got {mt}")
    out = []
    for a, f in zip(attention_sites(model), ffn_sites(model)):
        qkv = [get_module(base, n) if a.n_heads else None for n in (a.q, a.k, a.v)]
        out.append(_Block(get_module(base, a.attn), *qkv, get_module(base, a.o), get_module(base, f.up[0]),
                          get_module(base, f.down), a.head_dim))
    return out


def ffn_widths(model: nn.Module) -> list[int]:
    return [int(b.up.weight.shape[0]) for b in _blocks(model)]


def heads_per_layer(model: nn.Module) -> list[int]:
    return [int(b.o.weight.shape[1]) // b.head_size for b in _blocks(model)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sync_linear_fields(model: nn.Module) -> None:
    """nn.Linear in/out_features from the weights (TextPruner swaps weights without updating them)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = (int(d) for d in mod.weight.shape)


def check_consistent(model: nn.Module) -> None:
    """Raise AssertionError unless shapes and the attention fields agree in every layer (and MPNet's kept
    position-bias rows, `head_index`, are one per head)."""
    for i, b in enumerate(_blocks(model)):
        width = b.o.weight.shape[1]
        assert width % b.head_size == 0, f"layer {i}: {width} not a multiple of the head size"
        assert b.up.weight.shape[0] == b.down.weight.shape[1], f"layer {i}: FFN"
        linears = [b.o, b.up, b.down]
        if b.q is not None:
            assert all(m.weight.shape[0] == width for m in (b.q, b.k, b.v)), f"layer {i}: q/k/v != o's input"
            assert b.attn.num_attention_heads == width // b.head_size, f"layer {i}: num_attention_heads"
            assert b.attn.all_head_size == width, f"layer {i}: all_head_size"
            linears += [b.q, b.k, b.v]
            idx = getattr(b.attn, "head_index", None)
            assert idx is None or len(idx) == width // b.head_size, f"layer {i}: head_index"
        else:
            assert width == 0, f"layer {i}: no q/k/v but o reads {width} features"
        for lin in linears:
            assert (lin.out_features, lin.in_features) == tuple(lin.weight.shape), f"layer {i}: Linear fields"


def _set_head_fields(model: nn.Module) -> None:
    """num_attention_heads / all_head_size from the weights (attention_head_size is never changed)."""
    for b in _blocks(model):
        if b.q is not None:
            b.attn.num_attention_heads = int(b.q.weight.shape[0]) // b.head_size
            b.attn.all_head_size = int(b.q.weight.shape[0])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


@contextlib.contextmanager
def _grad_mode(model: nn.Module):
    """eval() (no dropout) with gradients on every parameter; restores training flag and requires_grad."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p in model.parameters():
            p.grad = None
        model.train(was_training)


def _result(model: nn.Module, seconds: float, notes: str) -> dict:
    check_consistent(model)
    return {"seconds": seconds, "ffn_widths": ffn_widths(model), "heads_per_layer": heads_per_layer(model),
            "params": n_params(model), "notes": notes}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _check_sparsities(ffn_sparsity: float, head_sparsity: float) -> None:
    if not 0.0 <= ffn_sparsity < 1.0 or not 0.0 <= head_sparsity < 1.0:
        raise ValueError(f"sparsities must be in [0, 1), got ffn {ffn_sparsity}, heads {head_sparsity}")


@contextlib.contextmanager
def _detached_position_bias(enc: nn.Module):
    """MPNet's encoder computes one relative position bias and adds it to every layer's attention scores.
    Torch-Pruning groups whatever the traced graph joins, so that shared tensor would tie every layer's heads
    (and the bias table) into one group. Detached for the call, each layer's heads form their own group, as in
    BERT; the bias table gets no gradient (it is not pruned either way)."""
    if "compute_position_bias" in vars(enc):      # already wrapped by a caller: leave it to them
        yield
        return
    compute = enc.compute_position_bias
    enc.compute_position_bias = lambda *a, **k: compute(*a, **k).detach()
    try:
        yield
    finally:
        del enc.compute_position_bias


def _kept_heads(dense_q: Tensor, q: Tensor, head_size: int) -> list[int]:
    """Which of the dense heads a pruned q projection kept, in its order (each kept block of rows is
    unchanged, so it matches exactly one dense block)."""
    d = dense_q.reshape(-1, head_size * dense_q.shape[1])
    n = q.detach().reshape(-1, head_size * q.shape[1])
    eq = (n[:, None, :] == d[None, :, :]).all(-1)
    if not bool((eq.sum(1) == 1).all()):
        raise RuntimeError("a kept head's q rows no longer match a single dense head")
    return eq.float().argmax(1).tolist()


def _index_position_bias(model: nn.Module, dense_q: Sequence[Tensor]) -> None:
    """MPNet after a peer removed heads: each pruned layer takes the position-bias rows of the heads it kept
    (models.surgery.select_position_bias, what our own keep_heads does)."""
    for b, q0 in zip(_blocks(model), dense_q):
        if b.q is not None and b.q.weight.shape[0] < q0.shape[0]:
            select_position_bias(b.attn, _kept_heads(q0, b.q.weight, b.head_size))


# --- Torch-Pruning ---------------------------------------------------------------------------------------

def prune_with_torch_pruning(model: nn.Module, calib_batches: Sequence[dict], *, ffn_sparsity: float,
                             head_sparsity: float, importance: str = "taylor", loss_fn: LossFn,
                             global_pruning: bool = True, iterative_steps: int = 1) -> dict:
    """Torch-Pruning's MetaPruner on FFN channels and whole attention heads.

    importance: "taylor" (tp.importance.TaylorImportance: |w * dL/dw| summed over a group, gradients
    accumulated over all calib_batches; recomputed before each step when iterative_steps > 1) or
    "magnitude" (tp.importance.MagnitudeImportance(p=2): no data needed, calib_batches[0] only traces).
    global_pruning=True (default): one ranking across layers, so per-layer FFN widths and per-layer head
    counts; False: the same ratio in every layer (uniform). Only FFN channels (intermediate.dense outputs,
    output.dense inputs) and whole heads (q/k/v rows and attention-output columns, tied through the traced
    attention op) are pruned; the hidden size is never touched.
    With global ranking at high sparsity Torch-Pruning may want every head (or FFN channel) of a layer; it
    then skips that layer's group entirely (check_pruning_group), so the layer stays dense and the total
    falls short of the target: read the returned widths; notes then carry a WARNING.
    """
    import torch_pruning as tp

    _check_sparsities(ffn_sparsity, head_sparsity)
    if importance not in ("taylor", "magnitude"):
        raise ValueError(f"importance must be 'taylor' or 'magnitude', got {importance!r}")
    if not calib_batches:
        raise ValueError("calib_batches is empty (Torch-Pruning needs at least one batch to trace the model)")
    t0 = time.perf_counter()
    device = _device(model)
    blocks = _blocks(model)
    backbone = base_model(model)
    mpnet = backbone.config.model_type == "mpnet"
    example = {k: v for k, v in _to(calib_batches[0], device).items() if k in ("input_ids", "attention_mask")}

    num_heads: dict[nn.Module, int] = {}
    qkv: list[nn.Module] = []
    for b in blocks:
        for lin in (b.q, b.k, b.v):
            num_heads[lin] = int(b.attn.num_attention_heads)
            qkv.append(lin)
    ffn = tuple(b.up for b in blocks)
    # Ratios by scope: FFN channels at ffn_sparsity; the q/k/v scope needs a non-zero channel ratio for its
    # groups to be visited at all, but prune_head_dims=False keeps head dims, so only head_pruning_ratio acts;
    # everything else (the hidden size) at 0.
    ratio_dict: dict = {ffn: float(ffn_sparsity)}
    if head_sparsity > 0:
        ratio_dict[tuple(qkv)] = float(head_sparsity)
    ignored = [model.dense] if isinstance(getattr(model, "dense", None), nn.Module) else []
    if getattr(backbone, "pooler", None) is not None:
        ignored.append(backbone.pooler)  # not on the classifier's path: no gradients there

    imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
    with _grad_mode(model), (_detached_position_bias(backbone.encoder) if mpnet else contextlib.nullcontext()):
        pruner = tp.pruner.MetaPruner(
            model, example, importance=imp, global_pruning=global_pruning, pruning_ratio=0.0,
            pruning_ratio_dict=ratio_dict, iterative_steps=iterative_steps, ignored_layers=ignored,
            num_heads=num_heads, prune_num_heads=head_sparsity > 0, prune_head_dims=False,
            head_pruning_ratio=float(head_sparsity))
        for _ in range(iterative_steps):
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
                for batch in calib_batches:
                    loss_fn(model, _to(batch, device)).backward()
            if mpnet:   # to read back which heads the step kept
                before = [b.q.weight.detach().clone() for b in _blocks(model)]
            pruner.step()
            _set_head_fields(model)
            if mpnet:
                _index_position_bias(model, before)
    seconds = time.perf_counter() - t0
    counted = [pruner.num_heads[b.q] for b in blocks]
    warn = ""
    if counted != heads_per_layer(model):  # a group Torch-Pruning refused (it would have emptied a layer)
        warn = f"; WARNING: Torch-Pruning counted heads {counted}, the weights have {heads_per_layer(model)}"
    notes = (f"torch-pruning {_version('torch-pruning')} MetaPruner, {importance} importance "
             f"({'global ranking: per-layer FFN widths and head counts' if global_pruning else 'uniform per layer'}), "
             f"{iterative_steps} step(s), {len(calib_batches) if importance == 'taylor' else 0} calibration batches; "
             "whole heads removed (prune_num_heads=True, prune_head_dims=False), attention_head_size kept, "
             "num_attention_heads/all_head_size set from the pruned weights; hidden size untouched"
             + ("; MPNet's shared position bias detached while tracing, each layer then reads its kept heads' rows"
                if mpnet else "") + warn)
    return _result(model, seconds, notes)


# --- TextPruner ------------------------------------------------------------------------------------------

class _LossView(nn.Module):
    """What TextPruner calls: model(**batch) -> scalar loss (the classifier does not take labels).

    `backbone` is exposed so that TransformerPruner(base_model_prefix="backbone") finds the BertModel.
    """

    def __init__(self, classifier: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.classifier = classifier
        self.backbone = classifier.backbone
        self._loss_fn = loss_fn

    def forward(self, **batch) -> Tensor:
        return self._loss_fn(self.classifier, batch)


def _prune_heads(model: nn.Module) -> Callable[[dict], None]:
    """transformers 4's BertModel.prune_heads (gone in transformers 5; MPNetModel never had one), which
    TextPruner calls once at the end with the heads to drop per layer (original ids, the model never cut
    before): done by our own keep_heads (models.surgery), MPNet's position-bias rows included."""
    def prune_heads(heads_to_prune: dict[int, Iterable[int]]) -> None:
        counts = heads_per_layer(model)
        drop = {int(i): {int(h) for h in hs} for i, hs in heads_to_prune.items()}
        keep_heads(model, [[h for h in range(n) if h not in drop.get(i, ())] for i, n in enumerate(counts)])
    return prune_heads


@contextlib.contextmanager
def _textpruner_knows(model_type: str):
    """TextPruner finds a model's projections by name patterns per model type; MPNet is not among them, so
    its names (attention.attn.{q,k,v,o}, intermediate.dense, output.dense) are registered for the call."""
    from textpruner.model_map import MODEL_MAP
    from textpruner.model_utils.bert import BertStructure

    if model_type in MODEL_MAP:
        yield
        return

    class MPNetStructure(BertStructure):
        MODEL_PREFIX = "mpnet."
        LAYER_PATTERNS = dict(query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
                              att_dense="attention.attn.o", interm_dense="intermediate.dense",
                              output_dense="output.dense")
        ATTENTION_PREFIX = ("attention.attn",)

    MODEL_MAP[model_type] = {"structure": MPNetStructure}
    try:
        yield
    finally:
        del MODEL_MAP[model_type]


def prune_with_textpruner(model: nn.Module, calib_batches: Sequence[dict], *, ffn_sparsity: float,
                          head_sparsity: float, loss_fn: LossFn, n_iters: int = 4,
                          even_masking: bool = False) -> dict:
    """TextPruner's TransformerPruner, pruning_method="iterative": FFN neurons and heads by its own importance
    scores (|sum w * dL/dw| per head on the attention output, per FFN neuron on the output projection),
    n_iters rounds each re-scoring on all calib_batches with the earlier rounds' units zeroed, then one
    physical removal.

    even_masking=False (default): ffn_even_masking=False and head_even_masking=False, one ranking across
    layers: per-layer FFN widths and head counts. True: the same width / head count in every layer.
    TextPruner takes an average per-layer target: round(d_ff * (1 - ffn_sparsity)) neurons and
    round(heads * (1 - head_sparsity)) heads, so totals are multiples of the layer count.
    """
    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig

    _check_sparsities(ffn_sparsity, head_sparsity)
    if not calib_batches:
        raise ValueError("calib_batches is empty (TextPruner scores units by gradients on them)")
    t0 = time.perf_counter()
    device = _device(model)
    backbone = base_model(model)
    d_ff, n_heads = set(ffn_widths(model)), set(heads_per_layer(model))
    if len(d_ff) != 1 or len(n_heads) != 1:
        raise ValueError("TextPruner needs an unpruned model (equal FFN widths and head counts in every layer)")
    d_ff, n_heads = d_ff.pop(), n_heads.pop()
    if backbone.config.intermediate_size != d_ff or backbone.config.num_attention_heads != n_heads:
        raise ValueError("TextPruner sizes its score tables from the config, which does not match the weights")
    target_ffn = max(1, round(d_ff * (1 - ffn_sparsity)))
    target_heads = max(1, round(n_heads * (1 - head_sparsity)))

    view = _LossView(model, loss_fn)
    had = "prune_heads" in vars(backbone)
    if not had:
        backbone.prune_heads = _prune_heads(model)
    try:
        with tempfile.TemporaryDirectory(prefix="textpruner-") as out_dir, _grad_mode(model), \
                _textpruner_knows(backbone.config.model_type):
            cfg = TransformerPruningConfig(
                target_ffn_size=target_ffn, target_num_of_heads=target_heads, pruning_method="iterative",
                n_iters=n_iters, ffn_even_masking=even_masking, head_even_masking=even_masking)
            pruner = TransformerPruner(view, transformer_pruning_config=cfg,
                                       general_config=GeneralConfig(use_device=str(device), output_dir=out_dir),
                                       base_model_prefix="backbone")
            batches = [_to(b, device) for b in calib_batches]
            pruner.prune(dataloader=batches, adaptor=None, keep_shape=False, save_model=False)
    finally:
        if not had and "prune_heads" in vars(backbone):
            del backbone.prune_heads
    _sync_linear_fields(model)
    _set_head_fields(model)
    seconds = time.perf_counter() - t0
    notes = (f"textpruner {_version('textpruner')} TransformerPruner iterative, n_iters={n_iters}, "
             f"{len(calib_batches)} calibration batches, target per layer (average) ffn {target_ffn}/{d_ff}, "
             f"heads {target_heads}/{n_heads}, "
             f"{'even masking: uniform per layer' if even_masking else 'ffn/head_even_masking=False: per-layer widths and head counts'}; "
             "model wrapped so that model(**batch) returns loss_fn(classifier, batch) (base_model_prefix=backbone); "
             "the final head removal (BertModel.prune_heads, gone in transformers 5) done by our keep_heads; "
             + ("MPNet's layer names registered with TextPruner for the call; " if backbone.config.model_type == "mpnet" else "") +
             "nn.Linear in/out_features resynced (TextPruner replaces weights only)")
    return _result(model, seconds, notes)
