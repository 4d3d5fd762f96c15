"""FS-VFM ViT-L/16: the published recipe (docs/method.md, "Recipes"): global batch 4096, 600 epochs, blr 1.5e-4,
warmup 40, wd 0.05, mask ratio 0.75, CRFR-P, SimSiam self-distillation."""

from fsvfm_jax.config import pretrain_config


def get_config():
    return pretrain_config("large")
