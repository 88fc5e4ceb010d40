"""Layer-wise pruning (pipeline.layerwise): one block at a time equals the all-at-once path on the dense
model's inputs, gives a valid smaller model sequentially, and works on blocks that accelerate keeps on disk;
big-model loading options (models.offload) and sharded saving."""
import copy
import random

import pytest
import torch

from anatomy_prune import UserError
from anatomy_prune.apply import physical
from anatomy_prune.apply.compensate import compensate
from anatomy_prune.cli import main
from anatomy_prune.models.families import base_model, ffn_widths
from anatomy_prune.models.loading import load_model
from anatomy_prune.models.offload import PRUNED_SUBFOLDER, parse_max_memory, parse_size
from anatomy_prune.models.saved import save_model
from anatomy_prune.pipeline.requests import PruneRequest
from anatomy_prune.pipeline.layerwise import prune_layerwise
from anatomy_prune.plan import plan_from_scores
from anatomy_prune.scores.calibrated import neuron_path_default, removal_error
from anatomy_prune.scores.calibration import Calibration, ffn_input_stats

from conftest import TEXTS, assert_tiny

WORDS = " ".join(TEXTS).replace(",", "").replace(".", "").lower().split()
SPARSITY = 0.4


def texts(n: int = 20, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def calib(loaded) -> Calibration:  # batches of 7 with padding: the mask and several batches matter
    return Calibration(loaded, texts(), max_length=24, batch_size=7)


def output(loaded, n: int = 4) -> torch.Tensor:
    enc = loaded.tokenizer(texts(n, seed=1), padding=True, truncation=True, max_length=20, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_dense_inputs_equal_the_all_at_once_path(alias):
    loaded = load_model(alias, device="cpu")
    assert_tiny(loaded)
    cal = calib(loaded)
    # all at once: one pass of the whole model, the recipe's error term, a local plan, compensation, slicing
    stats = ffn_input_stats(cal, grads=False, progress=False)
    errs = removal_error(loaded.model, stats, path=neuron_path_default(loaded.kind, heads=False))   # causal LMs: path
    plan = plan_from_scores(errs, SPARSITY)
    ref = copy.deepcopy(loaded.model)
    report = compensate(ref, plan, stats)
    physical(ref, plan)

    res = prune_layerwise(cal, PruneRequest(method="calibrated", sparsity=SPARSITY, layerwise="dense"), keep_grams=True, progress=False)
    lw = res.compensation["stats"]
    assert lw.n_tokens == stats.n_tokens and lw.n_examples == stats.n_examples == 20
    assert all(torch.equal(a, b) for a, b in zip(lw.gram, stats.gram))           # the same Gram matrices
    for a, b in zip(res.scores.values, errs):
        assert torch.equal(a, b)                                                  # one error term, one code path
    assert res.plan.keep == plan.keep and res.plan.widths == plan.widths       # the same plan
    assert ffn_widths(res.loaded.model) == plan.kept_widths != ffn_widths(loaded.model)
    got, want = res.loaded.model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    for mine, theirs in zip(res.compensation["blocks"], report["layers"]):
        assert mine["rel_err_compensated"] == pytest.approx(theirs["rel_err_compensated"], rel=1e-6)
        assert mine["rel_err_removed"] == pytest.approx(theirs["rel_err_removed"], rel=1e-6)
    torch.testing.assert_close(output(res.loaded), output(type(loaded)(ref, loaded.tokenizer, loaded.kind, alias)))
    assert ffn_widths(loaded.model) == [37, 37, 37]  # a copy was pruned


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_sequential_gives_a_valid_smaller_model_and_reports_each_block(alias):
    loaded = load_model(alias, device="cpu")
    cal = calib(loaded)
    dense = prune_layerwise(cal, PruneRequest(method="calibrated", sparsity=SPARSITY, layerwise="dense"), keep_grams=True, progress=False)
    res = prune_layerwise(cal, PruneRequest(method="calibrated", sparsity=SPARSITY, layerwise="sequential"), keep_grams=True, progress=False)
    assert ffn_widths(res.loaded.model) == [37 - round(SPARSITY * 37)] * 3
    assert base_model(res.loaded.model).config.anatomy_prune_ffn_widths == [22, 22, 22]
    out = output(res.loaded)
    assert torch.isfinite(out).all() and not torch.allclose(out, output(loaded))
    g_seq, g_dense = res.compensation["stats"].gram, dense.compensation["stats"].gram
    assert torch.equal(g_seq[0], g_dense[0])                       # block 0 sees the embeddings either way
    assert not torch.equal(g_seq[1], g_dense[1])                   # later blocks see the pruned blocks' outputs
    blocks = res.compensation["blocks"]
    assert [b["layer"] for b in blocks] == [0, 1, 2] and res.compensation["layerwise"] == "sequential"
    for b in blocks:
        assert 0 <= b["rel_err_compensated"] <= b["rel_err_removed"] + 1e-12 and b["rel_err_removed"] > 0
        assert 0 < b["block_rel_err"] < 1 and b["seconds"] > 0 and b["removed"] == 15
    assert res.plan.params["layerwise"] == "sequential" and res.plan.method == "calibrated"
    assert res.prune_s > 0


def test_blocks_offloaded_to_disk_are_pruned_and_saved_in_shards(tmp_path):
    src = load_model("tiny-llama", device="cpu")
    src.model.save_pretrained(tmp_path / "dense")
    src.tokenizer.save_pretrained(tmp_path / "dense")
    ref = prune_layerwise(calib(src), PruneRequest(method="calibrated", sparsity=SPARSITY, layerwise="sequential"), progress=False)
    sizes = [sum(p.numel() * 4 for p in m.parameters()) for m in (src.model.model.embed_tokens, src.model.model.layers[0])]
    budget = sizes[0] + 2 * sizes[1]  # the embeddings (tied to the LM head) and about one block fit in "CPU memory"
    big = load_model(str(tmp_path / "dense"), device_map="auto", max_memory=f"cpu:{budget}",
                     offload_folder=str(tmp_path / "offload"))
    placed = big.model.hf_device_map
    assert placed["model.layers.0"] == "cpu" and placed["model.layers.1"] == placed["model.layers.2"] == "disk"
    layers = base_model(big.model).layers
    assert layers[1].mlp.down_proj.weight.device.type == "meta" and big.device.type == "cpu"
    with pytest.raises(UserError, match="in place"):
        prune_layerwise(calib(big), PruneRequest(method="calibrated", sparsity=SPARSITY, layerwise="sequential"), progress=False)
    res = prune_layerwise(calib(big), PruneRequest(method="calibrated", sparsity=SPARSITY, layerwise="sequential"), inplace=True, progress=False)
    assert res.compensation["dispatched"] and res.loaded is big
    assert res.plan.keep == ref.plan.keep
    assert layers[1].mlp.down_proj.weight.device.type == "meta"         # back on disk, pruned
    assert layers[1].mlp.down_proj.weight.shape == (32, 22) and layers[0].mlp.down_proj.weight.shape == (32, 22)
    assert sorted(p.name for p in (tmp_path / "offload" / PRUNED_SUBFOLDER).iterdir()) == \
        ["layers.1.safetensors", "layers.2.safetensors"]
    torch.testing.assert_close(output(big), output(ref.loaded))
    save_model(big, tmp_path / "pruned", plan=res.plan.to_dict(), max_shard_size=200_000)
    shards = sorted(p.name for p in (tmp_path / "pruned").glob("model*.safetensors"))
    assert len(shards) >= 2 and shards[0].startswith("model-00001-of-")
    again = load_model(str(tmp_path / "pruned"), device="cpu")
    assert ffn_widths(again.model) == [22, 22, 22]
    torch.testing.assert_close(output(again), output(ref.loaded))


def test_memory_budgets_are_parsed_and_checked_before_loading(tmp_path):
    assert parse_max_memory("0:14GiB,cpu:30GiB") == {0: 14 * 2**30, "cpu": 30 * 2**30}
    assert parse_max_memory("cuda:1:1.5GB") == {1: 1_500_000_000}
    assert parse_size("500MB") == 500_000_000 and parse_size("2048") == 2048
    for bad in ("gpu:1GB", "cpu:lots", "cpu:0", "", "cpu:1GB,cpu:2GB"):
        with pytest.raises(UserError):
            parse_max_memory(bad)
    tiny = load_model("tiny-llama", device="cpu")
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    block = sum(p.numel() * 4 for p in tiny.model.model.layers[0].parameters())
    with pytest.raises(UserError, match=f"needs {block / 1024:.2f}KiB there for one block") as err:
        load_model(str(tmp_path / "m"), device_map="auto", max_memory=f"cpu:{block - 1}")
    assert "\n" not in str(err.value)
    gram = (37 + 1) ** 2 * 8
    with pytest.raises(UserError, match=f"{(block + gram) / 1024:.2f}KiB .* Gram"):
        load_model(str(tmp_path / "m"), device_map="auto", max_memory=f"cpu:{block + 1}", layerwise=True)
    with pytest.raises(UserError, match="--device-map"):
        load_model("tiny-llama", max_memory="cpu:1GB")
    half = load_model(str(tmp_path / "m"), device="cpu", weights_dtype="bfloat16")
    assert half.model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_cli_refuses_bad_layerwise_requests_in_one_line(tmp_path, capsys):
    base = ["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--out", str(tmp_path / "o"), "--layerwise"]
    for extra, words in ((["--method", "calibrated"], "--mode physical"),
                         (["--method", "magnitude", "--mode", "physical"], "--method calibrated"),
                         (["--method", "calibrated", "--mode", "physical", "--max-memory", "cpu:1GB"], "--device-map"),
                         (["--method", "calibrated", "--mode", "physical", "--device-map", "auto",
                           "--max-memory", "cpu:9zB"], "not a size")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_pages_of_a_mapped_checkpoint_are_released_without_changing_values(tmp_path):
    from anatomy_prune.models.offload import release_mapped_pages
    tiny = load_model("tiny-llama", device="cpu")
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    mapped = load_model(str(tmp_path / "m"), device="cpu")          # float32 file, float32 weights: views of the file
    w = mapped.model.model.embed_tokens.weight                       # 50257 x 32 floats: whole pages inside
    before = w.detach().clone()
    assert release_mapped_pages([w]) >= w.nbytes - 2 * 4096
    assert torch.equal(w, before)                                    # read again from the file
    assert release_mapped_pages([before]) == 0                       # ordinary memory is never touched
