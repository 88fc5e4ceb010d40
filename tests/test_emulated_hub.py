"""The emulated Hugging Face Hub (tests/emulated_hub.py): real hub ids load offline, unchanged, with the
real sizes, the real tokenizers and real IMDB reviews; unknown ids fail at once."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import HUB_IMDB_SIZES

needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="needs the 'datasets' package (pip install datasets==5.2.0)")
BERT_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")
GPT2_IDS = ("gpt2", "openai-community/gpt2")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test at once."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- layout ---------------------------------------------------------------------------------------

def test_cache_layout_is_huggingface_hubs(hub_offline):
    import huggingface_hub
    from huggingface_hub import try_to_load_from_cache

    hub = hub_offline.root / "hub"
    with_imdb = hub_offline.imdb_sizes is not None
    for folder in ("models--bert-base-uncased", "models--google-bert--bert-base-uncased", "models--gpt2",
                   "models--openai-community--gpt2", *["datasets--stanfordnlp--imdb"] * with_imdb):
        commit = (hub / folder / "refs" / "main").read_text()
        assert re.fullmatch(r"[0-9a-f]{40}", commit), folder  # no newline: huggingface_hub reads it verbatim
        for f in (hub / folder / "snapshots" / commit).rglob("*"):
            if f.is_symlink():  # snapshots point into the repo's own blobs, relatively
                assert f.resolve().parent == (hub / folder / "blobs").resolve()
                assert not os.path.isabs(os.readlink(f))
    from emulated_hub import _git_blob_id, _sha256_file

    weights = Path(try_to_load_from_cache("gpt2", "model.safetensors"))
    assert weights.resolve().name == _sha256_file(weights)  # an LFS file's blob is named by its sha256
    config = Path(try_to_load_from_cache("gpt2", "config.json"))
    assert config.resolve().name == _git_blob_id(config.read_bytes())  # a plain file's by its git blob id
    # huggingface_hub's own cache scanner understands every repo and finds nothing odd.
    info = huggingface_hub.scan_cache_dir(hub)
    assert not info.warnings
    assert {r.repo_id for r in info.repos} >= {*BERT_IDS, *GPT2_IDS, *["stanfordnlp/imdb"] * with_imdb}
    assert not [p for p in hub_offline.root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


# --- models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id", BERT_IDS)
def test_bert_config_is_the_real_one(hub_offline, repo_id):
    from transformers import AutoConfig

    from emulated_hub import BERT_CONFIG

    cfg = AutoConfig.from_pretrained(repo_id)
    assert cfg.model_type == "bert" and cfg.architectures == ["BertForMaskedLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (12, 768, 12, 3072)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size) == (30522, 512, 2)
    assert cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-12
    assert json.loads(Path(_snapshot_file(repo_id, "config.json")).read_text()) == BERT_CONFIG  # as on the hub


@pytest.mark.parametrize("repo_id", GPT2_IDS)
def test_gpt2_config_is_the_real_one(hub_offline, repo_id):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(repo_id)
    assert cfg.model_type == "gpt2" and cfg.architectures == ["GPT2LMHeadModel"]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (12, 768, 12, 1024, 50257)
    assert cfg.n_inner is None and cfg.activation_function == "gelu_new"  # d_ff = 4 * 768
    assert cfg.bos_token_id == cfg.eos_token_id == 50256


def _snapshot_file(repo_id: str, filename: str) -> str:
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(repo_id, filename)
    assert isinstance(path, str), f"{repo_id}/{filename} not in the cache"
    return path


def test_bert_loads_without_new_weights_and_runs(hub_offline):
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained("bert-base-uncased", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]  # nothing newly initialised, pooler included
    assert {k.split(".")[0] for k in info["unexpected_keys"]} <= {"cls"}  # the MLM / NSP heads, as for the real one
    ffn = [layer.intermediate.dense.out_features for layer in model.encoder.layer]
    assert ffn == [3072] * 12
    with safe_open(_snapshot_file("bert-base-uncased", "model.safetensors"), "pt") as f:  # loaded, not re-drawn
        assert torch.equal(model.encoder.layer[5].output.dense.weight, f.get_tensor("bert.encoder.layer.5.output.dense.weight"))
    tok = AutoTokenizer.from_pretrained("bert-base-uncased")
    with torch.no_grad():
        out = model(**tok(["Hello World", "A longer second sentence."], padding=True, return_tensors="pt"))
    assert out.last_hidden_state.shape[::2] == (2, 768) and torch.isfinite(out.last_hidden_state).all()


def test_gpt2_loads_as_causal_lm_and_runs(hub_offline):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained("openai-community/gpt2", output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched keys
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied, as the real one
    assert [b.mlp.c_fc.nf for b in model.transformer.h] == [3072] * 12
    with torch.no_grad():
        logits = model(torch.tensor([[15496, 995]])).logits
    assert logits.shape == (1, 2, 50257) and torch.isfinite(logits).all()


def test_the_toolkit_loads_hub_ids(hub_offline):
    """anatomy_prune's own loader, given hub ids, finds the emulated repositories."""
    from anatomy_prune.models.families import ffn_widths
    from anatomy_prune.models import load_model

    gpt2 = load_model("gpt2", device="cpu")
    assert gpt2.kind == "causal-lm" and ffn_widths(gpt2.model) == [3072] * 12 and gpt2.max_positions == 1024
    del gpt2
    bert = load_model("google-bert/bert-base-uncased", device="cpu")
    assert bert.kind == "backbone" and ffn_widths(bert.model) == [3072] * 12 and bert.max_positions == 512


