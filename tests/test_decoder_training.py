"""Decoders through training, evaluation and export: the RepLLaMA recipe on a tiny random Llama (SmolLM2's tokenizer,
built-in data), LoRA adapters merged on export, token switches, padding side, and the base model check."""

import logging

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from dret import inference, tokens
from dret.errors import DretError
from dret.eval.__main__ import main as eval_main
from dret.model import Embedder
from dret.pooling import pool, text_positions
from dret.data import TrainData
from dret.resources import bundled_smollm2, resolve_train_data
from dret.sharding import batch_sharding
from dret.train_step import embed
from dret.trainer import train_and_evaluate
from ml_configs import repllama
from tests.train_util import new_run, small_beir, tiny_config

TEXTS = ["what is a retrieval model?", "Paris is the capital of France.", "東京は日本の首都です。 🚀",
         "def f(x):\n    return x + 1\n", "x"]


@pytest.fixture(scope="module")
def repllama_run(tmp_path_factory):
    """ml_configs/repllama.py as written, tiny, with short texts and 2 micro-batches a step (test_config takes a step
    with its 32): two steps, a checkpoint after each, the export."""
    tmp = tmp_path_factory.mktemp("repllama")
    config = repllama.get_config()
    config.update(tiny=True, train_data="", output_dir=str(tmp / "run"), data_cache_dir=str(tmp / "cache"),
                  query_max_len=16, passage_max_len=32, gradient_accumulation_steps=2, max_steps=2, save_steps=1)
    export = train_and_evaluate(config)
    return config, export, tmp


def test_repllama_tiny_trains_two_steps_and_dret_eval_reads_its_checkpoint(repllama_run):
    config, export, tmp = repllama_run
    assert inference.saved_steps(config.output_dir) == [1, 2]
    common = ["--data", str(small_beir(tmp / "beir")), "--query_instruction", "query: ", "--document_instruction",
              "passage: ", "--output_folder", str(tmp / "out"), "--no_cache"]
    from_run = eval_main(["--model", config.output_dir, *common])[0]  # base + adapters, merged on load
    from_export = eval_main(["--model", export, *common])[0]
    for metric in ("ndcg_at_10", "recall_at_10"):
        assert 0 < from_run[metric] == pytest.approx(from_export[metric], abs=1e-6)


