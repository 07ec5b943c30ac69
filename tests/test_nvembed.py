"""NV-Embed (`dret.models.nvembed`, `dret.models.latent`): the latent-attention block against a float64 numpy version
written from the issue's description; a tiny NV-Embed-v1-shaped checkpoint (v1 names, built here) loaded and encoded
against transformers' MistralModel (full, non-causal 4-D mask) + that numpy block; the instruction left out of the
mean; export and reload; bad latent configs in one line; PaddleNLP's NV-Embed port: its folder (Paddle names,
layout and config) encodes as the v1 folder, and converts."""

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import scipy.special
import tokenizers
import torch
import transformers
from flax import nnx

from dret import hf_io, models, paddle_io, peft
from dret.convert import convert
from dret.errors import DretError
from dret.model import Embedder
from dret.pooling import pool

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=4)  # the window must not apply
LATENT = dict(num_latents_value=8, num_cross_heads=2, cross_dim_head=16, latent_dim=64, hidden_dim=64)
BLOCK = "latent_attention_model.cross_attend_blocks"
WORDS = [f"w{i}" for i in range(125)]  # ids 3..127
TEXTS = ["w1 w2 w3 w4 w5 w6 w7", "w9 w8", "w100 w50 w20 w10 w5", "w3"]


def _config(**changes) -> dict:
    return {"model_type": "nvembed", "architectures": ["NVEmbedModel"], "hidden_size": 64,
            "text_config": {**TEXT, "model_type": "bidir_mistral", "architectures": ["MistralModel"]},
            "latent_attention_config": {**LATENT, "model_type": "latent_attention", "output_normalize": True},
            "is_mask_instruction": True, "add_eos": True, "padding_side": "right", **changes}


def _latent_weights(rng) -> dict[str, np.ndarray]:
    """Random float32 weights of the latent block under NV-Embed-v1's names and layouts ([out, in] Linears)."""
    d, inner, f = 64, 2 * 16, 4 * 64

    def linear(n_out, n_in):
        return rng.normal(size=(n_out, n_in)) / math.sqrt(n_in)

    w = {"latent_attention_model.latents": rng.normal(size=(8, d)),
         f"{BLOCK}.0.fn.to_q.weight": linear(inner, d), f"{BLOCK}.0.fn.to_kv.weight": linear(2 * inner, d),
         f"{BLOCK}.0.fn.to_out.weight": linear(d, inner),
         f"{BLOCK}.1.fn.net.0.weight": linear(2 * f, d), f"{BLOCK}.1.fn.net.0.bias": 0.1 * rng.normal(size=2 * f),
         f"{BLOCK}.1.fn.net.2.weight": linear(d, f), f"{BLOCK}.1.fn.net.2.bias": 0.1 * rng.normal(size=d)}
    for norm in ("0.norm", "0.norm_context", "1.norm"):
        w[f"{BLOCK}.{norm}.weight"] = 1 + 0.1 * rng.normal(size=d)
        w[f"{BLOCK}.{norm}.bias"] = 0.1 * rng.normal(size=d)
    return {k: v.astype(np.float32) for k, v in w.items()}


def latent_block_np(x_btd, w) -> np.ndarray:
    """The issue's description in float64: x + to_out(MHA(q = to_q(LN(x)), k, v = to_kv(LN(latents)))), then
    y + Linear(GEGLU(Linear(LN(y)))) with GEGLU(u) = u[:F] * gelu(u[F:]), exact erf GELU."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    heads, head_dim = LATENT["num_cross_heads"], LATENT["cross_dim_head"]

    def layer_norm(v, name):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * w[f"{BLOCK}.{name}.weight"] + w[f"{BLOCK}.{name}.bias"]

    x = x_btd.astype(np.float64)
    b, t, _ = x.shape
    q = (layer_norm(x, "0.norm") @ w[f"{BLOCK}.0.fn.to_q.weight"].T).reshape(b, t, heads, head_dim)
    kv = layer_norm(w["latent_attention_model.latents"], "0.norm_context") @ w[f"{BLOCK}.0.fn.to_kv.weight"].T
    k, v = (z.reshape(-1, heads, head_dim) for z in np.split(kv, 2, axis=-1))
    scores = np.einsum("bthd,lhd->bhtl", q, k) / math.sqrt(head_dim)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    attn = np.einsum("bhtl,lhd->bthd", p, v).reshape(b, t, heads * head_dim)
    y = x + attn @ w[f"{BLOCK}.0.fn.to_out.weight"].T
    u = layer_norm(y, "1.norm") @ w[f"{BLOCK}.1.fn.net.0.weight"].T + w[f"{BLOCK}.1.fn.net.0.bias"]
    value, gate = np.split(u, 2, axis=-1)
    geglu = value * 0.5 * gate * (1 + scipy.special.erf(gate / math.sqrt(2)))
    return y + geglu @ w[f"{BLOCK}.1.fn.net.2.weight"].T + w[f"{BLOCK}.1.fn.net.2.bias"]


def _tokenizer():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, the Mistral oracle, the latent weights): an NV-Embed-v1-shaped folder, weights under v1's names."""
    folder = tmp_path_factory.mktemp("nvembed")
    torch.manual_seed(0)
    config = transformers.MistralConfig(**TEXT)
    config._attn_implementation = "eager"
    mistral = transformers.MistralModel(config).eval()
    with torch.no_grad():
        for p in mistral.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    latent = _latent_weights(np.random.default_rng(0))
    tensors = {f"embedding_model.{k}": v.numpy() for k, v in mistral.state_dict().items()} | latent
    safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_config()))
    _tokenizer().save_pretrained(str(folder))
    return str(folder), mistral, latent


