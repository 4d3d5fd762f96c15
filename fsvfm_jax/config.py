"""The pretraining recipe as an ``ml_collections.ConfigDict``.

``configs/*.py`` call :func:`pretrain_config` with the published per-size settings (docs/method.md, "Recipes"); every
field can be overridden on the command line (``--config.epochs=400``). Durations are epochs unless
``total_steps`` is set (smoke runs).
"""

from __future__ import annotations

import ml_collections

# Published scripts: 4 GPUs x per-GPU batch x accum_iter = 4096 for every size (no script for huge).
# The per-GPU micro-batch is also our per-device cap, so 4 devices reproduce the published
# accumulation (2 for small, 4 for the others).
PUBLISHED_PER_GPU_BATCH = {"small": 512, "base": 256, "large": 256, "huge": 256}
# Sizes whose replicated train state would crowd a 16 GiB chip shard it over a host's devices
# (docs/pod.md has the memory numbers); smaller ones stay data-parallel.
FSDP_OVER_HOST = ("large", "huge")


def pretrain_config(size: str = "base") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.size = size
    c.model.img_size = 224
    c.model.rep_decoder_pos_embed = "zeros"  # published checkpoints; "sincos" is an option
    c.model.dtype = "auto"  # activations: "auto" = bfloat16 on GPU/TPU, float32 on CPU (params stay fp32)
    # recompute block activations in backward: "none" | "full" | "dots_saveable" | "dense_saveable";
    # "auto" = "dense_saveable" on CPU (less memory and no slower there), "none" on GPU/TPU
    c.model.remat = "auto"
    c.model.scan_blocks = False  # nn.scan over blocks: faster compiles at L/H; checkpoints unchanged
    c.model.matmul_precision = "default"  # "highest" forces full fp32 matmuls on GPU/TPU

    c.data = ml_collections.ConfigDict()
    c.data.roots = ()  # one or more dataset roots in the published layout
    # Instead of roots: "tfds:NAME" (e.g. tfds:fsvfm_faces/vggface2, built by fsvfm-to-tfds) from
    # tfds_data_dir (local or gs://), read through tfds.data_source (docs/data.md, "TFDS datasets")
    c.data.source = ""
    c.data.tfds_data_dir = ""
    c.data.tfds_split = "train"
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
    c.per_device_batch = PUBLISHED_PER_GPU_BATCH.get(size, 256)  # the most one device runs at once
    c.accum_steps = 0  # 0: derived, global / (devices x per-device micro-batch); > 0 forces it
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
    c.max_nonfinite_steps = 10  # consecutive skipped (non-finite) steps before the run stops

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
    c.mesh.dcn_data = 1  # slices (TPU) or hosts (GPU) joined by the data-centre network
    c.mesh.data = -1
    c.mesh.fsdp = 0  # 0: the size's default (a host's devices for large/huge, else 1)
    c.mesh.fsdp_min_size = 2**16

    c.log_every_steps = 50
    # Observability (docs/observability.md): TensorBoard pictures of masks and reconstructions every
    # N steps (0: never); a jax.profiler trace of steps (a, b) into the workdir; a persistent
    # compilation cache directory ("": JAX's own setting).
    c.image_every_steps = 1000
    c.profile_steps = ()
    c.compilation_cache_dir = ""

    c.checkpoint = ml_collections.ConfigDict()  # docs/pod.md, "Checkpoints and preemption"
    c.checkpoint.save_interval_steps = 1000  # also saved at the last step and on preemption/SIGTERM
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True  # False: synchronous saves (async multi-host saves hang on some clusters)
    return c


# Published fine-tuning recipes (docs/downstream.md, "Recipes"): per task and size,
# (base_lr, layer_decay, weight_decay); 2 GPUs x 32 = batch 64, 10 epochs, 5 of them warmup.
FINETUNE_RECIPES = {
    ("dfd", "small"): (2e-4, 0.65, 0.03), ("dfd", "base"): (2e-4, 0.60, 0.03), ("dfd", "large"): (5e-5, 0.90, 0.01),
    ("diff", "small"): (5e-5, 0.95, 0.05), ("diff", "base"): (5e-5, 0.90, 0.03), ("diff", "large"): (5e-5, 0.90, 0.05),
}
# FS-Adapter (DfD/DiFF): (global batch, epochs, base_lr, weight_cl); wd 0 and layer decay 0.
ADAPTER_RECIPES = {
    ("dfd", "small"): (512, 60, 1e-3, 0.01), ("dfd", "base"): (256, 50, 5e-3, 0.01), ("dfd", "large"): (256, 50, 1e-2, 0.1),
    ("diff", "small"): (256, 60, 1e-2, 0.01), ("diff", "base"): (256, 50, 1e-2, 0.05), ("diff", "large"): (1024, 50, 5e-3, 0.1),
}


