"""Checkpoint interop with PyTorch: timm export, the published FSFM ``.pth`` layout, imports.

* :mod:`~fsvfm_jax.convert.fsfm_layout`: published state-dict keys <-> our trees (pure numpy).
* :mod:`~fsvfm_jax.convert.pth`: torch-free, restricted ``.pth`` reader; ``.pth`` writer (torch).
* :mod:`~fsvfm_jax.convert.fsfm_checkpoint`: published checkpoint files, size recognition.
* :mod:`~fsvfm_jax.convert.timm_export`: timm model folders (``config.json`` + ``model.safetensors``,
  loadable with ``timm.create_model("local-dir:...", pretrained=True)``) and
  :func:`~fsvfm_jax.convert.timm_export.load_encoder_for_finetune`.
* :mod:`~fsvfm_jax.convert.pos_embed`: bicubic position-table resampling, as torch does it.
* :mod:`~fsvfm_jax.convert.train_state`: pretraining workdirs <-> host numpy trees.

Only writing ``.pth`` needs torch (the ``[torch]`` extra); everything else is numpy, JAX, Orbax
and safetensors.
"""
