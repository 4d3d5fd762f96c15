"""Full fine-tuning of FS-VFM ViT-B/16 for DfD (cross-dataset deepfake detection, trained on FF++ c23): the published recipe (docs/downstream.md)."""

from fsvfm_jax.config import finetune_config


def get_config():
    return finetune_config("base", "dfd")
