"""The configuration schema: one dataclass per pipeline stage, merged by OmegaConf.

This module is the single source of truth for settings. A config is built as
``schema <- YAML file <- key=value overrides`` and validated before any Ray work, so every
mistake a user can make (unknown key, wrong type, value out of range, missing URI) stops the
program with one :class:`ConfigError` that names the full key.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tsgd_ray.errors import UserError

MAX_IPC = 50  # the most synthetic videos per class; the statistics pass keeps this many init candidates


class ConfigError(UserError, ValueError):
    """A user error in the configuration; the message names the full key."""


class DatasetKind(str, enum.Enum):
    builtin = "builtin"  # the built-in motion-digits set, generated under storage.cache_root
    ucf101 = "ucf101"  # UCF-101/<Class>/*.avi with ucfTrainTestlist/
    hmdb51 = "hmdb51"  # <class>/*.avi with testTrainMulti_7030_splits/
    kinetics = "kinetics"  # Kinetics-400/600/700: annotation CSVs, nested or flat video folders
    ssv2 = "ssv2"  # Something-Something v2: <id>.webm with labels.json, train.json, validation.json
    csv = "csv"  # a path,label[,split] CSV in data.annotations
    folder = "folder"  # [train|val|test/]<class>/<video> folders


class OnCatalogError(str, enum.Enum):
    error = "error"  # stop, naming the count and 5 examples
    skip = "skip"  # skip them and list them in the shard manifest


class TemporalSampling(str, enum.Enum):
    center = "center"  # F frames every `frame_interval`, centred in the video
    random = "random"  # F frames every `frame_interval`, random offset (seeded per video, epoch)
    uniform = "uniform"  # F frames spread evenly over the whole video; interval ignored


class BNTarget(str, enum.Enum):
    global_ = "global"  # the teacher's running statistics (the paper, SRe2L)
    class_mixture = "class_mixture"  # the real statistics of the classes in the batch, weighted by their share
    mixed = "mixed"  # half each (EDC): the class's statistics and the teacher's running statistics


class InitKind(str, enum.Enum):
    real = "real"  # IPC real clips per class, drawn with the seed
    lowest_loss = "lowest_loss"  # the IPC clips per class the teacher finds easiest (RDED-style)
    noise = "noise"  # Gaussian noise, for ablations (the saliency map is then meaningless)


class Compensation(str, enum.Enum):
    none = "none"  # raw frame differences (the paper)
    median = "median"  # subtract each difference map's median (a global change of brightness or a pan)
    shift = "shift"  # align each frame to the previous one by the best integer translation first


class Granularity(str, enum.Enum):
    pixel = "pixel"  # a weight per pixel and frame
    frame = "frame"  # one weight per frame (the mean over its pixels)


class LabelKind(str, enum.Enum):
    soft_kl = "soft_kl"  # KL to the teacher's softened outputs on each augmented batch, times T^2
    soft_mse = "soft_mse"  # MSE to the teacher's logits plus evaluate.mse_ce_weight * CE (Video-DC)
    hard = "hard"  # cross-entropy with the class labels (the older protocol)


class TSGFApply(str, enum.Enum):
    update = "update"  # x <- x_prev + W * (x_new - x_prev) after each optimiser step (METHOD.md)
    gradient = "gradient"  # grad <- grad * W before the step: the paper's words, cancelled by Adam


class SaliencySource(str, enum.Enum):
    init = "init"  # the map of the real clip recovery started from, fixed
    current = "current"  # the map of the synthetic clip, recomputed every tsgf.every steps


class Method(str, enum.Enum):
    tsgd = "tsgd"  # recovery with TSGF (TSGFO), students with TSGFA
    sre2l_video = "sre2l_video"  # recovery without TSGF
    random_real = "random_real"  # IPC seeded real clips per class, not optimised
    herding = "herding"  # the clips nearest the class mean of teacher features (benchmarks only)
    full = "full"  # the student trained on every real training clip (the ceiling)


class BuiltinVariant(str, enum.Enum):
    plain = "plain"  # one moving digit over a static texture, a still camera
    # plus static distractor digits, a panning and shaking camera, and flicker: motion saliency
    # must be told apart from camera motion (tsgf.compensate)
    cluttered = "cluttered"


@dataclass
class BuiltinDatasetConfig:
    """The built-in motion-digits dataset: only the order of frames tells classes apart."""

    variant: BuiltinVariant = BuiltinVariant.plain  # how hard the scene is

    train_per_class: int = 60  # training videos per class
    test_per_class: int = 20  # test videos per class
    frames: int = 16  # frames per video
    size: int = 64  # frame height and width, pixels
    fps: int = 8  # frame rate written into the mp4 files
    seed: int = 0  # seed of the generator (textures, digits, motion)


@dataclass
class DataConfig:
    dataset: DatasetKind = DatasetKind.builtin  # the layout of data.root
    # Dataset root (videos and annotation files): a local path or any fsspec URI (s3://...).
    # Required unless dataset=builtin.
    root: str = ""
    # Annotation file or folder when it does not sit at its usual place under `root`
    # (UCF101 split lists, HMDB51 split folder, Kinetics CSV folder, SSv2 JSON folder, CSV file).
    annotations: str = ""
    split_id: int = 1  # UCF101 / HMDB51 official split, 1..3
    classes: list[str] = field(default_factory=list)  # restrict to these class names (e.g. MiniUCF)
    on_catalog_error: OnCatalogError = OnCatalogError.error  # missing files, unknown labels
    # Video file extensions a catalog picks up (case-insensitive).
    extensions: list[str] = field(default_factory=lambda: ["mp4", "avi", "mkv", "webm", "mov", "mpg", "mpeg"])
    builtin: BuiltinDatasetConfig = field(default_factory=BuiltinDatasetConfig)
    # Shards: where `prepare` writes them; empty means <storage.output_root>/shards.
    shards: str = ""
    shard_target_mb: float = 256.0  # about this many MB of video bytes per Parquet shard
    transcode_short_side: int = 0  # 0 keeps the source bytes; >0 re-encodes to this short side
    prepare_concurrency: int = 0  # parallel shard writers; 0 = one per CPU of the cluster
    # Clips decoded from the shards.

    num_frames: int = 16  # frames per clip
    height: int = 112  # clip height after resizing, pixels
    width: int = 112  # clip width after resizing, pixels
    sampling: TemporalSampling = TemporalSampling.uniform  # which frames a clip takes
    frame_interval: int = 2  # frames between sampled frames (center and random sampling)
    decode_actors: int = 1  # Ray Data actors decoding clips (the most an autoscaling pool grows to)
    decode_cpus_per_actor: float = 0.5  # CPUs Ray reserves for each decoding actor
    decode_batch_size: int = 64  # videos per decode batch (and per Ray Data block and clip-cache file)
    # Decode each clip once: write the decoded clips of a split as Parquet under the output root
    # (<output_root>/clips/) and let teacher epochs, the `full` baseline and every evaluation seed
    # read them (uint8 F x H x W x 3 per clip: about 0.6 MB at 16x112x112, so Kinetics-400's train
    # split needs ~145 GB per view); false: decode live on every pass (no disk; random sampling
    # then needs the cache, see views_per_video).
    clip_cache: bool = True
    # sampling=random: windows cached per video; epoch e trains on window e % views_per_video
    views_per_video: int = 4
    # Deliver clips in shard order whatever decoder finishes first, so that a run is reproducible
    # from its config and seed; false: as decoded (a little faster on large clusters).
    preserve_order: bool = True
    # The split students are tested on; empty: `test` where the dataset has one, else `val`
    # (Kinetics and SSv2 have train and val only).
    eval_split: str = ""
    # Undecodable videos are skipped and counted; a pass fails once more than this fraction fail.
    max_bad_fraction: float = 0.01
    # Per-channel normalisation of RGB in [0, 1] into the model's input space (Kinetics values).
    mean: list[float] = field(default_factory=lambda: [0.43216, 0.394666, 0.37645])
    std: list[float] = field(default_factory=lambda: [0.22803, 0.22145, 0.216989])  # x' = (x - mean) / std


@dataclass
class AugmentConfig:
    """The clip-consistent augmentation shared by teacher, recovery and student training.

    One box, flip and roll per clip, identical across its frames.
    """

    hflip: bool = True  # turn off where left/right is the label (SSv2, the built-in dataset)
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # area fraction range
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # aspect ratio range
    roll: float = 0.1  # horizontal roll jitter, at most this fraction of the width


@dataclass
class StudentAugmentConfig:
    """The student's own augmentation (evaluate.augment), apart from the teacher's.

    Under teacher relabelling (evaluate.labels soft_kl or soft_mse) the teacher labels every
    augmented clip, so transforms that change the class (a flipped "move left", a reversed
    "open") are safe; time_reverse, cutmix and mixup need it.
    """

    hflip: bool = True  # mirror half the clips
    time_reverse: bool = False  # play half the clips backwards
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # area fraction range
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # aspect ratio range
    roll: float = 0.1  # horizontal roll jitter, at most this fraction of the width
    # Share of clips that get a box of another clip of the batch pasted into every frame (CutMix;
    # box sizes drawn like the crop's).
    cutmix: float = 0.0
    mixup: float = 0.0  # share of clips blended with another clip of the batch, weight ~ U(0, 1)


@dataclass
class TeacherConfig:
    model: str = "mini_c3d"  # a registered model: mini_c3d, or r3d_18, mc3_18, r2plus1d_18 (vision extra)
    width: int = 32  # channels of the first mini_c3d block (doubling per block)
    depth: int = 4  # conv blocks of mini_c3d
    checkpoint: str = ""  # import this checkpoint (state dict or safetensors) instead of training
    epochs: int = 30  # passes over the real training clips
    batch_size: int = 32  # clips per step, over all workers
    lr: float = 1e-3  # AdamW learning rate (cosine schedule)
    weight_decay: float = 1e-4  # AdamW weight decay
    num_workers: int = 1  # Ray Train (DDP) workers
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each training worker
    gpus_per_worker: float = 0.0  # GPUs per training worker (1 on a GPU cluster)


@dataclass
class TSGFConfig:
    enabled: bool = True  # TSGFO: weight recovery by saliency (false: the sre2l_video baseline)
    apply: TSGFApply = TSGFApply.update  # what the weight W = w_min + (1 - w_min) * M scales
    source: SaliencySource = SaliencySource.init  # which clip the map M is computed from
    compensate: Compensation = Compensation.none  # camera-motion compensation of the frame differences
    spatial_kernel: int = 3  # average-pool kernel over the difference maps, pixels (1 = off)
    window: int = 1  # temporal smoothing reaches k frames either side
    # Temporal weights alpha_{-k..k}; empty: (0.25, 0.5, 0.25) when window=1, uniform otherwise.
    alpha: list[float] = field(default_factory=list)
    eps: float = 1e-6  # added to the clip's maximum before normalising the map to [0, 1]
    granularity: Granularity = Granularity.pixel  # what one saliency weight covers
    w_min: float = 0.1  # TSGFO keeps this share of the update where nothing moves
    every: int = 1  # source=current: recompute the saliency map every this many recovery steps
    # TSGFA: crop centres are drawn from h / sum(h) + crop_delta / (H*W), h = time-mean saliency.
    crop_delta: float = 0.05


@dataclass
class StatsConfig:
    """The statistics pass: probe actors, each holding the frozen teacher, over the training shards."""

    actors: int = 1  # probe actors; each reads and decodes whole shards and keeps its own sums
    cpus_per_actor: float = 1.0  # CPUs Ray reserves per probe actor (its decode threads)
    gpus_per_actor: float = 0.0  # GPUs per probe actor (1 on a GPU cluster)
    batch_size: int = 32  # clips per teacher forward pass
    # Accumulate the class statistics on views drawn with the recovery augmentation (the augment
    # section), one fixed view per clip, since recovery matches augmented views; false: as decoded.
    augment: bool = False
    # Views scored per clip for distill.init=lowest_loss (RDED / Video-DC): the clip as sampled plus
    # init_views - 1 random temporal windows and crops (`decode_view`); a clip's loss is its best
    # view's, and recovery starts from that view. Costs init_views decodes and forwards per clip.
    init_views: int = 1


@dataclass
class DistillConfig:
    method: Method = Method.tsgd  # what the run distils (baselines go in evaluate.baselines)
    ipc: int = 1  # synthetic videos per class
    iterations: int = 1000  # recovery steps per video
    lr: float = 0.1  # Adam(0.5, 0.9) learning rate on the pixels (cosine schedule to 0)
    lambda_bn: float = 0.01  # weight of the BN-statistics term against the cross-entropy
    first_bn_weight: float = 10.0  # weight of the first BN layer in that term (the rest: 1)
    bn_target: BNTarget = BNTarget.class_mixture  # which statistics a batch is matched to
    # Match an EMA of each BN group's statistics over steps (this weight on the past; EDC) rather
    # than one step's, which is noisy for a group of one or a few clips; 0: the current step's.
    bn_ema: float = 0.0
    # Weight of a within-class diversity term: the mean cosine similarity between the teacher's
    # penultimate features of the videos of one class (only where a class has >= 2 videos).
    diversity: float = 0.0
    init: InitKind = InitKind.real  # how synthetic videos start
    chunk_size: int = 50  # most synthetic videos in one forward pass (whole classes are packed)
    log_every: int = 10  # recovery metrics are read back from the device every this many steps
    partitions: int = 0  # class partitions handed out to the actors; 0 = 4 per actor
    # At most this many synthetic videos in one partition (more partitions are planned when
    # needed), so a partition fits one actor's memory; 0 = no limit. See docs/sizing.md.
    max_videos_per_partition: int = 0
    actors: int = 1  # recovery actors, each holding the frozen teacher
    gpus_per_actor: float = 0.0  # GPUs per recovery actor (1 on a GPU cluster)
    cpus_per_actor: float = 0.5  # CPUs Ray reserves per recovery actor


@dataclass
class EvaluateConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one student per seed; results are mean +- std
    epochs: int = 300  # student epochs over the synthetic set
    full_epochs: int = 0  # epochs of the `full` baseline over every real clip; 0: evaluate.epochs
    batch_size: int = 32  # synthetic clips per student step
    lr: float = 1e-3  # AdamW learning rate (cosine schedule)
    weight_decay: float = 0.01  # AdamW weight decay
    model: str = ""  # the student architecture; empty: the teacher's
    width: int = 0  # student width (mini_c3d); 0: the teacher's
    depth: int = 0  # student depth (mini_c3d); 0: the teacher's
    labels: LabelKind = LabelKind.soft_kl  # what the student learns from
    temperature: float = 4.0  # softmax temperature T of labels=soft_kl
    mse_ce_weight: float = 0.1  # labels=soft_mse: MSE to the teacher logits + this * CE
    # TSGFA: draw crop (and CutMix box) centres from each clip's init saliency; false: uniformly.
    tsgfa: bool = True
    augment: StudentAugmentConfig = field(default_factory=StudentAugmentConfig)
    ema: float = 0.0  # decay of an EMA of the student's weights, tested in its place; 0: off
    # Also evaluate these methods (each distilled with the same teacher, ipc and seed): e.g.
    # [random_real, sre2l_video, full]. The run's own method is distill.method.
    baselines: list[Method] = field(default_factory=list)
    num_workers: int = 1  # Ray Train (DDP) workers
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each student worker
    gpus_per_worker: float = 0.0  # GPUs per student worker


@dataclass
class RayConfig:
    address: str = ""  # empty: start a local Ray; "auto" or ray://... joins a cluster
    num_cpus: int = 0  # local Ray only; 0 = all cores
    object_store_mb: int = 0  # local Ray only; 0 = Ray's default
    include_dashboard: bool = False  # local Ray only: start the dashboard (about 1 GB more memory)
    temp_dir: str = ""  # local Ray only: its session folder; empty: Ray's default
    # How often a lost Ray Train worker or distill actor is replaced before the stage fails.
    max_failures: int = 3


@dataclass
class StorageConfig:
    # Every file the pipeline writes lands under this URI (local path or s3://bucket/prefix).
    output_root: str = "outputs"
    # Where fetched or generated inputs are cached (the built-in dataset's videos); empty:
    cache_root: str = ""  # <output_root>/cache
    # Two runs of one stage at once (e.g. two `run`s of a config): the second waits for the first
    # (true) or stops with an error (false).
    wait_for_lease: bool = True
    lease_seconds: float = 120.0  # a dead run's stage lease expires this long after its last renewal


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else sqlite in <output_root>/mlflow.db
    experiment: str = "tsgd-ray"  # MLflow experiment; created when missing
    run_name: str = ""  # name of the parent run; empty: MLflow makes one up
    # Where a new experiment stores artifacts (e.g. s3://bucket/mlflow); empty: the server's default.
    artifact_location: str = ""


@dataclass
class Config:
    seed: int = 0  # seeds every random stream (splits, init, augmentation, students)
    # cpu, cuda, cuda:N, or auto (CUDA when the worker has one). A stage given GPUs (its gpus_per_*
    # key > 0) whose torch sees no CUDA stops with an error naming the key: no silent CPU fallback.
    device: str = "auto"
    amp: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tsgf: TSGFConfig = field(default_factory=TSGFConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0.0 <= v <= 1.0


_CROP_SCALE = (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[min, max] with 0 < min <= max <= 1")
_CROP_RATIO = (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max")

# (full key, predicate, what the value must be)
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("data.split_id", lambda v: v in (1, 2, 3), "one of 1, 2, 3"),
    ("data.num_frames", lambda v: v >= 2, ">= 2"),
    ("data.height", _positive, "> 0"),
    ("data.width", _positive, "> 0"),
    ("data.frame_interval", lambda v: v >= 1, ">= 1"),
    ("data.shard_target_mb", _positive, "> 0"),
    ("data.transcode_short_side", lambda v: v == 0 or v >= 16, "0 (off) or >= 16"),
    ("data.prepare_concurrency", _non_negative, ">= 0"),
    ("data.decode_actors", lambda v: v >= 1, ">= 1"),
    ("data.decode_cpus_per_actor", _positive, "> 0"),
    ("data.decode_batch_size", lambda v: v >= 1, ">= 1"),
    ("data.views_per_video", lambda v: v >= 1, ">= 1"),
    ("data.max_bad_fraction", _fraction, "in [0, 1]"),
    ("data.mean", lambda v: len(v) == 3, "3 values (R, G, B)"),
    ("data.std", lambda v: len(v) == 3 and min(v) > 0, "3 positive values (R, G, B)"),
    ("augment.crop_scale", *_CROP_SCALE),
    ("augment.crop_ratio", *_CROP_RATIO),
    ("augment.roll", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.builtin.train_per_class", lambda v: v >= 1, ">= 1"),
    ("data.builtin.test_per_class", lambda v: v >= 1, ">= 1"),
    ("data.builtin.frames", lambda v: v >= 4, ">= 4"),
    ("data.builtin.size", lambda v: v >= 32 and v % 2 == 0, "an even number >= 32"),
    ("data.builtin.fps", _positive, "> 0"),
    ("teacher.width", lambda v: v >= 1, ">= 1"),
    ("teacher.depth", lambda v: v >= 1, ">= 1"),
    ("teacher.epochs", _non_negative, ">= 0"),
    ("teacher.batch_size", lambda v: v >= 1, ">= 1"),
    ("teacher.lr", _positive, "> 0"),
    ("teacher.weight_decay", _non_negative, ">= 0"),
    ("teacher.num_workers", lambda v: v >= 1, ">= 1"),
    ("teacher.cpus_per_worker", _positive, "> 0"),
    ("teacher.gpus_per_worker", _non_negative, ">= 0"),
    ("tsgf.spatial_kernel", lambda v: v >= 1 and v % 2 == 1, "an odd number >= 1"),
    ("tsgf.window", _non_negative, ">= 0"),
    ("tsgf.eps", _positive, "> 0"),
    ("tsgf.w_min", _fraction, "in [0, 1]"),
    ("tsgf.every", lambda v: v >= 1, ">= 1"),
    ("tsgf.crop_delta", _non_negative, ">= 0"),
    ("data.eval_split", lambda v: v in ("", "val", "test"), "empty (auto), val or test"),
    ("stats.actors", lambda v: v >= 1, ">= 1"),
    ("stats.cpus_per_actor", _positive, "> 0"),
    ("stats.gpus_per_actor", _non_negative, ">= 0"),
    ("stats.batch_size", lambda v: v >= 1, ">= 1"),
    ("stats.init_views", lambda v: v >= 1, ">= 1"),
    ("storage.lease_seconds", lambda v: v >= 1, ">= 1"),
    ("distill.max_videos_per_partition", _non_negative, ">= 0"),
    ("distill.ipc", lambda v: 1 <= v <= MAX_IPC, f"in [1, {MAX_IPC}]"),
    ("distill.iterations", _non_negative, ">= 0"),
    ("distill.lr", _positive, "> 0"),
    ("distill.lambda_bn", _non_negative, ">= 0"),
    ("distill.first_bn_weight", _non_negative, ">= 0"),
    ("distill.bn_ema", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("distill.diversity", _non_negative, ">= 0"),
    ("distill.chunk_size", lambda v: v >= 1, ">= 1"),
    ("distill.log_every", lambda v: v >= 1, ">= 1"),
    ("distill.partitions", _non_negative, ">= 0"),
    ("distill.actors", lambda v: v >= 1, ">= 1"),
    ("distill.gpus_per_actor", _non_negative, ">= 0"),
    ("distill.cpus_per_actor", _non_negative, ">= 0"),
    ("evaluate.seeds", lambda v: len(v) >= 1, "a non-empty list"),
    ("evaluate.epochs", _non_negative, ">= 0"),
    ("evaluate.full_epochs", _non_negative, ">= 0"),
    ("evaluate.ema", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("evaluate.augment.crop_scale", *_CROP_SCALE),
    ("evaluate.augment.crop_ratio", *_CROP_RATIO),
    ("evaluate.augment.roll", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("evaluate.augment.cutmix", _fraction, "in [0, 1]"),
    ("evaluate.augment.mixup", _fraction, "in [0, 1]"),
    ("evaluate.batch_size", lambda v: v >= 1, ">= 1"),
    ("evaluate.width", _non_negative, ">= 0"),
    ("evaluate.depth", _non_negative, ">= 0"),
    ("evaluate.lr", _positive, "> 0"),
    ("evaluate.weight_decay", _non_negative, ">= 0"),
    ("evaluate.temperature", _positive, "> 0"),
    ("evaluate.mse_ce_weight", _non_negative, ">= 0"),
    ("evaluate.num_workers", lambda v: v >= 1, ">= 1"),
    ("evaluate.cpus_per_worker", _positive, "> 0"),
    ("evaluate.gpus_per_worker", _non_negative, ">= 0"),
    ("ray.max_failures", _non_negative, ">= 0"),
    ("ray.num_cpus", _non_negative, ">= 0"),
    ("ray.object_store_mb", lambda v: v == 0 or v >= 75, "0 (Ray's default) or >= 75"),
    ("storage.output_root", lambda v: bool(v.strip()), "a non-empty URI"),
    ("tracking.experiment", lambda v: bool(v.strip()), "a non-empty name"),
]


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def validate(cfg: DictConfig) -> None:
    """Check ranges and cross-field rules that types cannot express.

    Raises:
        ConfigError: naming the first offending full key and what it must be.
    """
    for key, ok, must in _RANGES:
        value = _select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}: must be {must}, got {value!r}")
    if cfg.data.dataset != DatasetKind.builtin and not cfg.data.root.strip():
        raise ConfigError(
            f"data.root: required for data.dataset={cfg.data.dataset.value} "
            "(a local path or URI such as s3://bucket/ucf101)"
        )
    alpha = list(cfg.tsgf.alpha)
    if alpha and (len(alpha) != 2 * cfg.tsgf.window + 1 or min(alpha) < 0 or sum(alpha) <= 0):
        raise ConfigError(
            f"tsgf.alpha: must hold 2*tsgf.window+1 = {2 * cfg.tsgf.window + 1} non-negative "
            f"weights with a positive sum (or be empty for uniform), got {alpha}"
        )
    student_aug = cfg.evaluate.augment
    for key, on in (
        ("time_reverse", student_aug.time_reverse),
        ("cutmix", student_aug.cutmix > 0),
        ("mixup", student_aug.mixup > 0),
    ):
        if on and cfg.evaluate.labels == LabelKind.hard:
            raise ConfigError(
                f"evaluate.augment.{key}: changes or mixes classes and needs teacher labels; "
                "use evaluate.labels=soft_kl or soft_mse, or turn it off"
            )
    if Method.herding in (cfg.distill.method, *cfg.evaluate.baselines):
        raise ConfigError(
            "distill.method / evaluate.baselines: herding is available in "
            "benchmarks/quality.py only, not yet in the pipeline"
        )
    if cfg.distill.method == Method.full:
        raise ConfigError(
            "distill.method: full trains on every real clip and distils nothing; add it to evaluate.baselines instead"
        )
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.data.sampling == TemporalSampling.random and not cfg.data.clip_cache:
        raise ConfigError(
            "data.sampling: random draws a new window per epoch from the clip cache's "
            "data.views_per_video windows; set data.clip_cache=true (live decoding would train every "
            "epoch on the same window)"
        )
    extensions = [e.lower().lstrip(".") for e in cfg.data.extensions]
    if not extensions or not all(extensions):
        raise ConfigError(f"data.extensions: must list file extensions, got {extensions}")


def _as_config_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    # OmegaConf's message already says what is wrong and often suggests the right key.
    message = str(exc).split("\n    full_key:")[0].strip()
    return ConfigError(f"{key}: {message}" if key else message)


CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped in the package


def config_names() -> list[str]:
    """The names of the shipped configs (``default``, ``ucf101``, ...)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Find a config by path, else by name among the shipped ones (``default`` ->
    tsgd_ray/configs/default.yaml), from any directory.

    Raises:
        ConfigError: when no such file exists.
    """
    path = Path(name_or_path)
    candidates = [path, CONFIGS / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file not found: {name_or_path} (not a file, nor a shipped config: {', '.join(config_names())})"
    )


# Keys holding a local path or URI. A relative local path is made absolute at load time: Ray Train
# workers run in their own working directory and would resolve it elsewhere.
PATH_KEYS = (
    "data.root",
    "data.annotations",
    "data.shards",
    "teacher.checkpoint",
    "storage.output_root",
    "storage.cache_root",
    "ray.temp_dir",
)


def _absolute_local_paths(cfg: DictConfig) -> None:
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value and ":/" not in value and not os.path.isabs(value):  # not s3://..., runs:/..., models:/...
            OmegaConf.update(cfg, key, os.path.abspath(value))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build, merge and validate a config: schema <- YAML at `path` <- ``key=value`` overrides.

    Relative local paths (PATH_KEYS) become absolute against the current directory.
    Returns a read-only structured DictConfig.

    Raises:
        ConfigError: for an unknown key, a wrong type, a value out of range or a missing URI.
    """
    try:
        cfg = OmegaConf.structured(Config)
        if path is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(resolve_config_path(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _as_config_error(exc) from None
    validate(cfg)
    _absolute_local_paths(cfg)
    _resolve_derived(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _resolve_derived(cfg: DictConfig) -> None:
    """Fill the defaults that derive from other keys, so that the config `tsgd-ray config` prints
    and MLflow records holds the values used: data.shards (<output_root>/shards), distill.partitions
    (4 per actor), evaluate.model/width/depth (the teacher's), tsgf.alpha ((0.25, 0.5, 0.25) for
    window 1, else uniform) and tracking.tracking_uri (MLFLOW_TRACKING_URI, else sqlite in a local
    output root, else ./mlflow.db). Nothing is created here."""
    root = cfg.storage.output_root
    if not cfg.data.shards:
        cfg.data.shards = f"{root.rstrip('/')}/shards"
    d, e, t = cfg.distill, cfg.evaluate, cfg.teacher
    d.partitions = d.partitions or 4 * d.actors
    e.model, e.width, e.depth = e.model or t.model, e.width or t.width, e.depth or t.depth
    if not cfg.tsgf.alpha:
        cfg.tsgf.alpha = [0.25, 0.5, 0.25] if cfg.tsgf.window == 1 else [1.0] * (2 * cfg.tsgf.window + 1)
    if not cfg.tracking.tracking_uri:
        local = "://" not in root  # made absolute by _absolute_local_paths
        cfg.tracking.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            f"sqlite:///{os.path.join(root, 'mlflow.db')}" if local else f"sqlite:///{os.path.abspath('mlflow.db')}"
        )


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (enums as strings), for YAML, JSON and MLflow."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def config_hash(cfg: DictConfig, sections: Optional[Sequence[str]] = None) -> str:
    """A stable sha256 hex digest of the resolved config (or of the named top-level sections)."""
    data = to_dict(cfg)
    if sections is not None:
        data = {name: data[name] for name in sections}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
