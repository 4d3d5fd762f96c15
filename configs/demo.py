"""The CPU demo: the tiny ViT on the bundled demo faces, a few minutes on 2 cores."""

from fsvfm_jax.config import pretrain_config


def get_config():
    c = pretrain_config("tiny")
    c.data.roots = ("demo_data",)
    c.global_batch_size = 16
    c.per_device_batch = 16
    c.data.region_block = 4  # as if 4 GPUs shared the batch, like the published launch
    c.total_steps = 150
    c.warmup_epochs = 1
    c.base_lr = 1.5e-3
    c.log_every_steps = 10
    c.checkpoint.save_interval_steps = 50
    c.image_every_steps = 50
    return c
