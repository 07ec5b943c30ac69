"""Parity with the PyTorch references on the same weights: sentence-transformers and transformers models."""

import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer

from dret.hf_io import load_model
from dret.model import Embedder

MIN_COSINE = 0.99999


def varied_texts() -> list[str]:
    """64 texts: empty, one word, longer than max_length, Chinese, emoji, case and punctuation."""
    base = [
        "", "a", "Retrieval", "HELLO world", "hello WORLD!!!", "what is dense retrieval?",
        "这是一个中文句子，用来测试分词。", "北京是中国的首都", "emoji 😀🚀🔥 test", "🙂", "mIxEd CaSe, punctuation; (yes) — really?!",
        "C++ & Rust: <fast> \"code\" 'quoted' [brackets] {braces}", "tab\tand\nnewline", "   leading and trailing   ",
        "numbers 3.14159 2,718 1e-9 #42 @user", "Ünïcödé àccents ñ ß ø", "Привет мир", "مرحبا بالعالم", "こんにちは世界",
        "long " + "token " * 600, " ".join(f"word{i}" for i in range(400)),
        "The quick brown fox jumps over the lazy dog. " * 30,
    ]
    rng = np.random.default_rng(0)
    vocab = "protein cell gene cancer model data retrieval neural vector search query passage index embedding".split()
    while len(base) < 64:
        n = int(rng.integers(1, 80))
        base.append(" ".join(rng.choice(vocab, n)) + rng.choice([".", "?", "!", ""]))
    return base


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_minilm_matches_sentence_transformers(minilm_dir):
    texts = varied_texts()
    ours = Embedder.from_pretrained(minilm_dir).encode(texts, batch_size=16)
    ref = SentenceTransformer(minilm_dir, device="cpu").encode(texts, batch_size=16)
    assert ours.shape == ref.shape == (64, 384)
    assert cosine_rows(ours, ref).min() >= MIN_COSINE


def test_m3e_bin_matches_transformers_bert(m3e_dir):
    texts = varied_texts()
    ours = Embedder.from_pretrained(m3e_dir, pooling="mean", allow_pickle=True).encode(texts, max_length=512)
    tok = transformers.AutoTokenizer.from_pretrained(m3e_dir)
    ref_model = transformers.BertModel.from_pretrained(m3e_dir).eval()
    refs = []
    with torch.no_grad():
        for text in texts:
            enc = tok([text], truncation=True, max_length=512, return_tensors="pt")
            h = ref_model(**enc).last_hidden_state[0]
            refs.append(h.mean(0).numpy())
    assert cosine_rows(ours, np.stack(refs)).min() >= MIN_COSINE


def _random_torch_model(kind: str):
    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=80, pad_token_id=1)
    if kind == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(**common), add_pooling_layer=False)
    if kind == "xlm-roberta":
        return transformers.XLMRobertaModel(transformers.XLMRobertaConfig(**common, hidden_act="gelu_new"),
                                            add_pooling_layer=False)
    return transformers.ErnieModel(transformers.ErnieConfig(**{**common, "pad_token_id": 0}, use_task_id=True,
                                                            type_vocab_size=4), add_pooling_layer=False)


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "ernie"])
def test_random_encoder_hidden_states_match_transformers(kind, tmp_path):
    torch.manual_seed(0)
    ref = _random_torch_model(kind).eval()
    ref.save_pretrained(tmp_path)
    pad = ref.config.pad_token_id
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 300, size=(3, 20))
    mask = np.ones_like(ids)
    for row, length in enumerate([20, 13, 4]):
        ids[row, length:], mask[row, length:] = pad, 0
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    model, _ = load_model(str(tmp_path))
    got = np.asarray(model(ids.astype(np.int32), mask.astype(np.int32)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-4, atol=1e-5)
    # The three texts packed into one row (as encode packs them): segments 1..3, positions from 0 in each.
    lengths = [20, 13, 4]
    packed_ids = np.concatenate([ids[r, :n] for r, n in enumerate(lengths)])[None].astype(np.int32)
    segments = np.repeat(np.arange(1, 4), lengths)[None].astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    packed = np.asarray(model(packed_ids, segments, positions_bt=positions))[0]
    np.testing.assert_allclose(packed, expected[real], rtol=1e-4, atol=1e-5)


def test_cpu_library_options_agree_with_xla_defaults(minilm_dir):
    """The inference compile options route dots to XNNPACK (`dret.models.cpu`); a miscompile there would
    change embeddings, so compare against the same forward compiled with XLA's defaults."""
    from flax import nnx

    from dret.encode import PackedBatch, pack
    from dret.model import jit_forward
    from dret.models import cpu

    embedder = Embedder.from_pretrained(minilm_dir)
    assert cpu.compiler_options(embedder.backbone.dtype)  # float32 on CPU, where the options apply
    assert cpu.compiler_options("bfloat16") is None
    graphdef, state = nnx.split(embedder.backbone)
    default_jit = jit_forward(graphdef, None)
    ids = embedder.tokenize(varied_texts()[:16], 128)
    rows = pack(np.array([len(x) for x in ids]), 256, 32)
    batch = PackedBatch.build(ids, rows, len(rows), 256, 32, 0)
    arrays = (batch.ids_rl, batch.slots_rl, batch.positions_rl, batch.lengths_rl)
    args = dict(texts_per_row=32, pooling="mean", normalize=True, dim=None)
    ours = np.asarray(embedder.forward(state, *arrays, **args))
    default = np.asarray(default_jit(state, *arrays, **args))
    np.testing.assert_allclose(ours, default, atol=2e-6)
