"""The reference's decoder command (RepLLaMA): Llama-2-7B + LoRA, `query: q` / `passage: p` between BOS and EOS,
last-token pooling, temperature 0.01, negatives from every device, ZeRO-3 with the optimizer state on the host.
`--config.tiny=True` runs it on a random 2-layer Llama with SmolLM2's tokenizer and the built-in data."""

from ml_configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model_name_or_path = "meta-llama/Llama-2-7b-hf"  # an HF folder of this model (or a .gguf file)
    c.model_type = "llama"  # the family of the tiny stand-in
    c.output_dir = "runs/repllama"
    c.train_data = "data/dureader_dual.train.jsonl"
    c.query_instruction_for_retrieval = "query: "
    c.passage_instruction_for_retrieval = "passage: "
    c.add_bos_token = 1
    c.add_eos_token = 1  # the last token, which pooling reads, is EOS
    c.sentence_pooling_method = "last"
    c.fine_tune_type = "lora"  # r=32, alpha=64, dropout 0.1 on q/k/v/o/gate/up/down (base.py's defaults)
    c.per_device_train_batch_size = 1
    c.gradient_accumulation_steps = 32
    c.train_group_size = 4
    c.query_max_len = 128
    c.passage_max_len = 4096
    c.learning_rate = 1e-4
    c.warmup_steps = 100
    c.num_train_epochs = 1
    c.temperature = 0.01
    c.negatives_cross_device = True
    c.bf16 = True
    c.recompute = True
    c.sharding = "stage3 offload"
    c.save_steps = 100
    c.logging_steps = 1
    return c