def test_export_equals_base_plus_adapters_in_dret_transformers_and_sentence_transformers(repllama_run, monkeypatch):
    config, export, _ = repllama_run
    exported = Embedder.from_pretrained(export)
    ids = exported.tokenize(["x"], 16)[0]
    assert exported.pooling == "last" and (ids[0], ids[-1]) == (exported.tokenizer.bos_token_id,
                                                                exported.tokenizer.eos_token_id)  # as trained
    v_nd = exported.encode(TEXTS, max_length=32, progress=False)

    # base + adapters, unmerged, on the training path (padded rows), with LoRA dropout off
    config_of = inference.config_of
    monkeypatch.setattr(inference, "config_of", lambda meta: _without_dropout(config_of(meta)))
    model, _, tokenizer, _, _ = inference.load_checkpoint(config.output_dir)
    assert any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model)))
    enc = tokenizer(TEXTS, padding="longest", return_tensors="np")
    mask_bt = enc["attention_mask"].astype(np.int32)
    h_btd = model(enc["input_ids"].astype(np.int32), mask_bt, positions_bt=text_positions(mask_bt))
    u_nd = np.asarray(pool(h_btd, mask_bt, "last"))
    u_nd = u_nd / np.linalg.norm(u_nd, axis=1, keepdims=True)
    assert (v_nd * u_nd).sum(1).min() >= 0.99999

    hf = transformers.AutoModel.from_pretrained(export).eval()  # the merged weights in transformers' LlamaModel
    import torch
    with torch.no_grad():
        ref_btd = hf(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(mask_bt)).last_hidden_state
    np.testing.assert_allclose(np.asarray(model(enc["input_ids"].astype(np.int32), mask_bt))[mask_bt == 1],
                               ref_btd.numpy()[mask_bt == 1], rtol=1e-3, atol=1e-4)
    from sentence_transformers import SentenceTransformer
    st_nd = SentenceTransformer(export, device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert (v_nd * st_nd).sum(1).min() >= 0.99999


def _without_dropout(config):
    config.lora_dropout = 0.0
    return config


def _place(run, batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding(run.mesh), v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def lora_llama(tmp_path_factory):
    """A tiny random Llama with LoRA (no dropout: the padding test embeds without an rng), last-token pooling and
    EOS, on the built-in data."""
    config = tiny_config(tmp_path_factory.mktemp("lora_llama"), model_name_or_path="", model_type="llama",
                         fine_tune_type="lora", lora_rank=4, lora_dropout=0.0, sentence_pooling_method="last",
                         add_eos_token=1, learning_rate=1e-2, warmup_steps=0)
    return config, new_run(config)


def test_only_lora_variables_change(lora_llama):
    _, run = lora_llama
    frozen_before = jax.tree.map(np.asarray, run.state.frozen)
    params_before = jax.tree.map(np.asarray, run.state.params)
    state = jax.tree.map(lambda x: x.copy(), run.state)  # the step donates its input: keep the fixture's
    for batch in run.data.batches(2):
        state, metrics = run.step_fn(state, _place(run, batch), run.step_config)
        assert not int(metrics["skipped"])
    trained = nnx.to_flat_state(state.params)
    assert trained and all(path[-1] in ("kernel_lora_a", "kernel_lora_b") for path, _ in trained)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), params_before, state.params)
    assert all(jax.tree.leaves(changed))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), frozen_before,
                                            state.frozen)))


def _left_padded(config, run):
    """The run's first batch again, padded on the left."""
    left = TrainData(resolve_train_data(config), run.tokenizer, global_batch_size=run.global_batch, group_size=2,
                     query_max_len=16, passage_max_len=32, padding_side="left", cache_dir=config.data_cache_dir)
    return left.batch(0, 0)


def _assert_same_vectors_either_side(config, run):
    """The training path (`train_step.embed`) on batches padded on either side (dropout off: its masks follow the
    token's place in the row)."""
    batch_right, batch_left = run.data.batch(0, 0), _left_padded(config, run)
    assert (batch_left["query_mask"][:, 0] == 0).any() and (batch_right["query_mask"][:, -1] == 0).any()
    model = nnx.merge(run.step_config.graphdef, run.state.params, run.state.frozen)
    for side in ("query", "passage"):  # the same tokens, moved to the other end of each row
        for r, l, m in zip(batch_right[f"{side}_ids"], batch_left[f"{side}_ids"], batch_right[f"{side}_mask"]):
            assert np.array_equal(r[m == 1], l[-int(m.sum()):])
        v_right, v_left = (embed(model, b[f"{side}_ids"], b[f"{side}_mask"], None, run.step_config)
                           for b in (batch_right, batch_left))
        np.testing.assert_allclose(np.asarray(v_left), np.asarray(v_right), rtol=1e-5, atol=1e-6)


def test_left_and_right_padding_give_the_same_vectors_llama(lora_llama):
    _assert_same_vectors_either_side(*lora_llama)


def test_left_and_right_padding_give_the_same_vectors_bert(tmp_path):
    config = tiny_config(tmp_path, sentence_pooling_method="last")
    _assert_same_vectors_either_side(config, new_run(config))


def test_pad_token_falls_back_to_eos_and_says_so(caplog):
    from dret.gguf_io import load_tokenizer, open_gguf

    tok = load_tokenizer(open_gguf(bundled_smollm2()))
    assert tokens.configure(tok, pad_token="unk_token", source="m").pad_token == tok.unk_token
    tok.unk_token = None  # Llama-3's tokenizers have no unk
    with caplog.at_level(logging.WARNING):
        assert tokens.configure(tok, pad_token="unk_token", source="m").pad_token == tok.eos_token
    assert "m: the tokenizer has no unk_token: padding with its eos_token" in caplog.text
    with pytest.raises(DretError, match=r"^pad_token='<pad>': expected one of unk_token, eos_token, pad_token"):
        tokens.configure(tok, pad_token="<pad>", source="m")


