"""Every training field, one comment each. Names and defaults follow the reference example's flags."""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    # Model and output.
    c.model_name_or_path = ""  # HF / sentence-transformers folder (config.json + safetensors)
    c.allow_pickle = False  # read pytorch_model.bin (a pickle) only when explicitly allowed
    c.output_dir = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events, export/
    c.overwrite_output_dir = False  # start over: delete what dret wrote in output_dir (else an earlier run is resumed)
    c.dry_run = False  # check config, output_dir, model folder and training files, say what the run would do, stop
    c.fine_tune_type = "sft"  # sft (all weights) | lora (qwix adapters) | bitfit (biases only)
    c.model_type = ""  # family of a tiny run without a model folder: bert | llama | mistral | qwen2 | nvembed; "" = bert
    c.sentence_pooling_method = "cls"  # cls | mean | last | last_8 | latent (NV-Embed's block, then the mean)
    c.normalized = True  # L2-normalise embeddings before scoring
    # Data.
    c.train_data = ""  # a .jsonl file or a folder of them, rows {"query", "pos": [...], "neg": [...]}
    c.max_example_num_per_dataset = 100000000  # rows kept per file
    c.train_group_size = 8  # 1 positive + (train_group_size - 1) negatives per query
    c.query_max_len = 32  # query tokens (truncated right, padded)
    c.passage_max_len = 512  # passage tokens (truncated right, padded)
    c.query_instruction_for_retrieval = ""  # prefix added to every query
    c.passage_instruction_for_retrieval = ""  # prefix added to every passage
    c.prompt_format = ""  # "" (instruction + text) | bge_icl (in-context examples) | llara (dret.prompts)
    c.pad_token = ""  # unk_token | eos_token | pad_token: the token padding uses; "" = the tokenizer's (else unk, else eos)
    c.padding_side = "right"  # right | left: where batches are padded (the vectors are the same either way)
    c.add_bos_token = -1  # 1: every text starts with BOS, 0: none, -1: as the tokenizer does
    c.add_eos_token = -1  # 1: every text ends with EOS (last-token pooling reads it), 0: none, -1: as the tokenizer does
    c.skip_bad_rows = False  # skip and count malformed rows instead of stopping with file:line
    c.data_cache_dir = ""  # train_data as Arrow; "" = ~/.cache/huggingface/datasets/dret_train ($HF_DATASETS_CACHE)
    # Optimisation.
    c.num_train_epochs = 1  # passes over the data (max_steps wins when > 0)
    c.max_steps = -1  # optimizer steps; -1 = from num_train_epochs
    c.per_device_train_batch_size = 8  # queries per data-parallel device per micro-batch
    # Micro-batches per optimizer step (scanned inside the step). Each micro-batch's queries are scored against that
    # micro-batch's passages only (all devices' with negatives_cross_device): accumulation averages gradients but
    # shrinks the negative pool to a micro-batch, unlike one batch of the same size.
    c.gradient_accumulation_steps = 1
    c.learning_rate = 3e-5  # peak AdamW learning rate
    c.warmup_steps = 0  # linear warmup steps, then linear decay to 0
    c.weight_decay = 0.0  # AdamW weight decay (never on biases and norms)
    c.max_grad_norm = 1.0  # global gradient clipping; 0 = off
    c.max_nonfinite_steps = 5  # abort after this many non-finite steps in a row (each is skipped)
    c.seed = 42  # data order, dropout, LoRA init
    # Loss.
    c.temperature = 0.02  # scores are divided by it
    c.use_inbatch_neg = False  # score each query against every passage of the batch (see dret.losses)
    c.negatives_cross_device = False  # passages of all devices are negatives (the global batch)
    c.margin = 0.2  # subtracted from the positive's score with use_inbatch_neg
    c.use_matryoshka = False  # add the losses of truncated embeddings
    c.matryoshka_dims = (64, 128, 256, 512, 768)  # truncation sizes (each <= hidden size; tiny runs drop larger ones)
    c.matryoshka_loss_weights = (1.0, 1.0, 1.0, 1.0, 1.0)  # one weight per dim
    # Precision and memory.
    c.bf16 = False  # bfloat16 compute, float32 master weights
    c.fp16 = False  # float16 compute with dynamic loss scaling, float32 master weights
    c.fp8 = False  # Linear layers' matmuls in FP8 (e4m3, e5m2 gradients; needs bf16), the rest bf16 (dret.models.fp8)
    c.fp16_opt_level = "O1"  # O0: fp32 compute; O1: fp16 matmuls, fp32 norms/softmax/loss; O2 is O1 here (warned)
    c.recompute = False  # rematerialise each layer in the backward pass (nnx.remat)
    c.use_flash_attention = False  # changes nothing (warned): GPUs use cuDNN flash attention in half precision
    c.sharding = ""  # "" | stage1 | stage2 | stage3, optionally + " offload"
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # device mesh; -1 = the rest
    # LoRA (fine_tune_type=lora).
    c.lora_rank = 32  # adapter rank r
    c.lora_alpha = 64  # scale alpha / r
    c.lora_dropout = 0.1  # dropout on the adapter input
    c.lora_target_modules = ()  # module names that get adapters; () = the family's defaults (BERT: query, key, value)
    # Checkpoints and logs.
    c.save_steps = 500  # checkpoint every N optimizer steps (and at the end)
    c.save_total_limit = 3  # checkpoints kept
    c.logging_steps = 10  # a log line, metrics.jsonl row and TensorBoard scalars every N steps
    c.eval_data = ""  # a BEIR folder evaluated during training (metrics logged as eval_*); "" = none
    c.eval_split = "test"  # its qrels/<split>.tsv
    c.eval_steps = 100  # evaluate every N steps and at the end
    c.tiny = False  # random 2-layer, 64-wide model of the same family; built-in data when train_data is ""
    return c
