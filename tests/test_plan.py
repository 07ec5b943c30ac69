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