# --- tokenizers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id", BERT_IDS)
def test_bert_tokenizer_is_minilms_wordpiece(hub_offline, repo_id):
    from transformers import AutoTokenizer

    from anatomy_prune.resources import minilm_dir

    tok = AutoTokenizer.from_pretrained(repo_id)
    minilm = AutoTokenizer.from_pretrained(str(minilm_dir()))
    assert tok.tokenize("Hello World") == ["hello", "world"]
    assert tok("Hello World")["input_ids"] == minilm("Hello World")["input_ids"] == [101, 7592, 2088, 102]
    text = "Café prices, UNBELIEVABLY, rose 12% in 2019 - didn't they?"
    assert tok(text)["input_ids"] == minilm(text)["input_ids"]
    assert len(tok) == 30522 and tok.model_max_length == 512 and tok.pad_token_id == 0


@pytest.mark.parametrize("repo_id", GPT2_IDS)
def test_gpt2_tokenizer_is_the_real_bpe(hub_offline, repo_id):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(repo_id)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    text = "The quick brown fox jumps over the lazy dog, twice!"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.model_max_length == 1024


# --- IMDB -----------------------------------------------------------------------------------------

@needs_datasets
@pytest.mark.parametrize("dataset_id", ["stanfordnlp/imdb", "imdb"])
def test_imdb_loads_offline_with_the_asked_sizes(hub_offline, dataset_id):
    from datasets import ClassLabel, DatasetDict, Value, load_dataset

    from anatomy_prune.data import clean, read_imdb_offline

    ds = load_dataset(dataset_id)
    assert isinstance(ds, DatasetDict) and set(ds) == {"train", "test"}
    assert {s: len(ds[s]) for s in ds} == HUB_IMDB_SIZES
    feats = ds["train"].features
    assert feats["text"] == Value("string") and isinstance(feats["label"], ClassLabel)
    assert feats["label"].names == ["neg", "pos"]
    real = dict(zip(read_imdb_offline().texts, read_imdb_offline().labels))  # cleaned text -> label
    seen = set()
    for split in ("train", "test"):
        texts, labels = ds[split]["text"], ds[split]["label"]
        assert set(labels) == {0, 1} and abs(sum(labels) - len(labels) / 2) <= 1  # binary, balanced
        assert all(real[clean(t)] == y for t, y in zip(texts, labels))  # real reviews, real labels
        assert labels == sorted(labels)  # the hub's order: negatives first
        seen_before = len(seen)
        seen |= set(texts)
        # IMDB itself repeats some reviews (98 of the 25,000); the emulation keeps them, as the hub does
        assert len(seen) >= seen_before + len(texts) - 100
    assert load_dataset(dataset_id, split="test")[0]["text"] == ds["test"][0]["text"]


def test_imdb_splits_are_deterministic_and_seeded():
    from emulated_hub import imdb_split_indices

    labels = [0] * 50 + [1] * 50
    a, b = imdb_split_indices(labels, 20, 10, seed=0), imdb_split_indices(labels, 20, 10, seed=0)
    assert a == b and a != imdb_split_indices(labels, 20, 10, seed=1)
    assert not set(a["train"]) & set(a["test"]) and len(a["train"]) == 20 and len(a["test"]) == 10
    with pytest.raises(ValueError, match="too many"):
        imdb_split_indices(labels, 90, 20, seed=0)


# --- failures -------------------------------------------------------------------------------------

