"""Peers side by side (issue 16, part 6): prune our BinaryClassifier with Torch-Pruning and with TextPruner.

Both functions prune the model IN PLACE and physically (smaller nn.Linear weights), on BERT-like backbones
(BertModel and the same layout: encoder.layer[i].attention.self.{query,key,value}, attention.output.dense,
intermediate.dense, output.dense), and return

    {"seconds": wall time of the whole call (importance passes included),
     "ffn_widths": [FFN width per layer], "heads_per_layer": [attention heads per layer],
     "params": parameters of the whole classifier after pruning, "notes": "what the peer did"}

    prune_with_torch_pruning(model, calib_batches, ffn_sparsity=0.5, head_sparsity=0.25, importance="taylor",
                             loss_fn=loss_fn)
    prune_with_textpruner(model, calib_batches, ffn_sparsity=0.5, head_sparsity=0.25, loss_fn=loss_fn)

`model` is anatomy_prune.classifier.BinaryClassifier (.backbone a transformers BertModel, .dense the head);
`calib_batches` a list of {"input_ids", "attention_mask", "labels"}; `loss_fn(model, batch)` a scalar loss.
The peers are used as libraries (pip: torch-pruning==1.6.1, textpruner==1.1.post2 installed --no-deps:
its metadata wrongly pins numpy<1.22 on Python >= 3.10); only the glue that transformers 5 no longer has
(BertModel.prune_heads, which TextPruner calls) is written here.

After pruning, every attention module is consistent: num_attention_heads = heads kept, all_head_size =
query.out_features, attention_head_size unchanged (whole heads are removed, never head dimensions); the
nn.Linear in_features / out_features fields match their weights. The backbone config still says the dense
sizes (intermediate_size, num_attention_heads), as with our own physical pruning of per-layer widths.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import types
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, dict], Tensor]


# --- the BERT-like layout both peers work on -------------------------------------------------------------

def _layers(model: nn.Module) -> list[nn.Module]:
    backbone = getattr(model, "backbone", model)
    try:
        layers = list(backbone.encoder.layer)
        for layer in layers:
            layer.attention.self.query, layer.attention.output.dense
            layer.intermediate.dense, layer.output.dense
    except AttributeError as e:
        raise ValueError(f"peer adapters need a BERT-like backbone (encoder.layer[i].attention.self.query ...), "
                         f"got {type(backbone).__name__}: {e}") from None
    return layers


def ffn_widths(model: nn.Module) -> list[int]:
    return [int(layer.intermediate.dense.weight.shape[0]) for layer in _layers(model)]


def heads_per_layer(model: nn.Module) -> list[int]:
    out = []
    for layer in _layers(model):
        att = layer.attention.self
        out.append(int(att.query.weight.shape[0]) // int(att.attention_head_size))
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sync_linear_fields(model: nn.Module) -> None:
    """nn.Linear in/out_features from the weights (TextPruner swaps weights without updating them)."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = (int(d) for d in mod.weight.shape)


def check_consistent(model: nn.Module) -> None:
    """Raise AssertionError unless shapes and the attention fields agree in every layer."""
    for i, layer in enumerate(_layers(model)):
        att = layer.attention.self
        width = att.query.weight.shape[0]
        assert att.key.weight.shape[0] == width and att.value.weight.shape[0] == width, f"layer {i}: q/k/v differ"
        assert layer.attention.output.dense.weight.shape[1] == width, f"layer {i}: attention output != q/k/v"
        assert width % att.attention_head_size == 0, f"layer {i}: {width} not a multiple of the head size"
        assert att.num_attention_heads == width // att.attention_head_size, f"layer {i}: num_attention_heads"
        assert att.all_head_size == width, f"layer {i}: all_head_size"
        assert layer.intermediate.dense.weight.shape[0] == layer.output.dense.weight.shape[1], f"layer {i}: FFN"
        for lin in (att.query, att.key, att.value, layer.attention.output.dense,
                    layer.intermediate.dense, layer.output.dense):
            assert (lin.out_features, lin.in_features) == tuple(lin.weight.shape), f"layer {i}: Linear fields"


