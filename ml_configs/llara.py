"""The reference's decoder command with LLARA-passage: Llama-2-7B, each text between `"` and an instruction to
summarise it (passages: `", summarize the above passage within eight words: <s1>..<s8>`) or to predict its passage
(queries: `<s9>..<s16>`), the 16 markers added as special tokens, the mean of the last 8 tokens (`last_8`: the
markers), BOS and no EOS, temperature 0.01 (the reference's decoder command), LoRA. The text is cut so that the
markers always fit. `--config.tiny=True` runs it on a random 2-layer Llama with SmolLM2's tokenizer, on the
built-in data."""

from ml_configs import repllama


def get_config(arg=None):
    c = repllama.get_config(arg)
    c.model_name_or_path = "BAAI/LLARA-passage"  # an HF folder of this model
    c.model_type = "llama"  # the family of the tiny stand-in
    c.output_dir = "runs/llara"
    c.prompt_format = "llara"
    c.query_instruction_for_retrieval = ""  # the format is the instruction
    c.passage_instruction_for_retrieval = ""
    c.add_bos_token = 1
    c.add_eos_token = 0  # the last 8 tokens are the markers
    c.sentence_pooling_method = "last_8"
    return c
