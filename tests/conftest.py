"""Shared fixtures: tiny random models of every family (sizes asserted), no network, two threads (one per
worker under `make test`'s two pytest-xdist workers, for this process and the kernels and CLIs it starts:
two workers of two threads each would oversubscribe two cores, and OpenMP threads then spin)."""
from __future__ import annotations

import os
import textwrap
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

from anatomy_prune.models.classifier import BinaryClassifier  # noqa: E402
from anatomy_prune.models.loading import TINY, Loaded, load_model  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Whatever a test sets torch's threads to (a benchmark script's --threads), the next test on this worker
    starts with the worker's own: two workers on 2 cores run one thread each, and a worker left at 2 beside the
    other's torch ran a 15-second test for 108 s."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


FAMILY_ALIASES = {"bert": "tiny-bert", "gpt2": "tiny-gpt2", "llama": "tiny-llama"}
TEXTS = ["The acting was superb and the plot gripping.", "Dull, predictable and far too long.",
         "An absolute masterpiece.", "I want those two hours back, truly awful from start to end."]


def assert_tiny(loaded: Loaded) -> None:
    """Guard against tiny settings that were silently ignored: check the built sizes."""
    from anatomy_prune.models.families import base_model, ffn_widths
    cfg = base_model(loaded.model).config
    assert cfg.hidden_size == TINY["hidden"]
    assert ffn_widths(loaded.model) == [TINY["d_ff"]] * TINY["layers"]
    assert sum(p.numel() for p in loaded.model.parameters()) < 2_500_000


@pytest.fixture(params=sorted(FAMILY_ALIASES))
def tiny(request) -> Loaded:
    """A fresh tiny model of each family (backbone for BERT, causal LM for GPT-2 and Llama)."""
    loaded = load_model(FAMILY_ALIASES[request.param], device="cpu")
    assert_tiny(loaded)
    return loaded


def make_classifier(alias: str, seed: int = 0) -> Loaded:
    base = load_model(alias, device="cpu")
    assert_tiny(base)
    torch.manual_seed(seed)
    model = BinaryClassifier(base.model).eval()
    return Loaded(model=model, tokenizer=base.tokenizer, kind="classifier", spec=alias,
                  info={"base_model": alias, "max_length": 64})


@pytest.fixture(params=sorted(FAMILY_ALIASES))
def tiny_classifier(request) -> Loaded:
    """A fresh tiny classifier (random backbone + head) of each family."""
    return make_classifier(FAMILY_ALIASES[request.param])


@pytest.fixture
def batch(tiny_classifier) -> dict:
    enc = tiny_classifier.tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture
def tiny_csv(tmp_path):
    """A small labelled CSV in the user-file format."""
    import csv
    path = tmp_path / "reviews.csv"
    rows = [(f"{t} (review {i})", i % 2) for i, t in enumerate(TEXTS * 6)]  # 24 distinct texts
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture
def text_file(tmp_path):
    """Forty lines of seeded word salad for language-model tasks (the same file as the golden recording)."""
    words = "the film was good bad long short funny dull and I liked hated every minute of its story".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (24,), generator=g).tolist()) for _ in range(40)]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- scheduling: the longest tests start first --------------------------------------------------------

# Seconds each took alone on 2 quiet cores (pytest --durations); under `make test`'s two xdist workers
# (`--dist loadgroup`: one test or xdist group at a time per worker, a group placed where its first test is)
# starting the long ones first keeps one worker from being left with them at the end. The fresh-install test
# comes after BERT's online notebooks, in their group, to reuse their fine-tune. The rest keep their order.
LONG_FIRST = [("test_notebook_runs_online_on_the_emulated_hub[GPT_finepruning]", 91),
              ("test_notebook_runs_online_on_the_emulated_hub[GPT2_pruning_strategy]", 45),
              ("test_notebook_runs_online_on_the_emulated_hub", 25),
              # 54 s, ranked just below the online notebooks so it runs after BERT's, in their group
              ("test_fresh_install_with_the_extra_runs_a_notebook_online", 24),
              ("test_ray.py", 29),
              ("test_notebook_runs_offline_in_smoke_mode", 11),
              ("test_benchmark_scripts_run_at_tiny_sizes", 14)]