def finetune_config(size: str = "base", task: str = "dfd", adapter: bool = False) -> ml_collections.ConfigDict:
    """The published DfD/DiFF fine-tuning recipe for ``size`` (full, or FS-Adapter on a frozen
    backbone). Data paths and the starting checkpoint come from the command line."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.size = size
    c.model.img_size = 224
    c.model.num_classes = 2
    c.model.global_pool = True
    c.model.drop_path = 0.1
    c.model.head = "fs_adapter" if adapter else "linear"
    c.model.adapter_reduction = 4
    c.model.embedder = False  # the published FAS head (embedder + normalised classifier)
    c.model.dtype = "float32"
    c.model.remat = False

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # our workdir (or its checkpoints/<step>), an imported workdir, a .pth or timm export
    c.init.step = 0  # a workdir's step; 0 = its latest
    c.init.random = False  # no checkpoint: a randomly initialised ViT (a baseline)

    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # ROOT/{train,val,test}/<class>/ images
    c.data.train = ""  # or list files (override the root's splits)
    c.data.val = ""
    c.data.test = ()  # extra test sets: roots (their test/ split) or list files
    c.data.class_map = {"real*": 1, "fake*": 0}  # class name patterns -> label; real = 1
    c.data.video_sep = "_frame_"
    c.data.mean_std_file = ""  # default: the checkpoint's pretrain_ds_mean_std.txt
    c.data.normalize = ""  # "vggface2" / "imagenet": the published constants instead
    c.data.skip_bad = False
    c.data.worker_count = 0
    c.data.read_threads = 2
    c.data.val_resize = "center_crop"  # published validation: Resize(256) + CenterCrop(224)
    c.data.test_resize = "resize"  # published test scripts: Resize((224, 224))
    # "shuffled" (DfD/DiFF); "paired": each real image next to the fake of the same name (self-blended
    # fakes); "balanced": fas.per_group images per (source domain, class) (the FAS protocol)
    c.data.sampler = "shuffled"

    c.aug = ml_collections.ConfigDict()
    c.aug.kind = "timm"  # RandomResizedCrop + flip + RandAugment m9 + random erasing; "fas"; "none"
    c.aug.rand_augment_ops = 2
    c.aug.magnitude = 9.0
    c.aug.magnitude_std = 0.5
    c.aug.reprob = 0.25

    c.mixup = ml_collections.ConfigDict()
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.mixup.prob = 1.0
    c.mixup.switch_prob = 0.5
    c.smoothing = 0.1

    c.loss = ml_collections.ConfigDict()
    c.loss.weight_cl = 0.0
    c.loss.temperature = 0.07

    c.optimizer = "adamw"  # "adam": the FAS recipe (L2 decay in the gradient, no layer decay)
    c.global_batch_size = 64
    c.accum_steps = 1
    c.epochs = 10
    c.warmup_epochs = 5
    c.total_steps = 0  # > 0 overrides epochs
    c.schedule = "cosine"  # "constant": the FAS recipe
    c.base_lr, c.layer_decay, c.weight_decay = FINETUNE_RECIPES.get((task, size), (2e-4, 0.65, 0.03))
    c.lr = 0.0  # > 0: absolute lr, overrides base_lr * batch / 256
    c.min_lr = 1e-6
    c.b1 = 0.9
    c.b2 = 0.999
    c.clip_grad = 0.0
    if adapter:
        c.global_batch_size, c.epochs, c.base_lr, c.loss.weight_cl = ADAPTER_RECIPES.get((task, size), (256, 50, 5e-3, 0.1))
        c.weight_decay, c.layer_decay = 0.0, 0.0

    c.eval_every_steps = 0  # 0: once per epoch (model selection on the lowest validation loss)
    c.select_on = "val_loss"  # the published selection; "val_auc": the highest validation AUC
    c.test_every_steps = 0  # > 0: also evaluate the test sets every N steps (the published FAS reporting)

    # Cross-domain FAS (docs/downstream.md, "FAS protocol"): a leave-one-out protocol by name (M, C,
    # I, O, cefa, surf, wmca; OCI2M...) or your own sources + target, from domain folders/lists below roots
    c.fas = ml_collections.ConfigDict()
    c.fas.protocol = ""
    c.fas.sources = ()
    c.fas.target = ""
    c.fas.roots = ()  # searched in order for each domain; empty: data.root
    c.fas.per_group = 12  # images per (source, class) in every batch
    c.fas.source_val = True  # the sources' test splits validate (selection, HTER threshold)
    c.fas.test_frame1 = True  # published lists: test on frame0 and frame1 of every listed video
    c.fas.video_sep = ""  # frame name -> video id; empty: the protocol's (MCIO "frame", WCS r"re:\d\d\.jpg$")
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**16
    c.log_every_steps = 20
    c.keep_checkpoints = 2
    return c


def compute_dtype(name: str, platform: str) -> str:
    """``model.dtype`` for a backend: ``"auto"`` is bfloat16 on accelerators, float32 on CPU."""
    if name == "auto":
        return "float32" if platform == "cpu" else "bfloat16"
    return name


def remat_policy(name: str, platform: str) -> str:
    """``model.remat`` for a backend. ``"auto"`` is ``"dense_saveable"`` on CPU: it measured
    as fast as no remat or faster, with 20-40% less peak memory (docs/performance.md);
    on GPU/TPU it is ``"none"``, the policy with no recomputation (not measured against the
    others on an accelerator)."""
    if name == "auto":
        return "dense_saveable" if platform == "cpu" else "none"
    return name


def fsdp_size(config: ml_collections.ConfigDict, local_devices: int) -> int:
    """``mesh.fsdp``, with 0 resolved to the size's default."""
    if config.mesh.fsdp:
        return config.mesh.fsdp
    return local_devices if config.model.size in FSDP_OVER_HOST else 1