def _full_mask_hidden(mistral, ids, mask) -> np.ndarray:
    """transformers' MistralModel with every real token visible to every token (an additive 4-D mask)."""
    t = ids.shape[1]
    keep = torch.tensor(mask, dtype=torch.bool)
    full_b1ts = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(-1, 1, t, t)
    with torch.no_grad():
        return mistral(input_ids=torch.tensor(ids), attention_mask=full_b1ts).last_hidden_state.numpy()


def _jitted(module, *args):
    """module(*args) compiled (eager op-by-op calls are slow on CPU)."""
    graphdef, state = nnx.split(module)
    return np.asarray(jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *map(jnp.asarray, args)))


def _padded(tokenizer, texts):
    ids = tokenizer(texts, return_attention_mask=False)["input_ids"]
    t = max(map(len, ids))
    mask = np.array([[1] * len(x) + [0] * (t - len(x)) for x in ids])
    return np.array([x + [2] * (t - len(x)) for x in ids]), mask


def test_latent_block_matches_float64_numpy(checkpoint):
    """The float32 block (x64 off) against float64 numpy: rtol 1e-5."""
    folder, _, latent = checkpoint
    model, _ = hf_io.load_model(folder)
    x_btd = np.random.default_rng(1).normal(size=(3, 11, 64)).astype(np.float32)
    got = _jitted(model.latent_attention_model, x_btd)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, latent_block_np(x_btd, latent), rtol=1e-5, atol=1e-6)  # near-0 entries


def test_bidirectional_mistral_equals_transformers_given_a_full_mask(checkpoint):
    """A padded batch: the decoder (config says bidir_mistral with a 4-token window) attends both ways, unwindowed."""
    folder, mistral, _ = checkpoint
    model, _ = hf_io.load_model(folder)
    ids, mask = _padded(_tokenizer(), TEXTS)
    got = _jitted(model.embedding_model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], _full_mask_hidden(mistral, ids, mask)[real], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        causal = mistral(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert not np.allclose(got[0, :4], causal[0, :4], atol=1e-3)


def test_checkpoint_encodes_as_mistral_then_numpy_block_then_mean(checkpoint):
    """Embedder.from_pretrained on the v1 names: packed encode = masked mean + L2 of numpy's block over
    transformers' hidden states."""
    folder, mistral, latent = checkpoint
    embedder = Embedder.from_pretrained(folder, pooling="latent")
    ids, mask = _padded(embedder.tokenizer, TEXTS)
    h = latent_block_np(_full_mask_hidden(mistral, ids, mask), latent)
    mean = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    want = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    np.testing.assert_allclose(embedder.encode(TEXTS, progress=False), want, rtol=1e-4, atol=1e-5)


def test_instruction_tokens_are_left_out_of_the_mean(checkpoint):
    folder, _, _ = checkpoint
    model, _ = hf_io.load_model(folder)
    ids, mask = _padded(_tokenizer(), TEXTS[:2])
    h = _jitted(model, ids, mask).astype(np.float64)
    got = np.asarray(pool(jnp.asarray(h), jnp.asarray(mask), "latent", pool_from_b=jnp.array([3, 0])))
    np.testing.assert_allclose(got[0], h[0, 3:7].mean(0), rtol=1e-5)  # text 0: 7 tokens, the first 3 instruction
    np.testing.assert_allclose(got[1], h[1, :2].mean(0), rtol=1e-5)  # pool sums in float32
    assert not np.allclose(got[0], h[0, :7].mean(0), atol=1e-3)


def test_export_writes_v1_names_and_a_note_and_reloads(checkpoint, tmp_path, caplog):
    folder, _, _ = checkpoint
    embedder = Embedder.from_pretrained(folder, pooling="latent")
    with caplog.at_level(logging.WARNING):
        embedder.save(str(tmp_path / "out"))
    assert "it cannot run the latent-attention block (NV-Embed)" in caplog.text
    assert "sentence-transformers does not reproduce" in (tmp_path / "out" / "README.md").read_text()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["is_mask_instruction"]) == (
        "nvembed", ["NVEmbedModel"], True)
    assert config["latent_attention_config"]["num_latents_value"] == 8
    pooling = json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    saved, original = (safetensors.numpy.load_file(str(f)) for f in (tmp_path / "out" / "model.safetensors",
                                                                     f"{folder}/model.safetensors"))
    assert saved.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    again = Embedder.from_pretrained(str(tmp_path / "out"))
    assert again.pooling == "latent"
    np.testing.assert_allclose(again.encode(TEXTS, progress=False), embedder.encode(TEXTS, progress=False),
                               rtol=1e-6, atol=1e-7)


