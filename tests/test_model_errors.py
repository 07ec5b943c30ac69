"""Bad model folders end in one-line DretErrors that name the file: out-of-bounds .bin tensors, missing tokenizers,
broken JSON, invalid configs, non-finite weights, shard paths outside the folder; and saving leaves no temp folder."""

import json
import os
import shutil
import struct
import zipfile

import numpy as np
import pytest
import safetensors.numpy

from dret import models
from dret.errors import DretError
from dret.eval import model_dir
from dret.hf_io import load_model, open_weights, state_dict
from dret.model import Embedder
from dret.models import bert
from dret.models.bert import BertConfig
from dret.torch_pickle import load_torch_state_dict
from tests.test_hf_io import one_line_error

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


# --- issue 12 item 1: a pytorch_model.bin written opcode by opcode, so size, stride and offset can be anything ----

def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def write_bin(folder, storage: np.ndarray, offset: int, size: tuple, stride: tuple, key: str = "encoder.w") -> str:
    """A zip-format torch checkpoint {key: float32 tensor} viewing `storage` at offset/size/stride, as torch.save
    writes it (persistent storage id, torch._utils._rebuild_tensor_v2)."""
    ordered_dict = b"ccollections\nOrderedDict\n)R"
    storage_id = _tuple([_str("storage"), b"ctorch\nFloatStorage\n", _str("0"), _str("cpu"), _int(storage.size)])
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n"
              + _tuple([storage_id + b"Q", _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)),
                        b"\x89", ordered_dict]) + b"R")
    pickle_bytes = b"\x80\x02" + ordered_dict + _str(key) + tensor + b"s."
    path = os.path.join(folder, "pytorch_model.bin")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", storage.astype(np.float32).tobytes())
    return path


def read_all(folder) -> dict[str, np.ndarray]:
    """Every tensor of a model folder, each checked as `load_model` checks the ones it places."""
    weights = open_weights(str(folder), allow_pickle=True)
    return {name: weights.read(name) for name in weights.shapes}


def test_bin_views_within_their_storage_load_as_torch_loads_them(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    path = write_bin(str(tmp_path), storage, offset=2, size=(2, 3), stride=(1, 3))
    loaded = load_torch_state_dict(path)["encoder.w"]
    np.testing.assert_array_equal(loaded, [[2, 5, 8], [3, 6, 9]])
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["encoder.w"].numpy(), loaded)
    empty = load_torch_state_dict(write_bin(str(tmp_path), storage, offset=12, size=(0, 3), stride=(3, 1)))
    assert empty["encoder.w"].shape == (0, 3)


@pytest.mark.parametrize("offset, size, stride", [
    (0, (1000,), (1,)),         # more elements than stored
    (11, (2,), (1,)),           # offset + extent past the end
    (0, (4, 4), (4, 1)),        # 2-d view past the end
    (0, (3,), (6,)),            # stride past the end
    (100, (), ()),              # a scalar past the end
    (-1, (), ()),               # negative offset
    (11, (3,), (-1,)),          # negative stride
    (0, (-2,), (1,)),           # negative size
    (20, (0,), (1,)),           # an empty tensor starting past the end
    (0, (1 << 30, 1 << 30), (0, 0)),  # broadcast: reads in bounds, but 2^60 elements out of 12
])
def test_bin_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride):
    write_bin(str(tmp_path), np.arange(12, dtype=np.float32), offset, size, stride)
    one_line_error(lambda: read_all(tmp_path), "pytorch_model.bin", "'encoder.w'", "storage")


# --- item 2: tokenizers -------------------------------------------------------------------------------------------

