"""Cross-domain FAS with FS-VFM ViT-Base/16: the published leave-one-domain-out recipe (docs/downstream.md,
"FAS protocol"). The protocol follows a colon: `--config=configs/fas_vit_base.py:O` (M, C, I, O, cefa, surf, wmca)."""

from fsvfm_jax.config import fas_config


def get_config(protocol: str = "M"):
    return fas_config("base", protocol)