def test_lora_adapts_only_the_decoder():
    """Under LoRA the adapters sit on the Mistral projections; the latent block has none (it stays as loaded)."""
    model = nnx.eval_shape(lambda: peft.apply_lora(
        models.build(_config(), rngs=nnx.Rngs(0)), rank=2, alpha=4, dropout=0.0,
        target_modules=models.nvembed.LORA_TARGETS, seed=0))
    adapted = {path[:-1] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert len(adapted) == 2 * 7 and all(path[0] == "embedding_model" for path in adapted)


def test_tiny_shrinks_both_nested_configs():
    big = _config(text_config={**TEXT, "model_type": "mistral", "hidden_size": 256, "num_hidden_layers": 8},
                  latent_attention_config={**LATENT, "latent_dim": 256, "hidden_dim": 256})
    cfg = models.config_of(models.tiny(big))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.latent.num_latents) == (64, 2, 128, 8)
    assert cfg.text.bidirectional and cfg.text.model_type == "mistral"


@pytest.mark.parametrize("changes, message", [
    ({"latent_dim": 32}, r"latent_attention_config\.latent_dim: expected 64 \(text_config\.hidden_size: the block "
                         r"adds its output to the hidden states\), got 32"),
    ({"hidden_dim": 128}, r"latent_attention_config\.hidden_dim: expected 64 .*, got 128"),
    ({"num_cross_heads": 0}, r"latent_attention_config\.num_cross_heads: expected a positive integer, got 0"),
    ({"cross_dim_head": "16"}, r"latent_attention_config\.cross_dim_head: expected a positive integer, got '16'"),
    ({"num_latents_value": None}, r"latent_attention_config: missing num_latents_value"),
])
def test_bad_latent_config_is_one_line(changes, message):
    hf = _config(latent_attention_config={**LATENT, **changes})
    with pytest.raises(DretError, match=rf"^config\.json: {message}$"):
        models.config_of(hf)


@pytest.mark.parametrize("changes, message", [
    ({"latent_attention_config": None}, r"missing latent_attention_config"),
    ({"text_config": [1]}, r"text_config: expected an object, got \[1\]"),
    ({"text_config": {**TEXT, "model_type": "gpt2"}}, r"text_config: model_type: expected one of llama, mistral"),
])
def test_bad_nested_config_is_one_line(changes, message):
    hf = {k: v for k, v in _config(**changes).items() if v is not None}
    with pytest.raises(DretError, match=rf"^config\.json: {message}") as e:
        models.config_of(hf)
    assert "\n" not in str(e.value)


# --- PaddleNLP's NV-Embed port (`paddlenlp/transformers/nv_embed/modeling.py`: NVEncodeModel(MistralModel) with a
# LatentModel). Its latent block is max_position_embeddings wide (num_key_value_heads heads), its feed-forward half
# that, its latents 512 rows: so its tiny config has max_position_embeddings 8 x 64 = 512 (heads of 256).
PORT_HEAD_DIM, PORT_LATENTS = 256, 512
PORT_CONFIG = {"architectures": ["NVEncodeModel"], "model_type": "mistral", **TEXT, "max_position_embeddings": 512,
               "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.02,
               "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
               "tie_word_embeddings": False, "dtype": "float32", "tensor_parallel_degree": 1}


