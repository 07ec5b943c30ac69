"""The reference's single-GPU RocketQA example: encoder, cls pooling, group 4, Matryoshka."""

from ml_configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model_name_or_path = "rocketqa-zh-base-query-encoder"  # an HF folder of this model
    c.output_dir = "runs/rocketqa"
    c.train_data = "data/dureader_dual.train.jsonl"
    c.fine_tune_type = "sft"
    c.sentence_pooling_method = "cls"
    c.num_train_epochs = 3
    c.per_device_train_batch_size = 64
    c.learning_rate = 3e-5
    c.train_group_size = 4
    c.recompute = True
    c.passage_max_len = 512
    c.use_matryoshka = True
    return c
