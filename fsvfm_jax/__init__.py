"""fsvfm_jax: pretrain FS-VFM face-security vision foundation models in JAX/Flax."""

__version__ = "0.1.0"
