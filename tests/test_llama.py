"""The decoder family (`dret.models.llama`) against transformers' PyTorch Llama / Mistral / Qwen2 on identical random
weights: last hidden states on real tokens, causal (sliding window on and off, RoPE scaling), bidirectional, packed;
the CPU path (blocked / fused attention) against the accelerator path; config errors in one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dret import hf_io, models
from dret.errors import DretError
from dret.models import cpu

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
CASES = {  # name -> (HF class, config, tokens per row)
    "llama3.1": (transformers.LlamaModel, transformers.LlamaConfig(**TINY, rope_scaling=LLAMA31_ROPE), 24),
    "mistral-window": (transformers.MistralModel, transformers.MistralConfig(**TINY, sliding_window=4), 12),
    "mistral-full": (transformers.MistralModel, transformers.MistralConfig(**TINY, sliding_window=None), 12),
    "qwen2": (transformers.Qwen2ForCausalLM,  # a causal-LM checkpoint: `model.` prefix and an unused lm_head
              transformers.Qwen2Config(**TINY, tie_word_embeddings=False), 12),
    "qwen2-window": (transformers.Qwen2Model, transformers.Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1), 12),
}
LENGTHS = (1.0, 0.75, 0.25)  # real tokens per row, as a share of the row: right padding


def _saved(kind: str, folder):
    """A random transformers model of `kind` (every weight perturbed, so biases and norms count), saved in
    `folder` as safetensors; the decoder itself (no LM head)."""
    torch.manual_seed(0)
    cls, config, _ = CASES[kind]
    config._attn_implementation = "eager"
    ref = cls(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref.model if hasattr(ref, "lm_head") else ref


def _inputs(t: int, lengths=LENGTHS):
    ids = np.random.default_rng(1).integers(3, 128, size=(len(lengths), t))
    mask = (np.arange(t)[None] < np.array([max(1, int(f * t)) for f in lengths])[:, None]).astype(np.int64)
    return ids, mask


def _torch_hidden(ref, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def _ours(model, ids, mask, positions=None) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), positions_bt=positions))


def assert_close_on_real_tokens(got, want, mask):
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", list(CASES))
def test_hidden_states_match_transformers(kind, tmp_path, monkeypatch):
    """Positions run past the Llama-3.1 case's original 16; Mistral's 4-token window is shorter than its rows;
    the Qwen2 window case has one full and one sliding layer. The accelerator path (XLA attention with GQA and
    `local_window_size`) gives the CPU path's figures."""
    ref = _saved(kind, tmp_path)
    model, _ = hf_io.load_model(str(tmp_path))
    ids, mask = _inputs(CASES[kind][2])
    on_cpu = _ours(model, ids, mask)
    assert_close_on_real_tokens(on_cpu, _torch_hidden(ref, ids, mask), mask)
    monkeypatch.setattr(cpu, "active", lambda: False)
    assert_close_on_real_tokens(_ours(model, ids, mask), on_cpu, mask)


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama31")
    return _saved("llama3.1", folder), str(folder)


def test_bidirectional_equals_transformers_given_a_full_mask(llama31, monkeypatch):
    ref, folder = llama31
    hf = hf_io.read_config(folder)
    model, _ = hf_io.load_model(folder, hf={**hf, "bidirectional": True})
    ids, mask = _inputs(24)
    keep = torch.tensor(mask, dtype=torch.bool)  # eager attention adds a 4-D mask to the scores: pass it additive
    full_b1ts = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(-1, 1, 24, 24)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=full_b1ts).last_hidden_state.numpy()
    on_cpu = _ours(model, ids, mask)  # the fused CPU kernel (head size 16)
    assert_close_on_real_tokens(on_cpu, want, mask)
    assert not np.allclose(on_cpu[0, :4], _torch_hidden(ref, ids, mask)[0, :4], atol=1e-3)  # not causal
    monkeypatch.setattr(cpu, "active", lambda: False)
    assert_close_on_real_tokens(_ours(model, ids, mask), on_cpu, mask)


def test_packed_and_left_padded_texts_equal_each_alone(llama31):
    """Two texts in one row (segments 1, 2; positions from 0 each) give each text's hidden states alone; so does a
    left-padded row with positions left to the model."""
    _, folder = llama31
    model, _ = hf_io.load_model(folder)
    ids, mask = _inputs(24, lengths=(7 / 24, 9 / 24))
    alone = _ours(model, ids, mask)
    packed_ids = np.concatenate([ids[0, :7], ids[1, :9], np.zeros(8, np.int64)])[None]
    segments = np.array([[1] * 7 + [2] * 9 + [0] * 8])
    positions = np.array([list(range(7)) + list(range(9)) + [0] * 8])
    packed = _ours(model, packed_ids, segments, positions)
    np.testing.assert_allclose(packed[0, :7], alone[0, :7], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(packed[0, 7:16], alone[1, :9], rtol=1e-4, atol=1e-5)
    left = _ours(model, np.roll(ids[1:], 15, axis=1), np.roll(mask[1:], 15, axis=1))
    np.testing.assert_allclose(left[0, 15:], alone[1, :9], rtol=1e-4, atol=1e-5)


def test_training_forward_with_remat_equals_inference(llama31):
    """A training call (dropout rng given: whole-batch layers, rematerialised) gives the inference figures (these
    models have no dropout), and its gradients are finite."""
    _, folder = llama31
    model, _ = hf_io.load_model(folder, remat=True)
    ids, mask = _inputs(24)

    def loss(model):
        h_btd = model(jnp.asarray(ids), jnp.asarray(mask), dropout_rng=jax.random.key(0))
        return (h_btd * jnp.asarray(mask)[:, :, None]).sum(), h_btd
    (_, trained), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    assert_close_on_real_tokens(np.asarray(trained), _ours(model, ids, mask), mask)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(nnx.to_pure_dict(grads)))


def _config(**changes) -> dict:
    return {"model_type": "llama", **TINY, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling: rope_type: expected one of default, linear, llama3 (supported RoPE scaling), got 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     "rope_parameters: missing low_freq_factor, high_freq_factor (needed by rope_type llama3)"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"hidden_act": "gelu"}, "hidden_act: expected silu, got 'gelu'"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention"]},
     "layer_types: expected 2 entries (num_hidden_layers), got 1"),
])
def test_config_errors_are_one_line(tmp_path, changes, message):
    (tmp_path / "config.json").write_text(json.dumps(_config(**changes)))
    with pytest.raises(DretError) as error:
        hf_io.read_config(str(tmp_path))
    assert str(error.value) == f"{tmp_path / 'config.json'}: {message}"


def test_config_reads_rope_and_windows_as_transformers_does():
    rope = models.config_of(_config(rope_parameters={**LLAMA31_ROPE, "rope_theta": 5e5})).rope
    assert (rope.rope_type, rope.theta, rope.original_max_position_embeddings) == ("llama3", 5e5, 16)
    assert models.config_of(_config(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1e6)).rope.theta == 1e6
    windows = [models.config_of(_config(model_type=kind, **extra)).layer_windows for kind, extra in [
        ("mistral", {}), ("mistral", {"sliding_window": None}), ("qwen2", {"sliding_window": 8}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1})]]
    assert windows == [(4096, 4096), (None, None), (None, None), (None, 8)]
