"""`dret.plan` on a decoder: a 2-layer, 64-wide Llama with LoRA (the RepLLaMA recipe, shrunk), planned in-process on
8 fake devices with FSDP, so stage3 shards the (large-vocabulary) frozen embedding and changes the answer."""

import json

from ml_configs import repllama

from dret import plan

GiB = 2 ** 30
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2 ** 20, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}


def test_decoder_lora_plan_has_a_row_per_stage_small_adapters_and_fits_by_peak(tmp_path):
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(TINY_LLAMA))
    config = repllama.get_config()
    with config.unlocked():
        config.lora_rank = 4
        config.query_max_len, config.passage_max_len = 8, 16
        # compile time: four train steps on 2 cores; LoRA dropout's random bits cost the most
        config.lora_dropout, config.recompute, config.gradient_accumulation_steps = 0.0, False, 1
        config.mesh.data, config.mesh.fsdp = 1, -1
    frozen, trainable = plan.parameter_counts(config, TINY_LLAMA)
    # r x (in + out) per adapted matrix: q, k, v, o (64 -> 64), gate, up (64 -> 128), down (128 -> 64), 2 layers
    assert trainable == 2 * 4 * (4 * (64 + 64) + 3 * (64 + 128))
    assert frozen > 1000 * trainable

    memory = 128 * 2 ** 20  # the float32 embedding alone is 256 MiB: only stage3 (an eighth per device) fits
    table = plan.plan(config, 8, memory, model_config=str(model_config))
    header, _, _, _, *rows = table.split("\n")
    assert f"{plan.count(frozen)} frozen + {plan.count(trainable)} trainable parameters" in header
    cells = [row.strip("| ").split(" | ") for row in rows if row.startswith("|")]
    assert [c[0] for c in cells] == ["none offload", "stage1 offload", "stage2 offload", "stage3 offload"]
    assert [c[-1] for c in cells] == ["yes" if float(c[-2]) * GiB <= memory else "no" for c in cells]
    assert [c[-1] for c in cells] == ["no", "no", "no", "yes"]
    assert "XLA reported 0.00 GiB of host memory" in table