def _port_latent_layer(paddle, latent):
    """The port's LatentModel (its module names, paddle's [in, out] Linears and its forward) holding the v1 fixture's
    block, embedded exactly in the port's sizes: each latent repeated 64 times (the softmax is unchanged) and each
    head zero-padded from 16 to 256 dims, to_q scaled by 4 = sqrt(256 / 16) (the scores are unchanged)."""
    nn, d, heads, head_dim = paddle.nn, 64, LATENT["num_cross_heads"], LATENT["cross_dim_head"]
    inner = heads * PORT_HEAD_DIM

    def padded(w_od, scale=1.0):  # [heads * 16, in] -> [heads * 256, in]
        out = np.zeros((heads, PORT_HEAD_DIM, w_od.shape[1]), np.float32)
        out[:, :head_dim] = scale * w_od.reshape(heads, head_dim, -1)
        return out.reshape(inner, -1)

    class LatentModel(nn.Layer):
        def __init__(self):
            super().__init__()
            self.cross_attend_blocks_0_fn_to_kv = nn.Linear(d, 2 * inner, bias_attr=False)
            self.cross_attend_blocks_0_fn_to_out = nn.Linear(inner, d, bias_attr=False)
            self.cross_attend_blocks_0_fn_to_q = nn.Linear(d, inner, bias_attr=False)
            self.cross_attend_blocks_0_norm = nn.LayerNorm(d)
            self.cross_attend_blocks_0_norm_context = nn.LayerNorm(d)
            self.cross_attend_blocks_1_fn_net_0 = nn.Linear(d, inner)
            self.cross_attend_blocks_1_fn_net_2 = nn.Linear(inner // 2, d)
            self.cross_attend_blocks_1_norm = nn.LayerNorm(d)
            self.latents = nn.Linear(d, PORT_LATENTS, bias_attr=False)

        def forward(self, h_btd, mask_bt):  # the port's: latents(eye).T, kv split, heads, GEGLU, masked mean, L2
            latents = self.latents(paddle.eye(d)).T.unsqueeze(0).expand([h_btd.shape[0], PORT_LATENTS, d])
            q = self.cross_attend_blocks_0_fn_to_q(self.cross_attend_blocks_0_norm(h_btd))
            kv = self.cross_attend_blocks_0_fn_to_kv(self.cross_attend_blocks_0_norm_context(latents))
            q, k, v = (x.reshape([x.shape[0], x.shape[1], heads, -1]).transpose([0, 2, 1, 3])
                       for x in (q, kv[:, :, :inner], kv[:, :, inner:]))
            p = nn.functional.softmax(paddle.matmul(q, k, transpose_y=True) / PORT_HEAD_DIM ** 0.5, axis=-1)
            out = paddle.matmul(p, v).transpose([0, 2, 1, 3]).reshape([h_btd.shape[0], h_btd.shape[1], inner])
            y = self.cross_attend_blocks_0_fn_to_out(out) + h_btd
            u = self.cross_attend_blocks_1_fn_net_0(self.cross_attend_blocks_1_norm(y))
            y = self.cross_attend_blocks_1_fn_net_2(u[:, :, :inner // 2] * nn.functional.gelu(u[:, :, inner // 2:])) + y
            mean = (y * mask_bt.unsqueeze(-1)).sum(1) / mask_bt.sum(1, keepdim=True)
            return nn.functional.normalize(mean, axis=-1)

    k, v = np.split(latent[f"{BLOCK}.0.fn.to_kv.weight"], 2)
    hf_layout = {  # [out, in]
        "cross_attend_blocks_0_fn_to_q.weight": padded(latent[f"{BLOCK}.0.fn.to_q.weight"], 4.0),
        "cross_attend_blocks_0_fn_to_kv.weight": np.concatenate([padded(k), padded(v)]),
        "cross_attend_blocks_0_fn_to_out.weight": padded(latent[f"{BLOCK}.0.fn.to_out.weight"].T).T,
        "latents.weight": np.repeat(latent["latent_attention_model.latents"], PORT_LATENTS // 8, axis=0),
        **{f"cross_attend_blocks_1_fn_net_{i}.{p}": latent[f"{BLOCK}.1.fn.net.{i}.{p}"]
           for i in (0, 2) for p in ("weight", "bias")},
        **{f"cross_attend_blocks_{norm.replace('.', '_')}.{p}": latent[f"{BLOCK}.{norm}.{p}"]
           for norm in ("0.norm", "0.norm_context", "1.norm") for p in ("weight", "bias")},
    }
    layer = LatentModel()
    for name, param in layer.named_parameters():  # set_value checks paddle's [in, out] shapes
        param.set_value(np.ascontiguousarray(hf_layout.pop(name).T if param.ndim == 2 else hf_layout.pop(name)))
    assert not hf_layout
    return layer


@pytest.fixture(scope="module")
def port_folder(checkpoint, tmp_path_factory):
    """(folder, the port's latent layer): the v1 fixture's weights as PaddleNLP's port saves them (NVEncodeModel's
    bare state-dict names, `paddle.save`, the MistralConfig it saves), with the v1 fixture's tokenizer."""
    paddle = pytest.importorskip("paddle", reason="paddlepaddle is not installed (the test extra installs it)")
    _, mistral, latent = checkpoint
    folder = tmp_path_factory.mktemp("nvembed_paddle")
    layer = _port_latent_layer(paddle, latent)
    decoder = {k: v.numpy().T if v.ndim == 2 and k != "embed_tokens.weight" else v.numpy()  # paddle's [in, out]
               for k, v in mistral.state_dict().items()}
    state = {k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in decoder.items()}
    paddle.save({**state, **{f"latent_model.{k}": v for k, v in layer.state_dict().items()}},
                str(folder / "model_state.pdparams"))
    (folder / "config.json").write_text(json.dumps(PORT_CONFIG))
    _tokenizer().save_pretrained(str(folder))
    return str(folder), layer


def test_port_latent_layer_equals_the_v1_block(checkpoint, port_folder):
    """The port's own forward on its Paddle-layout weights = the v1 block (float64 numpy), masked mean, L2."""
    import paddle
    (_, _, v1_weights), (_, port_layer) = checkpoint, port_folder
    h_btd = np.random.default_rng(2).normal(size=(2, 5, 64)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    y = latent_block_np(h_btd, v1_weights)
    mean = (y * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    got = port_layer(paddle.to_tensor(h_btd), paddle.to_tensor(mask)).numpy()
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_port_folder_encodes_as_the_v1_folder_and_converts(checkpoint, port_folder, tmp_path):
    folder, _ = port_folder
    hf = hf_io.read_config(folder)
    assert hf["latent_attention_config"] == dict(num_latents_value=512, num_cross_heads=2, cross_dim_head=256,
                                                 latent_dim=64, hidden_dim=64)
    assert (hf["architectures"], hf["text_config"]["model_type"], hf["is_mask_instruction"]) == (
        ["NVEmbedModel"], "mistral", True)
    port = Embedder.from_pretrained(folder, allow_pickle=True)
    assert port.pooling == "latent"
    want = Embedder.from_pretrained(checkpoint[0]).encode(TEXTS, progress=False, instruction="w5 w6")
    np.testing.assert_allclose(port.encode(TEXTS, progress=False, instruction="w5 w6"), want, rtol=1e-5, atol=1e-6)
    convert(folder, str(tmp_path / "hf"), pooling=None, allow_pickle=True)
    again = Embedder.from_pretrained(str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    np.testing.assert_allclose(again.encode(TEXTS, progress=False, instruction="w5 w6"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("paddle_name, name", [
    ("layers.1.mlp.gate_proj.weight", "embedding_model.layers.1.mlp.gate_proj.weight"),
    ("mistral.norm.weight", "embedding_model.norm.weight"),
    ("model.embed_tokens.weight", "embedding_model.embed_tokens.weight"),
    ("mistral.latent_model.latents.weight", "latent_attention_model.latents"),
    ("model.latent_model.cross_attend_blocks_0_norm_context.bias",
     "latent_attention_model.cross_attend_blocks.0.norm_context.bias"),
    ("latent_model.cross_attend_blocks_1_fn_net_2.weight",
     "latent_attention_model.cross_attend_blocks.1.fn.net.2.weight"),
])
def test_port_names_under_each_prefix(paddle_name, name):
    """NVEncodeModel.state_dict()'s bare names, MistralModel's base_model_prefix `mistral.`, a wrapper's `model.`."""
    assert models.nvembed.from_paddle_name(paddle_name) == name


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 3}, r"max_position_embeddings: expected a multiple of num_key_value_heads \(3\)"),
    ({"max_position_embeddings": 256}, r"max_position_embeddings: expected 8 x hidden_size = 512 .*, got 256"),
    ({"num_key_value_heads": None}, r"num_key_value_heads: expected a positive integer, got None"),
])
def test_bad_port_config_is_one_line(changes, message):
    with pytest.raises(DretError, match=rf"^config\.json: {message}") as e:
        paddle_io.hf_config({**PORT_CONFIG, **changes}, "config.json")
    assert "\n" not in str(e.value)