def pytest_collection_modifyitems(config, items):
    def cost(item):
        return next((s for key, s in LONG_FIRST if key in item.nodeid), 0)

    items.sort(key=cost, reverse=True)  # stable: the rest keep pytest's order


# --- emulated Hugging Face Hub (tests/emulated_hub.py) -------------------------------------------

HUB_IMDB_SIZES = {"train": 17_000, "test": 8_000}  # the hub layout needs 8,000 test reviews (data.splits)


@pytest.fixture(scope="session")
def emulated_hub(tmp_path_factory):
    """The emulated hub cache (bert-base-uncased, gpt2 full size; 300 + 200 IMDB reviews), built once per run:
    pytest-xdist's workers share one build (a file lock; the first builds, the others reuse it) and the last
    worker done with it deletes it.

    Set ANATOMY_PRUNE_EMULATED_HUB to a folder to keep the cache between sessions (about 0.9 GB); it
    is rebuilt only when the build arguments change.
    """
    import importlib.util
    import shutil

    from emulated_hub import EmulatedHub
    from filelock import FileLock

    imdb = importlib.util.find_spec("datasets") is not None  # optional dependency (the "hub" extra)
    sizes = dict(imdb=imdb, imdb_train=HUB_IMDB_SIZES["train"], imdb_test=HUB_IMDB_SIZES["test"])
    keep = os.environ.get("ANATOMY_PRUNE_EMULATED_HUB")
    if keep:
        yield EmulatedHub.build(keep, **sizes)
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    root, users, lock = shared / "hf-home", shared / "hf-home-users", FileLock(str(shared / "hf-home.lock"))
    with lock:
        hub = EmulatedHub.build(root, **sizes)
        users.mkdir(exist_ok=True)
        (users / (worker or "main")).touch()
    yield hub
    with lock:  # pytest keeps its last three temp dirs; at 0.9 GB each, this one goes when no worker uses it
        (users / (worker or "main")).unlink(missing_ok=True)
        if not any(users.iterdir()):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hub_offline(emulated_hub, monkeypatch):
    """This process pointed at the emulated hub, offline: env vars set and the import-time constants of
    huggingface_hub and datasets patched (monkeypatch undoes both after the test)."""
    from emulated_hub import activate

    activate(emulated_hub.env, monkeypatch)
    return emulated_hub


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """One runs folder per mode (False: offline, True: online) shared by the notebook runs, as beside a
    checkout: the first notebook of a family fine-tunes, the others reuse its run folder (the documented
    reuse, exercised here too)."""
    return {False: tmp_path_factory.mktemp("runs-offline"), True: tmp_path_factory.mktemp("runs-online")}


# --- helpers shared by several test files --------------------------------------------------------

@contextmanager
def capture_ffn_hidden(model, reduce=None):
    """Per layer, the FFN hidden activations of every forward pass inside ([batch, pos, d_ff] each), or
    `reduce` of each (hooks.run_with_cache with a list per point)."""
    from anatomy_prune.hooks import layer_of, run_with_cache
    from anatomy_prune.models.families import ffn_sites

    store = [[] for _ in ffn_sites(model)]

    def keep(_none, x, point):
        store[layer_of(point)].append(reduce(x) if reduce else x)

    with run_with_cache(model, "ffn.*.hidden", keep):
        yield store


RELOAD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from anatomy_prune import load_model
    from anatomy_prune.models.families import ffn_widths, head_counts, query_head_counts
    out = {}
    for folder in json.loads(sys.argv[1]):
        loaded = load_model(folder, device="cpu")
        enc = loaded.tokenizer(json.loads(sys.argv[2]), padding=True, truncation=True, max_length=24,
                               return_tensors="pt")
        with torch.no_grad():
            o = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        o = o if torch.is_tensor(o) else (o.logits if hasattr(o, "logits") else o.last_hidden_state)
        out[folder] = {"heads": head_counts(loaded.model), "query_heads": query_head_counts(loaded.model),
                       "widths": ffn_widths(loaded.model), "sum": float(o.double().sum()),
                       "first": o.flatten()[:8].tolist()}
    print(json.dumps(out))
""")


def reload_in_fresh_process(folders: list[str], texts: list[str]) -> dict[str, dict]:
    """Load each saved model folder in one fresh Python process (only the package on its path) and run
    `texts` through it: per folder its head counts, query heads, FFN widths, output sum and first outputs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(folders), json.dumps(texts)],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
