import pytest
import torch

from anatomy_prune import UserError, load_model
from anatomy_prune.models.families import (family_for, ffn_sites, ffn_widths, neuron_output_vectors, readout_index,
                                           supported_model_types, usable_positions)
from anatomy_prune.models.loading import ALIASES, TINY, Loaded, max_length_for

from conftest import assert_tiny


@pytest.mark.parametrize("alias,family,kind", [("tiny-bert", "bert", "backbone"), ("tiny-gpt2", "gpt2", "causal-lm"),
                                               ("tiny-llama", "llama", "causal-lm")])
def test_tiny_aliases_build_the_asked_sizes(alias, family, kind):
    loaded = load_model(alias, device="cpu")
    assert_tiny(loaded)
    assert loaded.family.name == family and loaded.kind == kind
    assert len(ffn_sites(loaded.model)) == 3


def test_tiny_models_are_deterministic():
    a, b = load_model("tiny-gpt2", device="cpu"), load_model("tiny-gpt2", device="cpu")
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_gpt2_tokenizer_is_the_real_bpe():
    tok = load_model("tiny-gpt2", device="cpu").tokenizer
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_unknown_alias_lists_the_aliases():
    with pytest.raises(UserError) as err:
        load_model("no-such-model-xyz")
    assert all(a in str(err.value) for a in ALIASES)


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(UserError, match="not a model folder"):
        load_model(str(f))


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(UserError) as err:
        family_for("t5")
    assert "bert" in str(err.value) and "gpt2" in str(err.value) and "llama" in str(err.value)
    assert "distilbert" in supported_model_types()


def test_unsupported_folder(tmp_path):
    from safetensors.torch import save_file
    from transformers import T5Config
    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8, vocab_size=10).save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")  # weights present: the type is what fails
    with pytest.raises(UserError, match="not supported"):
        load_model(str(tmp_path))


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    from transformers import BertConfig
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
               vocab_size=10).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="safetensors only"):
        load_model(str(tmp_path))


def test_readout_index_cls_and_last_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert readout_index(family_for("bert"), mask).tolist() == [0, 0, 0]
    assert readout_index(family_for("gpt2"), mask).tolist() == [2, 4, 4]


def test_neuron_output_vectors_orientation(tiny):
    vecs = neuron_output_vectors(tiny.model, ffn_sites(tiny.model)[0])
    assert vecs.shape == (ffn_widths(tiny.model)[0], tiny.config.hidden_size)
    if tiny.family.name == "gpt2":  # Conv1D stores [in=d_ff, out=d_model]: neuron j is row j
        assert torch.equal(vecs[5], tiny.model.transformer.h[0].mlp.c_proj.weight[5])
    elif tiny.family.name == "llama":
        assert torch.equal(vecs[5], tiny.model.model.layers[0].mlp.down_proj.weight[:, 5])
    else:
        assert torch.equal(vecs[5], tiny.model.encoder.layer[0].output.dense.weight[:, 5])


def test_distilbert_family_is_supported():
    from transformers import DistilBertConfig, DistilBertModel
    m = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=21))
    assert ffn_widths(m) == [21, 21]


def test_usable_positions_reserve_the_offset_of_roberta_like_models():
    from transformers import BertConfig, GPT2Config, RobertaConfig
    assert usable_positions(BertConfig(max_position_embeddings=512)) == 512
    assert usable_positions(GPT2Config(n_positions=1024)) == 1024
    assert usable_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


def test_max_length_for_is_the_one_rule():
    loaded = load_model("tiny-bert", device="cpu")
    assert loaded.max_positions == TINY["positions"]
    assert max_length_for(loaded, 32) == 32                       # as given
    assert max_length_for(loaded) == TINY["positions"]            # fallback 256, capped at the positions
    assert max_length_for(loaded, fallback=64) == 64
    with pytest.raises(UserError, match="positions"):
        max_length_for(loaded, TINY["positions"] + 1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="max-length"):
            max_length_for(loaded, bad)
    # a saved model's recorded fine-tune length comes before the fallback, and is capped too
    tuned = Loaded(loaded.model, loaded.tokenizer, loaded.kind, "x", {"finetune": {"max_length": 48}})
    assert max_length_for(tuned) == 48 and max_length_for(tuned, 16) == 16
    assert max_length_for(Loaded(loaded.model, loaded.tokenizer, loaded.kind, "x", {"max_length": 10_000})) \
        == TINY["positions"]
