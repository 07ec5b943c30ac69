"""`dret.plan` on a decoder: LoRA parameter counts of the RepLLaMA recipe on a small Llama, and a deep model's plan
extrapolated from 2 and 4 layers equals the whole model's compiled plan."""

import jax
import pytest

from dret import plan
from dret.sharding import make_mesh
from ml_configs import repllama

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture
def config():
    c = repllama.get_config()
    c.lora_rank, c.query_max_len, c.passage_max_len, c.gradient_accumulation_steps = 4, 8, 32, 1
    c.lora_dropout, c.recompute = 0.0, False  # compile time: dropout's random bits cost the most
    c.mesh.data, c.mesh.fsdp, c.sharding = 1, -1, "stage3"
    return c


def test_lora_counts(config):
    frozen, trainable = plan.parameter_counts(config, LLAMA)
    # r x (in + out) per adapted matrix: q, o (64 -> 64), k, v (64 -> 32: 2 of 4 heads), gate, up, down; 6 layers
    assert trainable == 6 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert frozen == 4096 * 64 + 64 + 6 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64)


def test_deep_model_extrapolated_from_2_and_4_layers_equals_its_compile(config):
    config.fine_tune_type, config.bf16, config.sharding = "sft", False, ""  # the cheapest step to compile
    config.negatives_cross_device, config.train_group_size = False, 2
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    compiled = plan.plan_stage(config, LLAMA, mesh, 2)
    extrapolated = plan.plan_layers(config, LLAMA, mesh, 2)
    for key, value in compiled.items():
        assert extrapolated[key] == pytest.approx(value, rel=0.02, abs=2 ** 16), key


BERT = dict(model_type="bert", vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=1024, max_position_embeddings=64, hidden_dropout_prob=0.0)


def test_modelled_activations_against_xla_cpu(config, monkeypatch):
    """The activation model without recompute against XLA:CPU's compiled step (float32, sft, no dropout), with XLA's
    attention at 8 tokens so scores are negligible: XLA:CPU keeps 25-35% more than the model (JAX's residuals that
    XLA:GPU fuses away, e.g. GELU's erf term and LayerNorm's centred input), so the model is 0.70-0.85 of it."""
    from dret.models import cpu
    from ml_configs import base

    monkeypatch.setattr(cpu, "active", lambda: False)  # XLA's attention, as on TPU
    c = base.get_config()
    c.sentence_pooling_method, c.train_group_size, c.query_max_len, c.passage_max_len = "cls", 2, 8, 8
    c.per_device_train_batch_size = 16
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    compiled = plan.plan_stage(c, BERT, mesh, 16)["activations"]
    modelled = plan.modelled_activations(c, BERT, mesh, 16, "tpu", recompute=False)
    assert 0.70 < modelled / compiled < 0.85, (modelled, compiled)


def test_modelled_peak_of_the_h200_measurements():
    """bench/RESULTS_gpu.md (H200, BERT-base shape, batch 64 x group 4, query 32 / passage 512, bf16, dropout 0.1):
    measured peaks 59.6 GiB without recompute, 9.8 GiB with it; the model's per-device activations plus 1.50 GiB of
    float32 parameters, AdamW moments and gradients (100.4M parameters)."""
    from dret.plan_memory import Dims, Tuning, activation_bytes

    dims = Dims("bert", 12, 768, 3072, 12, 12, 64, 0.1)
    state = 100_445_184 * 16
    peaks = [(state + activation_bytes(dims, 2, Tuning("sft"), queries=(64, 32), passages=(256, 512), loss_queries=64,
                                       loss_passages=256, recompute=r, flash=True, gathered=False)) / 2 ** 30
             for r in (False, True)]
    assert peaks[0] == pytest.approx(59.6, rel=0.1)
    assert 9.8 < peaks[1] < 9.8 * 1.4  # the model keeps a whole layer's residuals: 36% above the measurement