def test_instruction_longer_than_max_length_is_one_line(tmp_path, repllama_run):
    config = tiny_config(tmp_path, model_name_or_path="", model_type="llama",
                         query_instruction_for_retrieval="Represent this question " * 8)
    with pytest.raises(DretError, match=r"^query_instruction_for_retrieval 'Represent this question Represent this "
                                        r"q'\.\.\. is \d+ tokens with the special tokens: a max length of 16 leaves"):
        new_run(config)
    with pytest.raises(DretError, match=r"^instruction 'query: ' is 5 tokens with the special tokens: a max length "
                                        r"of 3 leaves no room"):
        Embedder.from_pretrained(repllama_run[1]).encode(["text"], instruction="query: ", max_length=3)


def _small_llama(folder, seed):
    """An HF folder of a 2-layer, 64-wide random Llama on SmolLM2's tokenizer."""
    from dret import models
    from dret.gguf_io import load_tokenizer, open_gguf
    from dret.hf_io import read_config
    from dret.models.llama import TINY

    hf = {**read_config(bundled_smollm2()), **TINY}
    Embedder(models.build(hf, rngs=nnx.Rngs(seed)), load_tokenizer(open_gguf(bundled_smollm2())), hf,
             pooling="last").save(str(folder))


def test_adapters_on_a_different_base_model_are_refused(tmp_path):
    base = tmp_path / "base"
    _small_llama(base, seed=0)
    config = tiny_config(tmp_path, tiny=False, model_name_or_path=str(base), fine_tune_type="lora", lora_rank=4,
                         sentence_pooling_method="last", max_steps=1, save_steps=1)
    train_and_evaluate(config)
    _small_llama(tmp_path / "other", seed=1)  # same shapes, other weights
    (tmp_path / "other" / "model.safetensors").replace(base / "model.safetensors")
    message = (rf"^{config.output_dir}/checkpoints/1: its lora weights were trained on a different base model than "
               rf"{base} holds now \(fingerprint [0-9a-f]{{12}}, now [0-9a-f]{{12}}\): expected the base model the run "
               "trained on$")
    with pytest.raises(DretError, match=message):
        inference.run_embedder(config.output_dir)
    config.max_steps = 2
    with pytest.raises(DretError, match=message):  # resuming on it
        train_and_evaluate(config)


def test_export_carries_its_instructions_as_prompts_and_dret_eval_uses_them(repllama_run, caplog):
    config, export, tmp = repllama_run
    from sentence_transformers import SentenceTransformer

    exported = Embedder.from_pretrained(export)
    assert exported.prompts == {"query": "query: ", "document": "passage: "}
    st = SentenceTransformer(export, device="cpu")
    ours = exported.encode(TEXTS[:2], instruction="query: ", max_length=32, progress=False)
    assert (st.encode_query(TEXTS[:2], normalize_embeddings=True) * ours).sum(1).min() >= 0.99999
    common = ["--data", str(small_beir(tmp / "beir_prompts")), "--output_folder", str(tmp / "out2"), "--no_cache"]
    with caplog.at_level(logging.WARNING):
        default = eval_main(["--model", export, *common])[0]
    assert "--query_instruction 'query: ': the model's own" in caplog.text
    explicit = eval_main(["--model", export, "--query_instruction", "query: ", "--document_instruction", "passage: ",
                          *common])[0]
    none = eval_main(["--model", export, "--query_instruction", "", "--document_instruction", "", *common])[0]
    assert (default["query_instruction"], default["document_instruction"]) == ("query: ", "passage: ")
    assert default["ndcg_at_10"] == explicit["ndcg_at_10"] and none["query_instruction"] == ""