def model_copy(src: str, dst, skip=()) -> str:
    """A folder of symlinks to src's files (JSON files and 1_Pooling copied, so tests can break them)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name in skip:
            continue
        source, target = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(source):
            shutil.copytree(source, target)
        elif name.endswith(".json"):
            shutil.copy(source, target)
        else:
            os.symlink(source, target)
    return str(dst)


def test_folder_without_tokenizer_is_refused(minilm_dir, tmp_path):
    folder = model_copy(minilm_dir, tmp_path / "m", skip=TOKENIZER_FILES)
    message = one_line_error(lambda: Embedder.from_pretrained(folder), folder, "tokenizer.json", "vocab.txt")
    assert one_line_error(lambda: model_dir.resolve(folder)) == message


def test_tokenizer_far_smaller_than_the_model_vocabulary_is_refused(minilm_dir, tmp_path):
    folder = model_copy(minilm_dir, tmp_path / "m", skip=TOKENIZER_FILES)
    (tmp_path / "m" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    one_line_error(lambda: Embedder.from_pretrained(folder), folder, "6 tokens", "30522")


# --- item 7: broken JSON and configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("file, content, needle", [
    ("modules.json", "[{", "not valid JSON"),
    ("modules.json", '{"type": "x"}', "expected a list"),
    ("modules.json", '[{"idx": 1}]', "type"),
    ("modules.json", '[{"type": "sentence_transformers.models.Pooling", "path": "../x"}]', "inside the model folder"),
    ("1_Pooling/config.json", "{", "not valid JSON"),
    ("1_Pooling/config.json", "[]", "expected an object"),
    ("tokenizer_config.json", "{,}", "not valid JSON"),
    ("sentence_bert_config.json", '{"max_seq_length": "long"}', "max_seq_length"),
])
def test_broken_sentence_transformers_and_tokenizer_files(minilm_dir, tmp_path, file, content, needle):
    folder = model_copy(minilm_dir, tmp_path / "m")
    (tmp_path / "m" / file).write_text(content)
    one_line_error(lambda: Embedder.from_pretrained(folder), os.path.join(folder, file), needle)


def test_modules_json_naming_a_missing_pooling_folder(minilm_dir, tmp_path):
    folder = model_copy(minilm_dir, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "1_Pooling")
    one_line_error(lambda: Embedder.from_pretrained(folder), os.path.join(folder, "1_Pooling", "config.json"),
                   "does not exist")


BERT = {"model_type": "bert", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128}


@pytest.mark.parametrize("change, needle", [
    ({"num_attention_heads": 6}, "num_attention_heads 6 does not divide hidden_size 64"),
    ({"hidden_size": "64"}, "hidden_size: expected a positive integer, got '64'"),
    ({"vocab_size": 0}, "vocab_size: expected a positive integer, got 0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers: expected a positive integer"),
    ({"intermediate_size": True}, "intermediate_size: expected a positive integer"),
    ({"max_position_embeddings": 512.0}, "max_position_embeddings: expected a positive integer"),
    ({"hidden_act": "tanh2"}, "hidden_act: expected one of gelu"),
    ({"layer_norm_eps": "1e-12"}, "layer_norm_eps: expected a positive number"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob: expected a number in [0, 1)"),
    ({"pad_token_id": -1}, "pad_token_id: expected an integer >= 0"),
])
def test_invalid_config_values(tmp_path, change, needle):
    (tmp_path / "config.json").write_text(json.dumps({**BERT, **change}))
    one_line_error(lambda: load_model(str(tmp_path)), str(tmp_path / "config.json"), needle)
    with pytest.raises(DretError, match="config.json"):
        BertConfig.from_hf({**BERT, **change})


def test_null_config_values_take_their_defaults():
    assert BertConfig.from_hf({**BERT, "pad_token_id": None}).pad_token_id == 0


def test_the_registry_picks_the_family_by_model_type_or_architectures():
    assert models.family_of(BERT) is models.family_of({"architectures": ["XLMRobertaModel"]}) is bert
    one_line_error(lambda: models.family_of({}, "m/config.json"), "m/config.json", "missing model_type",
                   "bert, roberta, xlm-roberta, ernie")
    one_line_error(lambda: models.family_of({"model_type": ["bert"]}, "m/config.json"), "m/config.json",
                   "model_type: expected one of bert", "got ['bert']")
    roberta = models.config_of({**BERT, "model_type": "roberta", "pad_token_id": 1, "max_position_embeddings": 514})
    assert (roberta.hidden_size, roberta.vocab_size, roberta.max_text_length) == (64, 100, 512)


def test_a_weight_shape_that_does_not_fit_the_config_names_both_in_the_checkpoint_layout(minilm_dir, tmp_path):
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    tensors = state_dict(load_model(minilm_dir)[0])
    key = "encoder.layer.1.output.dense.weight"  # HF's [out, in] = [384, 1536]; ours is [1536, 384]
    tensors[key] = tensors[key][:, 1:].copy()
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    one_line_error(lambda: load_model(str(tmp_path)), f"{key} has shape (384, 1535), config.json implies (384, 1536)")


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b'{"model_type": "bert",', "not valid JSON"),
    (b'["bert"]', "expected an object"),
])
def test_config_json_that_is_not_a_json_object(tmp_path, content, needle):
    (tmp_path / "config.json").write_bytes(content)
    one_line_error(lambda: load_model(str(tmp_path)), str(tmp_path / "config.json"), needle)


# --- item 13: index files, non-finite values; corrupt files -------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_tensors(minilm_dir):
    return state_dict(load_model(minilm_dir)[0])


def sharded_folder(minilm_dir, folder, tensors, index) -> str:
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(minilm_dir, "config.json"), folder)
    safetensors.numpy.save_file(tensors, os.path.join(folder, "model-1.safetensors"))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write(index if isinstance(index, str) else json.dumps(index))
    return str(folder)


@pytest.mark.parametrize("index, needle", [
    ("{", "not valid JSON"),
    ({"metadata": {}}, "weight_map"),
    ({"weight_map": ["model-1.safetensors"]}, "weight_map"),
    ({"weight_map": {"a": 5}}, "weight_map"),
    ({"weight_map": {"a": "model-2.safetensors"}}, "model-2.safetensors"),
])
def test_broken_safetensors_index(minilm_dir, minilm_tensors, tmp_path, index, needle):
    folder = sharded_folder(minilm_dir, tmp_path / "m", minilm_tensors, index)
    one_line_error(lambda: load_model(folder), "model", needle)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors",
                                   "/abs/outside.safetensors"])
def test_index_shard_outside_the_folder_is_refused(minilm_dir, minilm_tensors, tmp_path, shard):
    safetensors.numpy.save_file(minilm_tensors, str(tmp_path / "outside.safetensors"))
    index = {"weight_map": {k: "model-1.safetensors" for k in minilm_tensors}}
    index["weight_map"]["encoder.layer.0.output.dense.bias"] = shard
    folder = sharded_folder(minilm_dir, tmp_path / "m", minilm_tensors, index)
    one_line_error(lambda: load_model(folder), "model.safetensors.index.json", shard, "inside the model folder")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(minilm_dir, minilm_tensors, tmp_path, bad):
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    tensors = dict(minilm_tensors)
    key = "encoder.layer.2.attention.self.query.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 5] = bad
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    one_line_error(lambda: load_model(str(tmp_path)), str(tmp_path / "model.safetensors"), key, "non-finite")


def test_non_finite_bin_weights_are_refused(tmp_path):
    write_bin(str(tmp_path), np.array([1.0, np.nan], np.float32), 0, (2,), (1,))
    one_line_error(lambda: read_all(tmp_path), "pytorch_model.bin", "'encoder.w'", "non-finite")


@pytest.mark.parametrize("corrupt", [
    lambda data: data[:100],                                   # truncated inside the header
    lambda data: struct.pack("<Q", 1 << 40) + data[8:],        # header length far past the end
    lambda data: data[:8] + b"\x00" * 64 + data[72:],          # zeroed header bytes
    lambda data: b"",                                          # empty file
])
def test_corrupt_safetensors(minilm_dir, tmp_path, corrupt):
    shutil.copy(os.path.join(minilm_dir, "config.json"), tmp_path)
    with open(os.path.join(minilm_dir, "model.safetensors"), "rb") as f:
        (tmp_path / "model.safetensors").write_bytes(corrupt(f.read()))
    one_line_error(lambda: load_model(str(tmp_path)), str(tmp_path / "model.safetensors"))


# --- item 11: saving ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.from_pretrained(minilm_dir)


def test_save_with_a_trailing_slash(minilm, tmp_path):
    """The README's `model.save("exported/")`."""
    minilm.save(str(tmp_path / "exported") + "/")
    assert os.listdir(tmp_path) == ["exported"]
    assert {"config.json", "model.safetensors", "modules.json", "tokenizer.json"} <= set(
        os.listdir(tmp_path / "exported"))


def test_save_onto_an_existing_folder_is_refused_and_leaves_it_alone(minilm, tmp_path):
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "mine.txt").write_text("keep")
    one_line_error(lambda: minilm.save(str(tmp_path / "exported") + "/"), "exported", "already exists")
    assert os.listdir(tmp_path) == ["exported"]
    assert os.listdir(tmp_path / "exported") == ["mine.txt"]


def test_failed_save_leaves_no_temporary_folder(minilm, tmp_path, monkeypatch):
    def disk_full(_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(minilm.tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        minilm.save(str(tmp_path / "exported"))
    assert os.listdir(tmp_path) == []
