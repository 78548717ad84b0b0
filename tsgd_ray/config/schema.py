"""The configuration schema: one dataclass per pipeline stage, merged by OmegaConf.

This module is the single source of truth for settings. A config is built as
``schema <- YAML file <- key=value overrides`` and validated before any Ray work, so every
mistake a user can make (unknown key, wrong type, value out of range, missing URI) stops the
program with one :class:`ConfigError` that names the full key.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from tsgd_ray.config import regimes
from tsgd_ray.errors import UserError

MAX_IPC = 50  # the most synthetic videos per class; the statistics pass keeps this many init candidates
PACK = 4  # init clips per synthetic video under distill.pack (a 2 x 2 grid: tsgd_ray.core.packing)


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
    # real's seeded videos, each from its candidate view (stats.init_views) of the largest motion
    # energy x teacher margin (`selection.window_score`): where in a video to start, never which videos
    motion_window = "motion_window"
    noise = "noise"  # Gaussian noise, for ablations (the saliency map is then meaningless)


class Compensation(str, enum.Enum):
    none = "none"  # raw frame differences (the paper)
    median = "median"  # subtract each difference map's median (a global change of brightness or a pan)
    shift = "shift"  # align each frame to the previous one by the best integer translation first


class Granularity(str, enum.Enum):
    pixel = "pixel"  # a weight per pixel and frame
    frame = "frame"  # one weight per frame (the mean over its pixels)


class TSGFApply(str, enum.Enum):
    update = "update"  # x <- x_prev + W * (x_new - x_prev) after each optimiser step (docs/method.md)
    gradient = "gradient"  # grad <- grad * W before the step: the paper's words, cancelled by Adam


class SaliencySource(str, enum.Enum):
    init = "init"  # the map of the real clip recovery started from, fixed
    current = "current"  # the map of the synthetic clip, recomputed every tsgf.every steps


class Method(str, enum.Enum):
    tsgd = "tsgd"  # recovery with TSGF (TSGFO), students with TSGFA
    sre2l_video = "sre2l_video"  # recovery without TSGF
    random_real = "random_real"  # IPC seeded real clips per class, never packed, not optimised
    packed_real = "packed_real"  # 4 x IPC seeded real clips per class packed 2 x 2 (distill.pack), not optimised
    full = "full"  # the student trained on every real training clip (the ceiling)


class BuiltinVariant(str, enum.Enum):
    plain = "plain"  # one moving digit over a static texture, a still camera
    # plus static distractor digits, a panning and shaking camera, and flicker: motion saliency
    # must be told apart from camera motion (tsgf.compensate)
    cluttered = "cluttered"
    # the digit moves during a burst of half the video that starts at a random frame, and is still
    # before and after it: which temporal window a clip takes matters (distill.init=motion_window)
    bursty = "bursty"
    # 16 classes (8 more motions: diagonals, orbits, spirals), distractor digits that move too,
    # per-clip contrast, val digits disjoint from test's: room to separate methods (quality.py)
    scenes = "scenes"


Check = tuple[Callable[[Any], bool], str]  # (predicate, what the value must be)


def at_least(n: int) -> Check:
    return (lambda v: v >= n, f">= {n}")


POSITIVE: Check = (lambda v: v > 0, "> 0")
NON_NEGATIVE: Check = (lambda v: v >= 0, ">= 0")
FRACTION: Check = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
BELOW_ONE: Check = (lambda v: 0 <= v < 1, "in [0, 1)")
CROP_SCALE: Check = (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[min, max] with 0 < min <= max <= 1")
CROP_RATIO: Check = (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max")
NON_EMPTY: Check = (lambda v: bool(v.strip()), "non-empty")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Optional[Callable[[], Any]] = None,
    must: Optional[Check] = None,
    execution_only: bool = False,
    path: bool = False,
    derived: Optional[Callable[[DictConfig], Any]] = None,
    choices: Optional[Callable[[], dict[str, str]]] = None,
) -> Any:
    """A schema field with its meaning as metadata (read by `validate`, the stage keys and `load_config`):

    must: (predicate, text), checked at load; execution_only: changes only how fast or where work runs,
    so it is left out of the stage keys; path: a local path or URI, made absolute at load (Ray Train
    workers run in their own working directory); derived: where the value is empty (or 0), load
    sets it to derived(cfg) (of the config with absolute paths), so the printed and logged config
    holds the value used; choices: () -> {allowed value: its meaning}, read at each call (a
    registry's names), checked at load and listed in the reference.
    """
    metadata = {"must": must, "execution_only": execution_only, "path": path, "derived": derived, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _shards_under_output_root(cfg: DictConfig) -> str:
    return f"{cfg.storage.output_root.rstrip('/')}/shards"


def _four_per_actor(cfg: DictConfig) -> int:
    return 4 * cfg.distill.actors


def _teachers(name: str) -> Callable[[DictConfig], Any]:
    return lambda cfg: cfg.teacher[name]


def _alpha(cfg: DictConfig) -> list[float]:
    return [0.25, 0.5, 0.25] if cfg.tsgf.window == 1 else [1.0] * (2 * cfg.tsgf.window + 1)


def _tracking_uri(cfg: DictConfig) -> str:
    """MLFLOW_TRACKING_URI, else sqlite in a local output root, else ./mlflow.db."""
    root = cfg.storage.output_root
    local = "://" not in root  # absolute by now
    return os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{os.path.join(root, 'mlflow.db')}" if local else f"sqlite:///{os.path.abspath('mlflow.db')}"
    )


@dataclass
class BuiltinDatasetConfig:
    """The built-in motion-digits dataset: only the order of frames tells classes apart."""

    variant: BuiltinVariant = BuiltinVariant.plain  # how hard the scene is

    train_per_class: int = setting(60, must=at_least(1))  # training videos per class
    test_per_class: int = setting(20, must=at_least(1))  # test videos per class
    # validation videos per class (held-out digits, like test): where defaults are chosen
    val_per_class: int = setting(0, must=NON_NEGATIVE)
    frames: int = setting(16, must=at_least(4))  # frames per video
    # frame height and width, pixels
    size: int = setting(64, must=(lambda v: v >= 32 and v % 2 == 0, "an even number >= 32"))
    fps: int = setting(8, must=POSITIVE)  # frame rate written into the mp4 files
    seed: int = 0  # seed of the generator (textures, digits, motion)


@dataclass
class DataConfig:
    dataset: DatasetKind = DatasetKind.builtin  # the layout of data.root
    # Dataset root (videos and annotation files): a local path or any fsspec URI (s3://...).
    # Required unless dataset=builtin.
    root: str = setting("", path=True)
    # Annotation file or folder when it does not sit at its usual place under `root`
    # (UCF101 split lists, HMDB51 split folder, Kinetics CSV folder, SSv2 JSON folder, CSV file).
    annotations: str = setting("", path=True)
    # UCF101 / HMDB51 official split, 1..3
    split_id: int = setting(1, must=(lambda v: v in (1, 2, 3), "one of 1, 2, 3"))
    classes: list[str] = field(default_factory=list)  # restrict to these class names (e.g. MiniUCF)
    # dataset=kinetics: which release data.annotations holds (400, 600 or 700). Only `tsgd-ray plan`
    # reads it, for the video and class counts before prepare (afterwards the shard manifest's).
    release: int = setting(400, must=(lambda v: v in (400, 600, 700), "400, 600 or 700"), execution_only=True)
    on_catalog_error: OnCatalogError = OnCatalogError.error  # missing files, unknown labels
    # Video file extensions a catalog picks up (case-insensitive).
    extensions: list[str] = field(default_factory=lambda: ["mp4", "avi", "mkv", "webm", "mov", "mpg", "mpeg"])
    builtin: BuiltinDatasetConfig = field(default_factory=BuiltinDatasetConfig)
    # Shards: where `prepare` writes them; empty means <storage.output_root>/shards.
    shards: str = setting("", execution_only=True, path=True, derived=_shards_under_output_root)
    shard_target_mb: float = setting(256.0, must=POSITIVE)  # about this many MB of video bytes per Parquet shard
    # 0 keeps the source bytes; >0 re-encodes to this short side
    transcode_short_side: int = setting(0, must=(lambda v: v == 0 or v >= 16, "0 (off) or >= 16"))
    # parallel shard writers; 0 = one per CPU of the cluster
    prepare_concurrency: int = setting(0, must=NON_NEGATIVE, execution_only=True)
    # Clips decoded from the shards.

    num_frames: int = setting(16, must=at_least(2))  # frames per clip
    height: int = setting(112, must=POSITIVE)  # clip height after resizing, pixels
    width: int = setting(112, must=POSITIVE)  # clip width after resizing, pixels
    sampling: TemporalSampling = TemporalSampling.uniform  # which frames a clip takes
    frame_interval: int = setting(2, must=at_least(1))  # frames between sampled frames (center and random sampling)
    # Ray Data tasks decoding clips at once
    decode_actors: int = setting(1, must=at_least(1), execution_only=True)
    # CPUs Ray reserves for each decoding task
    decode_cpus_per_actor: float = setting(0.5, must=POSITIVE, execution_only=True)
    # videos per decode batch (and per Ray Data block and clip-cache file)
    decode_batch_size: int = setting(64, must=at_least(1), execution_only=True)
    # Decode each clip once: write the decoded clips of a split as Parquet under the output root
    # (<output_root>/clips/), built by prepare on CPUs, and let teacher epochs, the statistics
    # pass, init, the `full` baseline and every evaluation seed read them (uint8 F x H x W x 3 per
    # clip: about 0.6 MB at 16x112x112, so Kinetics-400's train split needs ~145 GB per view);
    # false: decode live on every pass (no disk; random sampling then needs the cache, see
    # views_per_video).
    clip_cache: bool = True
    # A folder on each node's local disk where the workers of that node keep the clip-cache files
    # they read from a remote output root (downloaded once per node, least recently used evicted
    # past node_cache_gib); empty: read from the output root on every pass. Local roots are read
    # in place.
    node_cache_dir: str = setting("", execution_only=True)
    node_cache_gib: float = setting(100.0, must=POSITIVE, execution_only=True)  # the node cache's bound
    # sampling=random: windows cached per video; epoch e trains on window e % views_per_video
    views_per_video: int = setting(4, must=at_least(1))
    # Deliver clips in shard order whatever decoder finishes first, so that a run is reproducible
    # from its config and seed; false: as decoded (a little faster on large clusters).
    preserve_order: bool = True
    # The split students are tested on; empty: `test` where the dataset has one, else `val`
    # (Kinetics and SSv2 have train and val only).
    eval_split: str = setting(
        "", must=(lambda v: v in ("", "val", "test"), "empty (auto), val or test"), execution_only=True
    )
    # Undecodable videos are skipped and counted; a pass fails once more than this fraction fail.
    max_bad_fraction: float = setting(0.01, must=FRACTION)
    # Per-channel normalisation of RGB in [0, 1] into the model's input space (Kinetics values).
    mean: list[float] = setting(
        factory=lambda: [0.43216, 0.394666, 0.37645], must=(lambda v: len(v) == 3, "3 values (R, G, B)")
    )
    std: list[float] = setting(
        factory=lambda: [0.22803, 0.22145, 0.216989],
        must=(lambda v: len(v) == 3 and min(v) > 0, "3 positive values (R, G, B)"),
    )  # x' = (x - mean) / std


@dataclass
class AugmentConfig:
    """The clip-consistent augmentation shared by teacher, recovery and student training.

    One box, flip and roll per clip, identical across its frames.
    """

    hflip: bool = True  # turn off where left/right is the label (SSv2, the built-in dataset)
    crop_scale: list[float] = setting(factory=lambda: [0.5, 1.0], must=CROP_SCALE)  # area fraction range
    crop_ratio: list[float] = setting(factory=lambda: [0.75, 1.3333], must=CROP_RATIO)  # aspect ratio range
    roll: float = setting(0.1, must=BELOW_ONE)  # horizontal roll jitter, at most this fraction of the width


@dataclass
class ViewAugmentConfig:
    """The views a student sees, whose labels the teacher gives (evaluate.augment; the stored
    views of distill.labels.augment).

    The teacher labels every view, so transforms that change the class (a flipped "move left", a
    reversed "open") are safe.
    """

    hflip: bool = True  # mirror half the clips
    time_reverse: bool = False  # play half the clips backwards
    crop_scale: list[float] = setting(factory=lambda: [0.08, 1.0], must=CROP_SCALE)  # area fraction range
    crop_ratio: list[float] = setting(factory=lambda: [0.75, 1.3333], must=CROP_RATIO)  # aspect ratio range
    roll: float = setting(0.1, must=BELOW_ONE)  # horizontal roll jitter, at most this fraction of the width


@dataclass
class StudentAugmentConfig(ViewAugmentConfig):
    """The student's own augmentation under online labels (evaluate.labels soft_kl or soft_mse).

    Stored labels replay the set's stored views instead; hard labels use the teacher's
    label-preserving `augment` section.
    """

    # Share of clips that get a box of another clip of the batch pasted into every frame (CutMix;
    # box sizes drawn like the crop's).
    cutmix: float = setting(0.0, must=FRACTION)
    # share of clips blended with another clip of the batch, weight ~ U(0, 1)
    mixup: float = setting(0.0, must=FRACTION)


@dataclass
class TeacherConfig:
    model: str = "mini_c3d"  # a registered model: mini_c3d, or r3d_18, mc3_18, r2plus1d_18 (vision extra)
    width: int = setting(32, must=at_least(1))  # channels of the first mini_c3d block (doubling per block)
    depth: int = setting(4, must=at_least(1))  # conv blocks of mini_c3d
    checkpoint: str = setting("", path=True)  # import this checkpoint (state dict or safetensors) instead of training
    epochs: int = setting(30, must=NON_NEGATIVE)  # passes over the real training clips
    batch_size: int = setting(32, must=at_least(1))  # clips per step, over all workers
    lr: float = setting(1e-3, must=POSITIVE)  # AdamW learning rate (cosine schedule)
    weight_decay: float = setting(1e-4, must=NON_NEGATIVE)  # AdamW weight decay
    num_workers: int = setting(1, must=at_least(1))  # Ray Train (DDP) workers
    # Elastic: after a lost node, go on from the last checkpoint with as few as this many workers
    # (the global batch stays teacher.batch_size) instead of waiting for a replacement; 0, or at
    # least teacher.num_workers: a fixed group
    min_workers: int = setting(0, must=NON_NEGATIVE, execution_only=True)
    # CPUs Ray reserves for each training worker
    cpus_per_worker: float = setting(1.0, must=POSITIVE, execution_only=True)
    # GPUs per training worker (1 on a GPU cluster)
    gpus_per_worker: float = setting(0.0, must=NON_NEGATIVE, execution_only=True)


@dataclass
class TSGFConfig:
    enabled: bool = True  # TSGFO: weight recovery by saliency (false: the sre2l_video baseline)
    apply: TSGFApply = TSGFApply.update  # what the weight W = w_min + (1 - w_min) * M scales
    source: SaliencySource = SaliencySource.init  # which clip the map M is computed from
    compensate: Compensation = Compensation.none  # camera-motion compensation of the frame differences
    # average-pool kernel over the difference maps, pixels (1 = off)
    spatial_kernel: int = setting(3, must=(lambda v: v >= 1 and v % 2 == 1, "an odd number >= 1"))
    window: int = setting(1, must=NON_NEGATIVE)  # temporal smoothing reaches k frames either side
    # Temporal weights alpha_{-k..k}; empty: (0.25, 0.5, 0.25) when window=1, uniform otherwise.
    alpha: list[float] = setting(factory=list, derived=_alpha)
    eps: float = setting(1e-6, must=POSITIVE)  # added to the clip's maximum before normalising the map to [0, 1]
    granularity: Granularity = Granularity.pixel  # what one saliency weight covers
    w_min: float = setting(0.1, must=FRACTION)  # TSGFO keeps this share of the update where nothing moves
    # source=current: recompute the saliency map every this many recovery steps
    every: int = setting(1, must=at_least(1))
    # TSGFA: crop centres are drawn from h / sum(h) + crop_delta / (H*W), h = time-mean saliency.
    crop_delta: float = setting(0.05, must=NON_NEGATIVE)


@dataclass
class StatsConfig:
    """The statistics pass: probe actors, each holding the frozen teacher, over the training clips."""

    # probe actors; each takes whole clip-cache files (or shards, which it decodes, with
    # data.clip_cache=false or init_views > 1) and keeps its own sums
    actors: int = setting(1, must=at_least(1), execution_only=True)
    # CPUs Ray reserves per probe actor (its read or decode threads)
    cpus_per_actor: float = setting(1.0, must=POSITIVE, execution_only=True)
    # GPUs per probe actor (1 on a GPU cluster)
    gpus_per_actor: float = setting(0.0, must=NON_NEGATIVE, execution_only=True)
    batch_size: int = setting(32, must=at_least(1), execution_only=True)  # clips per teacher forward pass
    # Accumulate the class statistics on views drawn with the recovery augmentation (the augment
    # section), one fixed view per clip, since recovery matches augmented views; false: as decoded.
    augment: bool = False
    # Views scored per clip for distill.init=lowest_loss (RDED / Video-DC) and motion_window: the
    # clip as sampled plus init_views - 1 random temporal windows and crops (`decode_view`); a clip's
    # loss is its best view's, and recovery starts from its best view (lowest loss; largest motion x
    # margin). Costs init_views decodes and forwards per clip: the pass then decodes the shards
    # instead of reading the clip cache.
    init_views: int = setting(1, must=at_least(1))


@dataclass
class StoredLabelsConfig:
    """Labels that ship with the set (FKD-style): per synthetic clip, `views` augmented views
    (their parameters drawn from the clip's own (seed, class, index) stream) with the teacher's
    logits on each, fp16. A student replays them with evaluate.labels=stored, without the teacher."""

    views: int = setting(16, must=NON_NEGATIVE)  # K views stored per clip; 0: none
    tsgfa: bool = True  # crop centres drawn from the clip's init saliency (as evaluate.tsgfa)
    augment: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)


@dataclass
class DistillConfig:
    method: Method = Method.tsgd  # what the run distils (baselines go in evaluate.baselines)
    ipc: int = setting(1, must=(lambda v: 1 <= v <= MAX_IPC, f"in [1, {MAX_IPC}]"))  # synthetic videos per class
    iterations: int = setting(1000, must=NON_NEGATIVE)  # recovery steps per video
    lr: float = setting(0.1, must=POSITIVE)  # Adam(0.5, 0.9) learning rate on the pixels (cosine schedule to 0)
    lambda_bn: float = setting(0.01, must=NON_NEGATIVE)  # weight of the BN-statistics term against the cross-entropy
    first_bn_weight: float = setting(10.0, must=NON_NEGATIVE)  # weight of the first BN layer in that term (the rest: 1)
    bn_target: BNTarget = BNTarget.class_mixture  # which statistics a batch is matched to
    # Match an EMA of each BN group's statistics over steps (this weight on the past; EDC) rather
    # than one step's, which is noisy for a group of one or a few clips; 0: the current step's.
    bn_ema: float = setting(0.0, must=BELOW_ONE)
    # Weight of a within-class diversity term: the mean cosine similarity between the teacher's
    # penultimate features of the videos of one class (only where a class has >= 2 videos).
    diversity: float = setting(0.0, must=NON_NEGATIVE)
    # Weight a of the teacher's own view of each init clip in the cross-entropy target:
    # (1 - a) * one-hot + a * softmax(teacher(init clip) / init_temperature); 0: the one-hot label.
    init_target: float = setting(0.0, must=FRACTION)
    init_temperature: float = setting(2.0, must=POSITIVE)  # softens that prediction (T > 1: softer)
    # Stop changing a video once an EMA (0.7 on the past) of the teacher's probability of its class
    # on its views reaches this; 0: never (every video takes every step).
    stop_confidence: float = setting(0.0, must=BELOW_ONE)
    init: InitKind = InitKind.real  # how synthetic videos start
    # Which draw of init clips the set starts from: draw d takes each class's candidates from
    # d x 4 x ipc on, in the seeded order the statistics pass keeps (so random_real's draw d lies
    # within packed_real's draw d). It names the init folder only: a new draw reuses the teacher
    # and the statistics. evaluate.draws runs several.
    draw: int = setting(0, must=NON_NEGATIVE)
    # Motion-aware 2 x 2 packing (RDED's, whole in time; not in the paper): each synthetic video
    # starts as PACK = 4 init clips of its class (init reads 4 x ipc), each cut to its (H/2, W/2)
    # window of most TSGF motion in every frame and tiled 2 x 2, where the teacher's probability
    # of the class on the packed clip is >= pack_confidence; elsewhere as the first of the 4.
    # Wants clips of 64 px or more: a quarter of a smaller frame holds little of a video. On in the
    # shipped configs at 64 px or more, whose baselines include packed_real (packing without
    # recovery). Measured only on val at 64 px, IPC 5, 120 student steps, against random real
    # clips: +6.5 +- 1.3, then +2.8 +- 4.2 on a rerun (docs/QUALITY-val-centre-packing.md):
    # not yet a decided gain.
    pack: bool = False
    pack_confidence: float = setting(0.8, must=FRACTION)  # the teacher's least probability of the class on a kept tile
    # most synthetic videos in one forward pass (whole classes are packed)
    chunk_size: int = setting(50, must=at_least(1))
    # recovery metrics are read back from the device every this many steps
    log_every: int = setting(10, must=at_least(1), execution_only=True)
    # class partitions handed out to the actors; 0 = 4 per actor
    partitions: int = setting(0, must=NON_NEGATIVE, execution_only=True, derived=_four_per_actor)
    # At most this many synthetic videos in one partition (more partitions are planned when
    # needed), so a partition fits one actor's memory; 0 = no limit. See docs/sizing.md.
    max_videos_per_partition: int = setting(0, must=NON_NEGATIVE, execution_only=True)
    actors: int = setting(1, must=at_least(1), execution_only=True)  # recovery actors, each holding the frozen teacher
    # GPUs per recovery actor (1 on a GPU cluster)
    gpus_per_actor: float = setting(0.0, must=NON_NEGATIVE, execution_only=True)
    cpus_per_actor: float = setting(0.5, must=NON_NEGATIVE, execution_only=True)  # CPUs Ray reserves per recovery actor
    labels: StoredLabelsConfig = field(default_factory=StoredLabelsConfig)  # stored with the set


@dataclass
class FullConfig:
    """The `full` baseline's student, trained on every real training clip: many more clips per
    epoch than a synthetic set, so its own epochs, a larger batch on more workers, and the
    learning rate scaled with the batch (the linear scaling rule of Goyal et al., 2017)."""

    epochs: int = setting(0, must=NON_NEGATIVE)  # passes over every real training clip; 0: evaluate.epochs
    batch_size: int = setting(0, must=NON_NEGATIVE)  # clips per step over all workers; 0: evaluate.batch_size
    # AdamW learning rate; 0: evaluate.lr x full.batch_size / evaluate.batch_size
    lr: float = setting(0.0, must=NON_NEGATIVE)
    num_workers: int = setting(0, must=NON_NEGATIVE)  # Ray Train workers of a `full` student; 0: evaluate.num_workers


@dataclass
class EvaluateConfig:
    # one student per seed; results are mean +- std
    seeds: list[int] = setting(factory=lambda: [0, 1, 2], must=(lambda v: len(v) >= 1, "a non-empty list"))
    epochs: int = setting(300, must=NON_NEGATIVE)  # student epochs over the synthetic set
    batch_size: int = setting(32, must=at_least(1))  # synthetic clips per student step
    lr: float = setting(1e-3, must=POSITIVE)  # AdamW learning rate (cosine schedule)
    weight_decay: float = setting(0.01, must=NON_NEGATIVE)  # AdamW weight decay
    model: str = setting("", derived=_teachers("model"))  # the student architecture; empty: the teacher's
    width: int = setting(0, must=NON_NEGATIVE, derived=_teachers("width"))  # student width (mini_c3d); 0: the teacher's
    depth: int = setting(0, must=NON_NEGATIVE, derived=_teachers("depth"))  # student depth (mini_c3d); 0: the teacher's
    # What the student learns from, a registered label regime (tsgd_ray.config.regimes): the views
    # and logits stored with the set (how a user trains on a shipped set, without the teacher), the
    # teacher online (soft_*) or the class labels (hard).
    labels: str = setting("stored", choices=regimes.described)
    views: int = setting(16, must=at_least(1))  # labels=stored: replay the first this many stored views per clip
    temperature: float = setting(4.0, must=POSITIVE)  # softmax temperature T of labels=soft_kl
    mse_ce_weight: float = setting(0.1, must=NON_NEGATIVE)  # labels=soft_mse: MSE to the teacher logits + this * CE
    # TSGFA: draw crop (and CutMix box) centres from each clip's init saliency; false: uniformly.
    tsgfa: bool = True
    augment: StudentAugmentConfig = field(default_factory=StudentAugmentConfig)
    full: FullConfig = field(default_factory=FullConfig)  # the `full` baseline's own budget and batch
    ema: float = setting(0.0, must=BELOW_ONE)  # decay of an EMA of the student's weights, tested in its place; 0: off
    # Also evaluate these methods (each distilled with the same teacher, ipc and seed): e.g.
    # [random_real, sre2l_video, full]. The run's own method is distill.method.
    baselines: list[Method] = setting(factory=list, execution_only=True)
    # Init draws per distilling method (distill.draw, distill.draw + 1, ...): each draw its own set
    # and students (one per seed), paired across methods, so the results table gives each
    # baseline's difference from distill.method with its standard error over draws (>= 3 draws to
    # separate them; `full` does not depend on the draw and trains once).
    draws: int = setting(1, must=at_least(1), execution_only=True)
    num_workers: int = setting(1, must=at_least(1))  # Ray Train (DDP) workers per student
    # Students trained at once (each (method, seed) is its own Ray Train run; Ray places their
    # workers); 0: as many student workers as the cluster's CPUs and GPUs hold when evaluation
    # starts, and on an autoscaling cluster (autoscaler v2) more as the nodes the waiting students
    # ask for arrive.
    students_at_once: int = setting(0, must=NON_NEGATIVE, execution_only=True)
    # CPUs Ray reserves for each student worker
    cpus_per_worker: float = setting(1.0, must=POSITIVE, execution_only=True)
    gpus_per_worker: float = setting(0.0, must=NON_NEGATIVE, execution_only=True)  # GPUs per student worker


@dataclass
class RayConfig:
    address: str = ""  # empty: start a local Ray; "auto" or ray://... joins a cluster
    num_cpus: int = setting(0, must=NON_NEGATIVE)  # local Ray only; 0 = all cores
    # local Ray only; 0 = Ray's default
    object_store_mb: int = setting(0, must=(lambda v: v == 0 or v >= 75, "0 (Ray's default) or >= 75"))
    include_dashboard: bool = False  # local Ray only: start the dashboard (about 1 GB more memory)
    temp_dir: str = setting("", path=True)  # local Ray only: its session folder; empty: Ray's default
    # How often a lost Ray Train worker or distill actor is replaced before the stage fails.
    max_failures: int = setting(3, must=NON_NEGATIVE)


@dataclass
class StorageConfig:
    # Every file the pipeline writes lands under this URI (local path or s3://bucket/prefix).
    output_root: str = setting("outputs", must=(NON_EMPTY[0], "a non-empty URI"), path=True)
    # Where fetched or generated inputs are cached (the built-in dataset's videos); empty:
    cache_root: str = setting("", path=True)  # <output_root>/cache
    # Two runs of one stage at once (e.g. two `run`s of a config): the second waits for the first
    # (true) or stops with an error (false).
    wait_for_lease: bool = True
    # a dead run's stage lease expires this long after its last renewal
    lease_seconds: float = setting(120.0, must=at_least(1))


@dataclass
class TrackingConfig:
    tracking_uri: str = setting(
        "", derived=_tracking_uri
    )  # MLflow tracking URI; empty: MLFLOW_TRACKING_URI, else sqlite in <output_root>/mlflow.db
    # MLflow experiment; created when missing
    experiment: str = setting("tsgd-ray", must=(NON_EMPTY[0], "a non-empty name"))
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


@functools.cache
def fields_meta() -> dict[str, dict[str, Any]]:
    """{full key: its `setting` metadata} for every leaf of the schema, in schema order."""
    out: dict[str, dict[str, Any]] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = {
                    "must": None,
                    "execution_only": False,
                    "path": False,
                    "derived": None,
                    "choices": None,
                    **f.metadata,
                }

    walk(Config, "")
    return out


def keys_where(flag: str) -> tuple[str, ...]:
    """The full keys whose `setting` sets `flag` ("execution_only" or "path")."""
    return tuple(key for key, meta in fields_meta().items() if meta[flag])


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def validate(cfg: DictConfig) -> None:
    """Check ranges and cross-field rules that types cannot express.

    Raises:
        ConfigError: naming the first offending full key and what it must be.
    """
    for key, meta in fields_meta().items():
        if meta["must"] is not None:
            ok, must = meta["must"]
            value = _select(cfg, key)
            if not ok(value):
                raise ConfigError(f"{key}: must be {must}, got {value!r}")
        if meta["choices"] is not None and _select(cfg, key) not in meta["choices"]():
            raise ConfigError(f"{key}: must be one of {', '.join(meta['choices']())}, got {_select(cfg, key)!r}")
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
    if regimes.get(cfg.evaluate.labels).replays_views and cfg.evaluate.views > cfg.distill.labels.views:
        raise ConfigError(
            f"evaluate.views: the set stores distill.labels.views={cfg.distill.labels.views} views per clip; "
            f"got {cfg.evaluate.views}"
        )
    if cfg.distill.method == Method.full:  # the one method that distils nothing (tsgd_ray.methods)
        raise ConfigError(
            "distill.method: full trains on every real clip and distils nothing; add it to evaluate.baselines instead"
        )
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.distill.init == InitKind.motion_window and cfg.stats.init_views < 2:
        raise ConfigError(
            "distill.init: motion_window chooses among stats.init_views candidate views per video; "
            f"set stats.init_views >= 2 (got {cfg.stats.init_views})"
        )
    d = cfg.distill
    if d.pack:
        if d.init == InitKind.noise:
            raise ConfigError("distill.pack: packs real init clips; distill.init=noise has none")
        if PACK * d.ipc > MAX_IPC:
            raise ConfigError(
                f"distill.pack: reads {PACK} x distill.ipc init clips per class, at most {MAX_IPC} "
                f"(the candidates the statistics pass keeps), so distill.ipc <= {MAX_IPC // PACK}; got "
                f"distill.ipc={d.ipc} (set distill.pack=false for more)"
            )
        if cfg.data.height % 2 or cfg.data.width % 2:
            raise ConfigError(
                f"distill.pack: tiles half-frames 2 x 2, so data.height and data.width must be even, "
                f"got {cfg.data.height} x {cfg.data.width}"
            )
    per = PACK if d.pack else 1
    last, most = d.draw + cfg.evaluate.draws - 1, (MAX_IPC // d.ipc - per) // PACK  # the last draw: asked, possible
    if last > most:
        raise ConfigError(
            f"evaluate.draws: draw {last} would start at init candidate {PACK * last * d.ipc} of each class, and "
            f"the statistics pass keeps {MAX_IPC}: at distill.ipc={d.ipc}{' packed' if d.pack else ''} the "
            f"draws end at {most} (distill.draw + evaluate.draws <= {most + 1})"
        )
    if cfg.data.sampling == TemporalSampling.random and not cfg.data.clip_cache:
        raise ConfigError(
            "data.sampling: random draws a new window per epoch from the clip cache's "
            "data.views_per_video windows; set data.clip_cache=true (live decoding would train every "
            "epoch on the same window)"
        )
    extensions = [e.lower().lstrip(".") for e in cfg.data.extensions]
    if not extensions or not all(extensions):
        raise ConfigError(f"data.extensions: must list file extensions, got {extensions}")
