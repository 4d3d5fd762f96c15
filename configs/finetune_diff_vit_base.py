"""Full fine-tuning of FS-VFM ViT-B/16 for DiFF (unseen diffusion forgeries, trained on FF++ DeepFakes): the published recipe (docs/downstream.md)."""

from fsvfm_jax.config import finetune_config


def get_config():
    return finetune_config("base", "diff")
