"""The reference's decoder command with bge-en-icl: Mistral-7B, queries `{examples}<instruct>{task}\n<query>{q}
\n<response>` with 0-5 in-context examples drawn from the same training file's other rows, passages plain, EOS
appended, left padding, last-token pooling, temperature 0.02 (FlagEmbedding's), LoRA; `<instruct>`, `<query>` and
`<response>` are added as special tokens where the tokenizer lacks them (new embedding rows, trained and exported).
Queries get 2048 tokens so that examples fit. `--config.tiny=True` runs it on a random 2-layer Llama with SmolLM2's
tokenizer, on the built-in data."""

from ml_configs import repllama


def get_config(arg=None):
    c = repllama.get_config(arg)
    c.model_name_or_path = "BAAI/bge-en-icl"  # an HF folder of this model
    c.model_type = "mistral"  # the family of the tiny stand-in
    c.output_dir = "runs/bge_en_icl"
    c.prompt_format = "bge_icl"
    c.query_instruction_for_retrieval = "Given a web search query, retrieve relevant passages that answer the query"
    c.passage_instruction_for_retrieval = ""
    c.pad_token = "eos_token"
    c.padding_side = "left"
    c.add_bos_token = 1
    c.add_eos_token = 1
    c.sentence_pooling_method = "last"
    c.query_max_len = 2048  # the task, the query and up to 5 examples (an example that does not fit is left out)
    c.temperature = 0.02
    return c