def test_unknown_model_fails_fast_without_network(hub_offline, no_network):
    from transformers import AutoConfig, AutoModel

    for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        t0 = time.perf_counter()
        with pytest.raises(OSError):
            load("no-such-org/no-such-model")
        assert time.perf_counter() - t0 < 2.0


@needs_datasets
def test_unknown_dataset_fails_fast_without_network(hub_offline, no_network):
    from datasets import load_dataset

    t0 = time.perf_counter()
    with pytest.raises((ConnectionError, FileNotFoundError)):
        load_dataset("no-such-org/no-such-dataset")
    assert time.perf_counter() - t0 < 2.0


@needs_datasets
def test_known_ids_need_no_network(hub_offline, no_network):
    from datasets import load_dataset
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained("gpt2").n_layer == 12
    assert AutoTokenizer.from_pretrained("bert-base-uncased")("hi")["input_ids"] == [101, 7632, 102]
    assert len(load_dataset("stanfordnlp/imdb", split="train")) == HUB_IMDB_SIZES["train"]


@needs_datasets
def test_activate_is_undone(emulated_hub):
    """The constants patched for one test are restored after it, env included."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    from emulated_hub import activate

    def state():
        return hc.HF_HUB_CACHE, hc.HF_HUB_OFFLINE, dc.HF_DATASETS_CACHE, dc.HF_HUB_OFFLINE, os.environ.get("HF_HOME")

    before = state()
    with pytest.MonkeyPatch.context() as mp:
        activate(emulated_hub.env, mp)
        assert state() == (emulated_hub.env["HF_HUB_CACHE"], True, Path(emulated_hub.env["HF_DATASETS_CACHE"]), True,
                           emulated_hub.env["HF_HOME"])
    assert state() == before


def test_build_refuses_a_foreign_folder(tmp_path):
    from emulated_hub import build_hub_cache

    (tmp_path / "hub").mkdir()  # e.g. somebody's real HF_HOME
    with pytest.raises(FileExistsError):
        build_hub_cache(tmp_path, models=(), imdb=False)


def test_random_weights_are_seeded_and_named_like_the_checkpoint():
    from emulated_hub import random_state_dict

    small = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 8}
    a = random_state_dict("GPT2LMHeadModel", small, seed=3)
    b = random_state_dict("GPT2LMHeadModel", small, seed=3)
    c = random_state_dict("GPT2LMHeadModel", small, seed=4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], c["transformer.h.0.mlp.c_fc.weight"])
    assert "lm_head.weight" not in a  # tied to transformer.wte.weight, left out as save_pretrained does
    assert a["transformer.h.1.mlp.c_fc.weight"].shape == (16, 64)
    assert abs(a["transformer.ln_f.weight"].mean().item() - 1) < 0.1  # norms near one, not zero


# --- a fresh process: env vars only, set before any import ------------------------------------------

@needs_datasets
def test_fresh_process_with_env_vars_only(emulated_hub, tmp_path):
    """What a user's script sees after `export`ing the printed env: no patching, real ids, unchanged code."""
    script = textwrap.dedent("""
        from datasets import load_dataset
        from transformers import AutoConfig, AutoTokenizer
        cfg = AutoConfig.from_pretrained("bert-base-uncased")
        tok = AutoTokenizer.from_pretrained("openai-community/gpt2")
        ds = load_dataset("stanfordnlp/imdb")
        print(cfg.num_hidden_layers, cfg.intermediate_size, tok("Hello world")["input_ids"],
              len(ds["train"]), len(ds["test"]), ds["train"].features["label"].names)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(emulated_hub.env)
    env["XDG_CACHE_HOME"] = str(tmp_path)  # anything not under HF_HOME would show up here
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == (f"12 3072 [15496, 995] {HUB_IMDB_SIZES['train']} {HUB_IMDB_SIZES['test']} "
                                         "['neg', 'pos']")
    assert not any(tmp_path.iterdir())  # nothing wrote outside the emulated HF_HOME


@needs_datasets
def test_cli_prints_exports(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    cli = Path(__file__).with_name("emulated_hub.py")
    out = subprocess.run([sys.executable, str(cli), "--out", str(tmp_path / "hf"), "--models",
                          "--imdb-train", "6", "--imdb-test", "4"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    exports = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines())
    assert exports["HF_HOME"] == str((tmp_path / "hf").resolve()) and exports["HF_HUB_OFFLINE"] == "1"
    assert exports["HF_DATASETS_CACHE"] == str((tmp_path / "hf" / "datasets").resolve())
    marker = json.loads((tmp_path / "hf" / ".emulated_hub.json").read_text())
    assert marker["complete"] and marker["imdb_sizes"] == {"train": 6, "test": 4}
