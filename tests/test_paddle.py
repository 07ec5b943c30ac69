"""PaddleNLP checkpoints: a random ERNIE 3.0 model built from paddle.nn with PaddleNLP's module names (checked against
paddlenlp 3.0.0b4 `transformers/ernie/modeling.py`), saved by real `paddle.save` with a `model_config.json`, loads in
dret with the hidden states of transformers' `ErnieModel` and of paddle's own forward; a hostile pickle runs nothing;
`dret.convert` writes a folder that loads without the flag."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
import transformers

from dret import hf_io, paddle_io
from dret.convert import convert
from dret.model import Embedder
from dret.paddle_pickle import load_paddle_state_dict
from tests.test_hf_io import one_line_error

paddle = pytest.importorskip("paddle", reason="paddlepaddle is not installed (the test extra installs it)")
nn = paddle.nn

HIDDEN, HEADS, LAYERS, FFN, POSITIONS, TYPES, TASK_TYPES = 64, 4, 2, 96, 80, 4, 3
WORDS = ("dense retrieval query passage vector search index model train 中 文 检 索 模 型 向 量 查 询 the a of "
         "##s ##ing ##ed , . ? ! ￥ 1 2 3 100").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TEXTS = ["dense retrieval", "the query of a passage ?", "中文检索模型", "vectors searching ￥100", "", "index . train !"]
# ErnieModel's parameter names in paddlenlp 3.0.0b4 (ErnieEmbeddings, nn.TransformerEncoder, ErniePooler)
PADDLENLP_NAMES = {
    "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight", "embeddings.task_type_embeddings.weight",
    "embeddings.layer_norm.weight", "embeddings.layer_norm.bias", "pooler.dense.weight", "pooler.dense.bias",
    *(f"encoder.layers.{i}.{m}.{p}" for i in range(LAYERS) for p in ("weight", "bias") for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2",
        "norm1", "norm2")),
}


class _Embeddings(nn.Layer):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(len(VOCAB), HIDDEN, padding_idx=0)
        self.position_embeddings = nn.Embedding(POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(TYPES, HIDDEN)
        self.task_type_embeddings = nn.Embedding(TASK_TYPES, HIDDEN)
        self.layer_norm = nn.LayerNorm(HIDDEN, epsilon=1e-12)  # what ErniePretrainedModel._init_weights sets

    def forward(self, ids):
        positions = paddle.arange(ids.shape[1]).unsqueeze(0)
        zeros = paddle.zeros_like(ids)  # token type 0, task type config.task_id = 0
        return self.layer_norm(self.word_embeddings(ids) + self.position_embeddings(positions)
                               + self.token_type_embeddings(zeros) + self.task_type_embeddings(zeros))


class _Pooler(nn.Layer):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, HIDDEN)


class _ErnieModel(nn.Layer):
    """PaddleNLP's ErnieModel, module for module (`encoder_layer` as ErnieModel.__init__ builds it)."""

    def __init__(self):
        super().__init__()
        self.embeddings = _Embeddings()
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.1, activation="gelu", attn_dropout=0.1,
                                           act_dropout=0, normalize_before=False, layer_norm_eps=1e-12)
        self.encoder = nn.TransformerEncoder(layer, LAYERS)
        self.pooler = _Pooler()

    def forward(self, ids, mask):
        additive = ((1.0 - mask.astype("float32")) * -1e4).unsqueeze([1, 2])  # ErnieModel's 2-D mask handling
        return self.encoder(self.embeddings(ids), additive)


@pytest.fixture(scope="module")
def paddle_dir(tmp_path_factory):
    """A PaddleNLP ERNIE 3.0 folder with random weights (every parameter, LayerNorms included); and the model."""
    paddle.seed(0)
    model = _ErnieModel()
    model.eval()
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():
        scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.set_value((rng.standard_normal(p.shape) * 0.2 + scale).astype(np.float32))
    folder = tmp_path_factory.mktemp("ernie3_paddle")
    paddle.save(model.state_dict(), str(folder / paddle_io.WEIGHTS))
    config = {"init_class": "ErnieModel", "vocab_size": len(VOCAB), "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "intermediate_size": FFN, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": POSITIONS,
              "type_vocab_size": TYPES, "task_type_vocab_size": TASK_TYPES, "use_task_id": True,
              "initializer_range": 0.02, "pad_token_id": 0}
    (folder / "model_config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("".join(f"{w}\n" for w in VOCAB), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenizer_class": "ErnieTokenizer", "unk_token": "[UNK]", "pad_token": "[PAD]",
         "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}))
    return str(folder), model


def _hf_state_dict(paddle_state: dict) -> dict:
    """The test's own PaddleNLP -> HF renaming (Linear weights transposed), independent of dret's table."""
    layer = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "linear1": "intermediate.dense", "linear2": "output.dense", "norm1": "attention.output.LayerNorm",
             "norm2": "output.LayerNorm"}
    out = {}
    for name, value in paddle_state.items():
        value = value.numpy()
        if name.startswith("encoder.layers."):
            _, _, i, *module, param = name.split(".")
            module = ".".join(module)
            name = f"encoder.layer.{i}.{layer[module]}.{param}"
            value = value.T if param == "weight" and "norm" not in module else value
        elif name.startswith("pooler."):
            value = value.T if name.endswith("weight") else value
        out[name.replace("embeddings.layer_norm", "embeddings.LayerNorm")] = torch.tensor(np.ascontiguousarray(value))
    return out


