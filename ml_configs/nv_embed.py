"""The reference's decoder command with NV-Embed-v1: bidirectional Mistral-7B + latent-attention pooling (512
latents, 8 heads), `Instruct: {task}\nQuery: ` before each query (its tokens left out of the pooled mean, as the
model's `is_mask_instruction` says), EOS appended, padding with EOS on the right, temperature 0.01, LoRA on the
seven projections (the latent block stays as the checkpoint has it). `--config.tiny=True` runs it on a random
2-layer bidirectional Llama with a small latent block and SmolLM2's tokenizer, on the built-in data."""

from ml_configs import repllama


def get_config(arg=None):
    c = repllama.get_config(arg)
    c.model_name_or_path = "nvidia/NV-Embed-v1"  # an HF folder of this model (config.json model_type nvembed)
    c.model_type = "nvembed"  # the family of the tiny stand-in
    c.output_dir = "runs/nv_embed"
    c.query_instruction_for_retrieval = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
    c.passage_instruction_for_retrieval = ""
    c.pad_token = "eos_token"
    c.padding_side = "right"
    c.add_bos_token = 1
    c.add_eos_token = 1
    c.sentence_pooling_method = "latent"  # masked mean of the latent block's output, instruction tokens left out
    c.temperature = 0.01  # the reference's decoder command (NV-Embed's paper trains at 0.01 too)
    return c
