"""The pretraining recipe as an ``ml_collections.ConfigDict``.

``configs/*.py`` call :func:`pretrain_config` with the published per-size settings (docs/method.md, "Recipes"); every
field can be overridden on the command line (``--config.epochs=400``). Durations are epochs unless
``total_steps`` is set (smoke runs).
"""

from __future__ import annotations

import ml_collections

# Published scripts: 4 GPUs x per-GPU batch x accum_iter = 4096 for every size (no script for huge).
PUBLISHED_ACCUM = {"small": 2, "base": 4, "large": 4, "huge": 4}
PUBLISHED_PER_GPU_BATCH = {"small": 512, "base": 256, "large": 256, "huge": 256}


def pretrain_config(size: str = "base") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.size = size
    c.model.img_size = 224
    c.model.rep_decoder_pos_embed = "zeros"  # published checkpoints; "sincos" is an option
    c.model.dtype = "float32"  # activations; "bfloat16" for speed on accelerators (params stay fp32)
    c.model.remat = False
    c.model.matmul_precision = "default"  # "highest" forces full fp32 matmuls on GPU/TPU

    c.data = ml_collections.ConfigDict()
    c.data.roots = ()  # one or more dataset roots in the published layout
    c.data.mean_std_file = ""  # pretrain_ds_mean_std.txt; empty: <first root>/pretrain_ds_mean_std.txt
    # "dataset": the stats file (tools/stats.py), an error when missing; "vggface2" / "imagenet": the
    # published constants ("imagenet" is the published --normalize_from_IMN)
    c.data.normalize = "dataset"
    c.data.worker_count = 0
    c.data.skip_bad = False
    c.data.mask_strategy = "crfrp"
    # Images per CRFR-P region draw over the global batch: the published per-GPU batch (one draw per
    # GPU micro-batch); 1 draws per image (docs/method.md, "Region draws").
    c.data.region_block = PUBLISHED_PER_GPU_BATCH.get(size, 256)
    c.data.simple_augment = False  # published --apply_simple_augment, applied to image and map together
    c.data.mask_ratio = 0.75

    c.global_batch_size = 4096  # effective batch per optimizer step, all hosts and micro-batches
    c.accum_steps = PUBLISHED_ACCUM.get(size, 1)
    c.epochs = 600
    c.warmup_epochs = 40
    c.total_steps = 0  # > 0 overrides epochs (the schedule then spans total_steps)
    c.stop_at_step = 0  # > 0 ends this run after that step (checkpointed), e.g. for job time limits
    c.base_lr = 1.5e-4  # lr = base_lr * global_batch_size / 256
    c.min_lr = 0.0
    c.weight_decay = 0.05
    c.b1 = 0.9
    c.b2 = 0.95
    c.clip_grad = 1.0

    c.loss = ml_collections.ConfigDict()
    c.loss.norm_pix = True
    c.loss.weight_fr = 0.007
    c.loss.weight_cl = 0.1
    c.loss.cl_loss = "simsiam"
    c.loss.temperature = 0.1
    c.loss.positives_only = False

    c.ema = ml_collections.ConfigDict()
    c.ema.momentum = 0.996
    c.ema.final_momentum = 1.0
    c.ema.cadence = "step"  # "step" (paper intent), "micro" (published per-micro-batch), "frozen"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**16

    c.log_every_steps = 50
    # Observability (docs/observability.md): TensorBoard pictures of masks and reconstructions every
    # N steps (0: never); a jax.profiler trace of steps (a, b) into the workdir; a persistent
    # compilation cache directory ("": JAX's own setting).
    c.image_every_steps = 1000
    c.profile_steps = ()
    c.compilation_cache_dir = ""
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    return c