def accum_steps(config: ml_collections.ConfigDict, devices: int) -> int:
    """Micro-batches per optimizer step: ``accum_steps`` when set, else the fewest that keep every
    device at or under ``per_device_batch`` images."""
    if config.accum_steps:
        return config.accum_steps
    gb = config.global_batch_size
    if gb % devices:
        raise ValueError(f"global batch {gb} does not divide over the {devices} devices; choose a multiple of {devices}")
    per_device = gb // devices
    if config.per_device_batch < 1:
        raise ValueError(f"per_device_batch must be >= 1 (or set accum_steps), got {config.per_device_batch}")
    if per_device <= config.per_device_batch:
        return 1
    if per_device % config.per_device_batch:
        raise ValueError(
            f"global batch {gb} over {devices} devices is {per_device} images per device, not a multiple of "
            f"per_device_batch={config.per_device_batch}: choose a per-device batch dividing {per_device}")
    return per_device // config.per_device_batch


# Published cross-domain FAS scripts: (lr, weight decay) per size; Adam with L2 decay, no schedule.
FAS_RECIPES = {"small": (2.5e-5, 1e-6), "base": (2.5e-5, 1e-6), "large": (1e-5, 1e-5)}


def fas_config(size: str = "base", protocol: str = "M") -> ml_collections.ConfigDict:
    """The published leave-one-domain-out FAS recipe (docs/downstream.md, "FAS protocol"): full
    fine-tuning with the embedder + normalised classifier head, 12 bona fide + 12 attack images
    per source domain per step, Adam at a constant lr, 4000 steps, the target evaluated every 100."""
    from fsvfm_jax.data.fas import FAS_CLASS_MAP

    c = finetune_config(size)
    c.fas.protocol = protocol
    c.data.sampler = "balanced"
    c.data.class_map = dict(FAS_CLASS_MAP)
    c.data.val_resize = c.data.test_resize = "resize"
    c.global_batch_size = 0  # from the sampler: per_group x 2 x sources (96 for MCIO, 72 for WCS)
    c.model.embedder = True
    c.model.drop_path = 0.0
    c.aug.kind = "fas"
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.smoothing = 0.0
    c.optimizer, c.schedule = "adam", "constant"
    c.lr, c.weight_decay = FAS_RECIPES.get(size, (2.5e-5, 1e-6))
    c.layer_decay = 1.0
    c.total_steps = 4000
    c.warmup_epochs = 0
    c.eval_every_steps = 100
    c.test_every_steps = 100
    c.log_every_steps = 100
    return c