def _batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(5, len(VOCAB), size=(3, 20))
    mask = np.ones_like(ids)
    for row, length in enumerate([20, 13, 4]):
        ids[row, length:], mask[row, length:] = 0, 0
    return ids, mask


def test_names_match_paddlenlp(paddle_dir):
    folder, model = paddle_dir
    assert set(model.state_dict()) == PADDLENLP_NAMES
    assert set(load_paddle_state_dict(os.path.join(folder, paddle_io.WEIGHTS))) == PADDLENLP_NAMES


def test_hidden_states_match_transformers_and_paddle(paddle_dir):
    folder, model = paddle_dir
    ours, hf = hf_io.load_model(folder, allow_pickle=True)
    assert hf["model_type"] == "ernie" and hf["type_vocab_size"] == TYPES and hf["layer_norm_eps"] == 1e-12
    ref = transformers.ErnieModel(transformers.ErnieConfig(
        vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=POSITIONS, type_vocab_size=TYPES, use_task_id=True,
        task_type_vocab_size=TASK_TYPES, layer_norm_eps=1e-12, pad_token_id=0), add_pooling_layer=True).eval()
    missing, unexpected = ref.load_state_dict(_hf_state_dict(model.state_dict()), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ids, mask = _batch()
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = np.asarray(ours(ids.astype(np.int32), mask.astype(np.int32)))
    from_paddle = model(paddle.to_tensor(ids), paddle.to_tensor(mask)).numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[real], from_paddle[real], rtol=1e-4, atol=1e-4)


def test_reader_matches_paddle_load_for_every_protocol_and_bfloat16(tmp_path):
    rng = np.random.default_rng(2)
    state = {"w": paddle.to_tensor(rng.standard_normal((3, 5)).astype(np.float32)),
             "f": paddle.to_tensor(rng.standard_normal((5, 3)).astype(np.float32).T),  # not C-contiguous
             "i": paddle.to_tensor(np.arange(4, dtype=np.int64)),
             "h": paddle.to_tensor(rng.standard_normal(7).astype(np.float32)).astype("bfloat16")}
    for protocol in (2, 3, 4):
        file = str(tmp_path / f"p{protocol}.pdparams")
        paddle.save(state, file, protocol=protocol)
        got = load_paddle_state_dict(file)
        assert set(got) == set(state)
        for name, tensor in state.items():
            want = tensor.astype("float32").numpy() if name == "h" else tensor.numpy()
            np.testing.assert_array_equal(np.asarray(got[name], np.float32 if name == "h" else None), want)


class _Hostile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_hostile_pickle_runs_nothing(tmp_path, paddle_dir):
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name in ("model_config.json", "vocab.txt", "tokenizer_config.json"):
        (folder / name).write_bytes(open(os.path.join(paddle_dir[0], name), "rb").read())
    marker = tmp_path / "pwned"
    (folder / paddle_io.WEIGHTS).write_bytes(pickle.dumps({"embeddings.word_embeddings.weight": _Hostile(str(marker))}))
    one_line_error(lambda: Embedder.from_pretrained(str(folder), pooling="cls", allow_pickle=True),
                   paddle_io.WEIGHTS, "refusing pickle global", "open")
    assert not marker.exists()


def test_without_allow_pickle_names_the_flag_and_convert(paddle_dir):
    one_line_error(lambda: Embedder.from_pretrained(paddle_dir[0], pooling="cls"),
                   paddle_io.WEIGHTS, "allow_pickle=True (--allow_pickle)", "python -m dret.convert")


def test_unknown_paddlenlp_class_is_one_line(tmp_path, paddle_dir):
    (tmp_path / paddle_io.WEIGHTS).write_bytes(b"")
    (tmp_path / "model_config.json").write_text(json.dumps({"init_args": [{"init_class": "ErnieMModel"}]}))
    one_line_error(lambda: hf_io.read_config(str(tmp_path)), "model_config.json", "'ErnieMModel'", "ErnieModel")


def test_convert_round_trip(tmp_path, paddle_dir):
    folder = paddle_dir[0]
    before = Embedder.from_pretrained(folder, pooling="cls", allow_pickle=True)
    out = str(tmp_path / "converted")
    convert(folder, out, pooling="cls", allow_pickle=True)
    assert not os.path.exists(os.path.join(out, paddle_io.WEIGHTS))
    after = Embedder.from_pretrained(out)  # no flag, pooling from the sentence-transformers config
    assert after.pooling == "cls"
    assert [before.tokenizer(t)["input_ids"] for t in TEXTS] == [after.tokenizer(t)["input_ids"] for t in TEXTS]
    np.testing.assert_allclose(after.encode(TEXTS), before.encode(TEXTS), rtol=1e-5, atol=1e-6)


def test_tokenizer_splits_symbols_as_paddlenlp(paddle_dir):
    """PaddleNLP's BasicTokenizer isolates every Unicode symbol (`_is_symbol`); BERT's keeps ￥ in its word."""
    tokenizer = hf_io.load_tokenizer(paddle_dir[0], len(VOCAB))
    ids = tokenizer("￥100 中文")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "￥", "100", "中", "文", "[SEP]"]
