"""HF folder loading and export: round trips through transformers / sentence-transformers, and bad folders."""

import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import safetensors.numpy
import transformers
from sentence_transformers import SentenceTransformer

from dret.errors import DretError
from dret.hf_io import load_model, open_weights, state_dict
from dret.model import Embedder
from tests.test_parity import MIN_COSINE, cosine_rows, varied_texts


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.from_pretrained(minilm_dir)


def test_export_round_trip(minilm, tmp_path):
    out = str(tmp_path / "export")
    minilm.save(out)
    texts = varied_texts()
    ours = minilm.encode(texts)
    assert np.array_equal(Embedder.from_pretrained(out).encode(texts), ours)
    st = SentenceTransformer(out, device="cpu").encode(texts)
    assert cosine_rows(ours, st).min() >= MIN_COSINE
    assert isinstance(transformers.AutoModel.from_pretrained(out), transformers.BertModel)


def test_sentence_transformers_6_folder_loads_with_its_pooling_and_length(minilm_dir, tmp_path):
    """sentence-transformers 6 saves `pooling_mode` and keeps max_seq_length as the tokenizer's model_max_length."""
    out = str(tmp_path / "st6")
    st = SentenceTransformer(minilm_dir, device="cpu")
    st.save(out)
    with open(os.path.join(out, "1_Pooling", "config.json")) as f:
        assert json.load(f).get("pooling_mode") == "mean"  # the layout this test is about
    ours = Embedder.from_pretrained(out)
    assert (ours.pooling, ours.max_length) == ("mean", 256)
    texts = varied_texts()[:16]
    assert cosine_rows(ours.encode(texts), st.encode(texts)).min() >= MIN_COSINE


def test_export_refuses_existing_folder(minilm, tmp_path):
    with pytest.raises(DretError, match="already exists"):
        minilm.save(str(tmp_path))


def test_sharded_safetensors_with_index(minilm_dir, tmp_path):
    model, _ = load_model(minilm_dir)
    tensors = state_dict(model)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    reloaded, _ = load_model(str(tmp_path))
    again = state_dict(reloaded)
    assert all(np.array_equal(again[k], tensors[k]) for k in tensors)


def one_line_error(call, *needles) -> str:
    with pytest.raises(DretError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_folder(tmp_path):
    missing = str(tmp_path / "nope")
    one_line_error(lambda: Embedder.from_pretrained(missing), missing, "does not exist")


def test_folder_without_config(tmp_path):
    one_line_error(lambda: load_model(str(tmp_path)), str(tmp_path), "no config.json")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_line_error(lambda: load_model(str(tmp_path)), "config.json", "'gpt2'", "bert, roberta, xlm-roberta, ernie")


def test_truncated_safetensors(minilm_dir, tmp_path):
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    data = open(os.path.join(minilm_dir, "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(lambda: load_model(str(tmp_path)), "model.safetensors", "not a readable safetensors file")


def test_pickle_needs_explicit_flag(m3e_dir):
    one_line_error(lambda: load_model(m3e_dir), "pytorch_model.bin", "allow_pickle=True")


def test_pickle_reader_refuses_code(tmp_path):
    """Even with allow_pickle, a .bin whose pickle names anything but tensors is refused."""
    payload = pickle.dumps(os.system)  # would resolve posix.system
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", payload)
    one_line_error(lambda: open_weights(str(tmp_path), allow_pickle=True), "pytorch_model.bin", "refusing")


def test_folder_without_weights(minilm_dir, tmp_path):
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    one_line_error(lambda: load_model(str(tmp_path)), "has no weights", "model.safetensors")


def test_missing_and_unexpected_keys_are_listed(minilm_dir, tmp_path):
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    tensors = state_dict(load_model(minilm_dir)[0])
    tensors["encoder.layer.0.extra.weight"] = np.zeros(2, np.float32)
    del tensors["encoder.layer.5.output.dense.bias"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    one_line_error(lambda: load_model(str(tmp_path)), "encoder.layer.5.output.dense.bias",
                   "encoder.layer.0.extra.weight")
