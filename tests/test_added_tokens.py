"""Special tokens the tokenizer lacks (bge-en-icl's `<instruct>`, `<query>`, `<response>`) get embedding rows of their
own: looked up past vocab_size, started at the mean of the base rows, trained beside the LoRA adapters while the base
table stays frozen, and merged into one table on export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from dret import build, hf_io, inference, models
from dret.errors import DretError
from dret.model import Embedder
from dret.models import added_tokens
from dret.models.llama import TINY
from dret.pooling import pool, text_positions
from dret.sharding import batch_sharding
from tests.train_util import new_run, tiny_config

NEW = ["<instruct>", "<query>", "<response>"]
TEXTS = ["<instruct>Find the passage\n<query>what is a retrieval model?\n<response>", "<query>x<response>",
         "Paris is the capital of France."]


def _hf(**extra):
    return {"model_type": "llama", "vocab_size": 128, "max_position_embeddings": 64, **TINY, **extra}


def test_new_ids_read_the_new_rows_which_start_at_the_mean_of_the_base_rows():
    model = models.build(_hf(added_tokens=3), rngs=nnx.Rngs(0))
    base_vd = np.asarray(model.embed_tokens.embedding[...])
    rows_nd = np.asarray(model.added_embeddings[...])
    assert rows_nd.shape == (3, 64)
    np.testing.assert_allclose(rows_nd, np.broadcast_to(base_vd.mean(0), (3, 64)), rtol=1e-6, atol=1e-7)
    model.added_embeddings.set_value(jnp.arange(3 * 64, dtype=jnp.float32).reshape(3, 64))
    ids_bt = jnp.array([[5, 128, 130, 127, 129]])
    x_btd = np.asarray(added_tokens.lookup(model.embed_tokens, model.added_embeddings, ids_bt))
    want = np.stack([base_vd[5], np.arange(64), np.arange(128, 192), base_vd[127], np.arange(64, 128)])
    np.testing.assert_array_equal(x_btd[0], want)
    assert models.build(_hf(), rngs=nnx.Rngs(0)).added_embeddings is None  # none asked for: the model as before
    with pytest.raises(DretError, match=r"^config\.json: added_tokens: expected an integer >= 0, got -1$"):
        models.config_of(_hf(added_tokens=-1))


def test_bert_family_models_get_the_rows_too():
    hf = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 64, "added_tokens": 2}
    model = models.build(hf, rngs=nnx.Rngs(0))
    assert added_tokens.rows_path(models.bert.VOCAB_TABLE) in dict(nnx.to_flat_state(nnx.state(model)))
    model.embeddings.added_embeddings.set_value(jnp.ones((2, 32)))
    x_btd = added_tokens.lookup(model.embeddings.word, model.embeddings.added_embeddings, jnp.array([[3, 101]]))
    np.testing.assert_array_equal(np.asarray(x_btd[0, 1]), np.ones(32))


def test_a_base_folder_loads_with_fresh_rows_for_the_added_tokens(tmp_path):
    hf = _hf()
    base = models.build(hf, rngs=nnx.Rngs(1))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    safetensors.numpy.save_file(hf_io.state_dict(base), str(tmp_path / "model.safetensors"))
    model, _ = hf_io.load_model(str(tmp_path), hf=_hf(added_tokens=2))
    base_vd = np.asarray(base.embed_tokens.embedding[...])
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]), base_vd)
    np.testing.assert_allclose(np.asarray(model.added_embeddings[...]), np.stack([base_vd.mean(0)] * 2), rtol=1e-5,
                               atol=1e-8)


def _adds_special_tokens(tokenizer_of):
    def with_new_tokens(source, config):
        tokenizer = tokenizer_of(source, config)
        tokenizer.add_special_tokens({"additional_special_tokens": NEW}, replace_extra_special_tokens=False)
        return tokenizer
    return with_new_tokens


@pytest.fixture(scope="module")
def run_with_new_tokens(tmp_path_factory):
    """A tiny LoRA Llama whose tokenizer gains NEW (as a prompt format adds them), two steps on the built-in data
    with NEW in its instructions: (run, its initial trainable state, the trained model, the export folder)."""
    tmp = tmp_path_factory.mktemp("added_tokens")
    config = tiny_config(tmp, model_name_or_path="", model_type="llama", fine_tune_type="lora", lora_rank=4,
                         lora_dropout=0.0, sentence_pooling_method="last", add_eos_token=1, learning_rate=1e-2,
                         warmup_steps=0, query_instruction_for_retrieval="<instruct>Find it\n<query>",
                         passage_instruction_for_retrieval="<response>")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "tokenizer_of", _adds_special_tokens(build.tokenizer_of))
        run = new_run(config)
    initial = jax.tree.map(np.asarray, run.state.params)
    state = jax.tree.map(lambda x: x.copy(), run.state)  # the step donates its input
    for batch in run.data.batches(2):
        state, metrics = run.step_fn(state, {k: jax.make_array_from_process_local_data(batch_sharding(run.mesh), v)
                                             for k, v in batch.items()}, run.step_config)
        assert not int(metrics["skipped"])
    trained = nnx.merge(run.step_config.graphdef, state.params, state.frozen)
    inference.embedder_of(trained, run.hf_config, run.tokenizer, config).save(str(tmp / "export"))
    return run, initial, trained, str(tmp / "export")


def test_under_lora_only_the_adapters_and_the_new_rows_train(run_with_new_tokens):
    run, initial, trained, _ = run_with_new_tokens
    v = run.hf_config["vocab_size"]
    assert run.hf_config["added_tokens"] == 3 and run.tokenizer.convert_tokens_to_ids(NEW) == [v, v + 1, v + 2]
    before = dict(nnx.to_flat_state(initial))
    assert {p[-1] for p in before} == {"kernel_lora_a", "kernel_lora_b", "added_embeddings"}
    assert ("embed_tokens", "embedding") in dict(nnx.to_flat_state(run.state.frozen))  # the base table: frozen
    after = dict(nnx.to_flat_state(nnx.state(trained, nnx.Any(nnx.LoRAParam, added_tokens.is_added))))
    assert after.keys() == before.keys()
    for path, var in before.items():
        assert not np.array_equal(np.asarray(var.get_value()), np.asarray(after[path].get_value())), path
    rows_nd = np.asarray(after[("added_embeddings",)].get_value())
    assert len({tuple(r) for r in rows_nd}) == 3  # each new token learnt its own row


def test_the_export_holds_one_grown_table_and_gives_the_trained_vectors(run_with_new_tokens):
    run, _, trained, export = run_with_new_tokens
    v, tokenizer = run.hf_config["vocab_size"], run.tokenizer
    saved = json.load(open(f"{export}/config.json"))
    assert saved["vocab_size"] == v + 3 and "added_tokens" not in saved
    exported = Embedder.from_pretrained(export)
    assert exported.backbone.embed_tokens.embedding.shape == (v + 3, 64) and exported.backbone.added_embeddings is None
    ids = exported.tokenize(TEXTS, 32)
    assert ids == tokenizer(TEXTS)["input_ids"] and v in ids[0] and v + 2 in ids[1]  # the tokenizer kept NEW
    v_nd = exported.encode(TEXTS, max_length=32, progress=False)

    enc = tokenizer(TEXTS, padding="longest", return_tensors="np")  # the trained model, rows apart, unpacked
    mask_bt = enc["attention_mask"].astype(np.int32)
    h_btd = trained(enc["input_ids"].astype(np.int32), mask_bt, positions_bt=text_positions(mask_bt))
    u_nd = np.asarray(pool(h_btd, mask_bt, "last"))
    u_nd = u_nd / np.linalg.norm(u_nd, axis=1, keepdims=True)
    assert (v_nd * u_nd).sum(1).min() >= 0.99999
