"""XLM-R large (560M parameters) fine-tuned in full: batch 64 x group 8, passages of 512 tokens, bf16.

`python -m dret.plan --config ml_configs/xlmr_large.py --model_config ml_configs/xlm-roberta-large.json`
plans it without the weights; training needs the HF folder in model_name_or_path.
"""

from ml_configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model_name_or_path = "xlm-roberta-large"  # an HF folder of FacebookAI/xlm-roberta-large
    c.output_dir = "runs/xlmr_large"
    c.train_data = "data/train.jsonl"
    c.fine_tune_type = "sft"
    c.sentence_pooling_method = "cls"
    c.per_device_train_batch_size = 8  # x 8 devices = 64 queries (dret.plan --global_batch 64 keeps 64 on any count)
    c.train_group_size = 8
    c.query_max_len = 32
    c.passage_max_len = 512
    c.bf16 = True
    c.negatives_cross_device = True
    c.mesh.data, c.mesh.fsdp = 1, -1  # data parallel over 'fsdp', so stage3 shards the weights over every device
    return c
