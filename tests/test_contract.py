"""One contract, every supported model type (as transformers' model testers do): a tiny random model of the
type loads with the asserted sizes, its anatomy has the right shapes, a masked plan and the physically
pruned model give the same outputs (a layer may lose every neuron), a model with per-layer widths saves and
reloads in a fresh process with the same outputs, and `calibrated` prunes it with compensation that lowers
the reconstruction error.

Plus compensation on a case where it must be exact: removed neurons that duplicate kept ones are rebuilt
without error, so a compensation that does nothing fails."""
from __future__ import annotations

import pytest
import torch

from anatomy_prune.anatomy.measures import compute_anatomy
from anatomy_prune.apply.modes import masked, physical
from anatomy_prune.models.classifier import BinaryClassifier
from anatomy_prune.models.families import base_model, family_of, ffn_sites, ffn_widths, get_module, weight_out_in
from anatomy_prune.models.loading import TINY, TINY_TYPES, Loaded, load_model
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.step import prune_step
from anatomy_prune.plan.plan import PruningPlan
from anatomy_prune.scores.calibration import Calibration

from conftest import TEXTS, reload_in_fresh_process

LABELS = [1, 0, 1, 0]


def encode(loaded: Loaded, texts=TEXTS) -> dict:
    enc = loaded.tokenizer(list(texts), padding=True, truncation=True, max_length=24, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def outputs(loaded: Loaded, texts=TEXTS) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(**encode(loaded, texts))
    if torch.is_tensor(out):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def odd_plan(loaded: Loaded, seed: int = 0) -> PruningPlan:
    """A plan with different widths per layer, the first layer emptied, the last kept whole."""
    widths = ffn_widths(loaded.model)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for i, w in enumerate(widths):
        n = 0 if i == 0 else (w if i == len(widths) - 1 else w // 2 + i)
        keep.append(sorted(torch.randperm(w, generator=g)[:n].tolist()))
    return PruningPlan(keep=keep, widths=widths, method="odd")


class FamilyContract:
    model_type: str = ""

    def load(self) -> Loaded:
        return load_model(TINY_TYPES[self.model_type], device="cpu")

    def test_loads_with_the_tiny_sizes_asserted(self):
        loaded = self.load()
        cfg = base_model(loaded.model).config
        assert cfg.model_type == self.model_type
        assert ffn_widths(loaded.model) == [TINY["d_ff"]] * TINY["layers"]
        assert getattr(cfg, "hidden_size", None) == TINY["hidden"]
        assert sum(p.numel() for p in loaded.model.parameters()) < 2_500_000
        assert loaded.max_positions == TINY["positions"]

    def test_anatomy_shapes_and_last_layer(self):
        loaded = self.load()
        res = compute_anatomy(loaded, TEXTS, threshold=0.35, max_length=24, batch_size=2, progress=False)
        sim = torch.tensor(res["layer"]["similarity"])
        assert sim.shape == (len(TEXTS), TINY["layers"] + 1)
        torch.testing.assert_close(sim[:, -1], torch.ones(len(TEXTS)))
        assert [s.shape for s in res["sims"]] == [(len(TEXTS), TINY["d_ff"])] * TINY["layers"]
        assert all(-1.0 <= float(s.min()) and float(s.max()) <= 1.0 for s in res["sims"])

    def test_masked_equals_physical_with_an_emptied_layer(self):
        loaded = self.load()
        plan = odd_plan(loaded)
        dense = outputs(loaded)
        with masked(loaded.model, plan):
            expected = outputs(loaded)
        assert not torch.allclose(expected, dense)  # the plan changes the model
        physical(loaded.model, plan)
        assert ffn_widths(loaded.model) == plan.kept_widths and plan.kept_widths[0] == 0
        torch.testing.assert_close(outputs(loaded), expected, rtol=1e-5, atol=1e-5)

    def test_calibrated_prunes_and_compensates(self):
        loaded = self.load()
        if loaded.kind == "backbone":
            torch.manual_seed(0)
            loaded = Loaded(BinaryClassifier(loaded.model).eval(), loaded.tokenizer, "classifier", loaded.spec,
                            {"base_model": loaded.spec})
        calib = Calibration(loaded, TEXTS * 2, LABELS * 2 if loaded.kind == "classifier" else None,
                            max_length=24, batch_size=4)
        res = prune_step(calib, PruneRequest(method="calibrated", sparsity=0.5))
        assert res.compensation is not None
        assert res.compensation["mean_rel_err_compensated"] < res.compensation["mean_rel_err_removed"]
        assert abs(res.plan.sparsity - 0.5) < 0.02 and ffn_widths(res.loaded.model) == res.plan.kept_widths
        assert torch.isfinite(outputs(res.loaded)).all()
        assert ffn_widths(loaded.model) == [TINY["d_ff"]] * TINY["layers"]  # the input model is untouched


for _t in sorted(TINY_TYPES):
    globals()[f"TestContract_{_t.replace('-', '_')}"] = type(f"TestContract_{_t}", (FamilyContract,), {"model_type": _t})


# --- save -> reload in a fresh process, every type in one subprocess ------------------------------------

@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Save every type with per-layer widths, reload all in one fresh process; {type: (expected, got)}."""
    root = tmp_path_factory.mktemp("saved")
    expected, folders = {}, {}
    for t, alias in TINY_TYPES.items():
        loaded = load_model(alias, device="cpu")
        physical(loaded.model, odd_plan(loaded, seed=1))
        o = outputs(loaded)
        expected[t] = {"widths": ffn_widths(loaded.model), "sum": float(o.double().sum()), "first": o.flatten()[:8].tolist()}
        folders[t] = str(save_model(loaded, root / t))
    got = reload_in_fresh_process(list(folders.values()), TEXTS)
    return {t: (expected[t], got[folders[t]]) for t in TINY_TYPES}


@pytest.mark.xdist_group("contract-reloaded")  # the module fixture is built once, on one pytest-xdist worker
@pytest.mark.parametrize("model_type", sorted(TINY_TYPES))
def test_per_layer_widths_save_and_reload_in_a_fresh_process(reloaded, model_type):
    want, got = reloaded[model_type]
    assert got["widths"] == want["widths"] and len(set(want["widths"])) > 1
    assert got["sum"] == pytest.approx(want["sum"], rel=1e-5, abs=1e-4)
    torch.testing.assert_close(torch.tensor(got["first"]), torch.tensor(want["first"]), rtol=1e-5, atol=1e-5)


# --- compensation where it must be exact ------------------------------------------------------------------

@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_compensation_rebuilds_duplicated_neurons_exactly(alias):
    """Make neurons 1..k copies of neurons 1+k..2k (same input weights, so the same activations), remove
    the copies: plain removal loses their output, compensation moves it onto the originals. A no-op
    `compensate` leaves the error as large as plain removal and fails here."""
    loaded = load_model(alias, device="cpu")
    if loaded.kind == "backbone":
        torch.manual_seed(0)
        loaded = Loaded(BinaryClassifier(loaded.model).eval(), loaded.tokenizer, "classifier", alias, {})
    base = base_model(loaded.model)
    k = 12
    with torch.no_grad():
        for site in ffn_sites(loaded.model):
            for path in site.up:
                w = weight_out_in(get_module(base, path))
                w[1:1 + k] = w[1 + k:1 + 2 * k]
                b = getattr(get_module(base, path), "bias", None)
                if b is not None:
                    b[1:1 + k] = b[1 + k:1 + 2 * k]
            weight_out_in(get_module(base, site.down))[:, 1:1 + k] *= 3.0  # the copies matter
    widths = ffn_widths(loaded.model)
    recipe = {"ridge": 1e-7}  # (almost) no regularisation: the fit can be exact here
    plan = PruningPlan(keep=[[j for j in range(w) if not 1 <= j < 1 + k] for w in widths], widths=widths,
                       params=recipe)
    calib = Calibration(loaded, TEXTS * 3, LABELS * 3 if loaded.kind == "classifier" else None, max_length=24,
                        batch_size=4)
    dense = outputs(loaded)
    plain = prune_step(calib, PruneRequest(plan=plan))
    comp = prune_step(calib, PruneRequest(plan=plan, compensate=True))
    report = comp.compensation
    assert report["mean_rel_err_removed"] > 0.05
    assert report["mean_rel_err_compensated"] < 1e-3 * report["mean_rel_err_removed"]
    err_plain = (outputs(plain.loaded) - dense).abs().max()
    err_comp = (outputs(comp.loaded) - dense).abs().max()
    assert err_comp < 1e-2 * err_plain, (err_comp, err_plain)
    assert plan.params == recipe  # the plan is not changed by compensating with it