def _set_head_fields(model: nn.Module, heads: Sequence[int]) -> None:
    for layer, h in zip(_layers(model), heads):
        att = layer.attention.self
        att.num_attention_heads = int(h)
        att.all_head_size = int(att.query.weight.shape[0])


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
    layers = _layers(model)
    backbone = model.backbone
    example = {k: v for k, v in _to(calib_batches[0], device).items() if k in ("input_ids", "attention_mask")}

    num_heads: dict[nn.Module, int] = {}
    qkv: list[nn.Module] = []
    for layer in layers:
        att = layer.attention.self
        for lin in (att.query, att.key, att.value):
            num_heads[lin] = int(att.num_attention_heads)
            qkv.append(lin)
    ffn = tuple(layer.intermediate.dense for layer in layers)
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
    with _grad_mode(model):
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
            pruner.step()
            _set_head_fields(model, heads_per_layer(model))  # from the weights; attention_head_size is kept
    seconds = time.perf_counter() - t0
    counted = [pruner.num_heads[layer.attention.self.query] for layer in layers]
    warn = ""
    if counted != heads_per_layer(model):  # a group Torch-Pruning refused (it would have emptied a layer)
        warn = f"; WARNING: Torch-Pruning counted heads {counted}, the weights have {heads_per_layer(model)}"
    notes = (f"torch-pruning {_version('torch-pruning')} MetaPruner, {importance} importance "
             f"({'global ranking: per-layer FFN widths and head counts' if global_pruning else 'uniform per layer'}), "
             f"{iterative_steps} step(s), {len(calib_batches) if importance == 'taylor' else 0} calibration batches; "
             "whole heads removed (prune_num_heads=True, prune_head_dims=False), attention_head_size kept, "
             "num_attention_heads/all_head_size set from the pruned weights; hidden size untouched" + warn)
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


def _prune_heads_shim(backbone: nn.Module, heads_to_prune: dict[int, Iterable[int]]) -> None:
    """transformers 4's BertModel.prune_heads, removed in transformers 5, which TextPruner calls.

    Drops whole heads (original indices, a model never head-pruned before) from q/k/v rows and the
    attention-output columns, and updates num_attention_heads / all_head_size.
    """
    from transformers.pytorch_utils import prune_linear_layer

    for i, heads in heads_to_prune.items():
        heads = sorted(set(int(h) for h in heads))
        if not heads:
            continue
        layer = backbone.encoder.layer[int(i)]
        att, out = layer.attention.self, layer.attention.output
        size = int(att.attention_head_size)
        n = int(att.query.weight.shape[0]) // size
        keep = torch.tensor([h * size + j for h in range(n) if h not in heads for j in range(size)],
                            dtype=torch.long, device=att.query.weight.device)
        att.query = prune_linear_layer(att.query, keep)
        att.key = prune_linear_layer(att.key, keep)
        att.value = prune_linear_layer(att.value, keep)
        out.dense = prune_linear_layer(out.dense, keep, dim=1)
        att.num_attention_heads = n - len(heads)
        att.all_head_size = att.num_attention_heads * size


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
    backbone = model.backbone
    layers = _layers(model)
    d_ff = {int(layer.intermediate.dense.weight.shape[0]) for layer in layers}
    n_heads = set(heads_per_layer(model))
    if len(d_ff) != 1 or len(n_heads) != 1:
        raise ValueError("TextPruner needs an unpruned model (equal FFN widths and head counts in every layer)")
    d_ff, n_heads = d_ff.pop(), n_heads.pop()
    if backbone.config.intermediate_size != d_ff or backbone.config.num_attention_heads != n_heads:
        raise ValueError("TextPruner sizes its score tables from the config, which does not match the weights")
    target_ffn = max(1, round(d_ff * (1 - ffn_sparsity)))
    target_heads = max(1, round(n_heads * (1 - head_sparsity)))

    view = _LossView(model, loss_fn)
    had_shim = "prune_heads" in vars(backbone)
    if not hasattr(backbone, "prune_heads"):
        backbone.prune_heads = types.MethodType(_prune_heads_shim, backbone)
    try:
        with tempfile.TemporaryDirectory(prefix="textpruner-") as out_dir, _grad_mode(model):
            cfg = TransformerPruningConfig(
                target_ffn_size=target_ffn, target_num_of_heads=target_heads, pruning_method="iterative",
                n_iters=n_iters, ffn_even_masking=even_masking, head_even_masking=even_masking)
            pruner = TransformerPruner(view, transformer_pruning_config=cfg,
                                       general_config=GeneralConfig(use_device=str(device), output_dir=out_dir),
                                       base_model_prefix="backbone")
            batches = [_to(b, device) for b in calib_batches]
            pruner.prune(dataloader=batches, adaptor=None, keep_shape=False, save_model=False)
    finally:
        if not had_shim and "prune_heads" in vars(backbone):
            del backbone.prune_heads
    _sync_linear_fields(model)
    _set_head_fields(model, heads_per_layer(model))
    seconds = time.perf_counter() - t0
    notes = (f"textpruner {_version('textpruner')} TransformerPruner iterative, n_iters={n_iters}, "
             f"{len(calib_batches)} calibration batches, target per layer (average) ffn {target_ffn}/{d_ff}, "
             f"heads {target_heads}/{n_heads}, "
             f"{'even masking: uniform per layer' if even_masking else 'ffn/head_even_masking=False: per-layer widths and head counts'}; "
             "model wrapped so that model(**batch) returns loss_fn(classifier, batch) (base_model_prefix=backbone); "
             "BertModel.prune_heads (gone in transformers 5) supplied by a shim for the call; "
             "nn.Linear in/out_features resynced (TextPruner replaces weights only)")
    return _result(model, seconds, notes)
