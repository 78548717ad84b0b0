"""The plan of a run before any spend: per stage, whether it is finished, what it asks Ray for,
what it reads and writes, the memory of one actor, its wall time, the GPU-hours it books, how busy
those GPUs are, and the cost.

`make_plan(cfg, gpu)` does no heavy work: it reads stage markers and the shard manifest (when
prepare has run), and counts the model's FLOPs and saved activations on torch's meta device.
Before prepare, video and class counts are the dataset's nominal sizes (NOMINAL).

Time: a stage's workers each process clips at the slower of two rates, compute (the device) and
feed (their CPUs decoding videos or reading the clip cache), from the calibration table
(`tsgd_ray.calibration`); a compute rate without a measured row is FLOPs at GPUS[gpu].tflops, an
assumed throughput, and the plan says which. Wall time = start-up + phases; booked GPU-hours =
wall x GPUs (what the bill counts); busy = the share of that time the GPUs compute. A stage that
asks for no GPU runs on the cpu device's rates. Node start-up and autoscaling come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig

from tsgd_ray import calibration, layout, methods, storage
from tsgd_ray.config import Method, regimes
from tsgd_ray.data import clip_cache
from tsgd_ray.data.shards import finished_manifest, shards_root


@dataclass(frozen=True)
class GPU:
    memory_gib: float
    tflops: float  # assumed effective bf16 throughput on small 3D CNNs (docs/sizing.md)
    dollars_per_hour: float  # on-demand, us-west-2 list price of the usual instance (docs/sizing.md)
    step_ms: float = 0.0  # assumed fixed cost of a training step (launches, DDP all-reduce, optimiser)


GPUS = {
    "a10g": GPU(24, 20, 1.21, 15),  # g5.2xlarge
    "l4": GPU(24, 15, 0.98, 15),  # g6.2xlarge
    "h100": GPU(80, 150, 12.29, 10),  # one eighth of a p5.48xlarge
    "cpu": GPU(0, 0.05, 0.0),  # per core; a stage without GPUs runs here (measured rows include steps)
}
#: below this share of booked GPU time spent computing, a stage gets a warning
STARVED = 0.5
#: (train videos, evaluation videos, classes) of the public releases, used before prepare (rounded
#: down from the release papers; a real copy misses a few percent). Kinetics by data.release.
NOMINAL = {
    "kinetics400": (240_000, 20_000, 400),
    "kinetics600": (392_000, 30_000, 600),
    "kinetics700": (545_000, 35_000, 700),
    "ucf101": (9_537, 3_783, 101),
    "hmdb51": (3_570, 1_530, 51),
    "ssv2": (168_913, 24_777, 174),
}
AUGMENT_OVERHEAD = 1.2  # recovery's augmentation and TSGF on top of forward + backward (docs/sizing.md)
OPTIMISER_BYTES = 16  # per synthetic value: pixels, gradient, Adam's two moments (float32)


@dataclass
class Stage:
    name: str
    folder: str
    finished: bool | None  # None: the store could not be read from here
    resources: str
    reads: str
    writes: str
    gpu_hours: float = 0.0  # booked: wall x GPUs
    memory: str = ""
    warnings: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    busy: float | None = None  # share of the booked GPU time spent computing; None without GPUs
    timing: str = ""  # how the time splits, and where the rates come from
    units: int = 1  # independent units that may run at once (evaluation: its students, one per seed)
    unit_workers: int = 0  # workers each unit holds


@dataclass(frozen=True)
class ModelCost:
    params: int
    bn_channels: int  # summed over BatchNorm layers: the size of one class's statistics
    flops: float  # forward + backward with respect to the input, per video
    activation_bytes: int  # saved for backward, per video (float32: an upper bound under bf16)


def model_cost(name: str, width: int, depth: int, size: tuple[int, int, int], classes: int) -> ModelCost:
    """FLOPs and memory of one video through `name`, counted on the meta device (no data, no GPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tsgd_ray.core.bn_stats import BatchNormTaps, batchnorm_layers
    from tsgd_ray.core.models import build_model

    with torch.device("meta"):
        model = build_model(name, classes, size, width, depth)
    model.eval().requires_grad_(False)
    saved = []
    for n in (1, 2):
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        x = torch.empty(n, 3, *size, device="meta", requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), BatchNormTaps(model):
                out = model(x)
            out.sum().backward()
        saved.append((total[0], counter.get_total_flops()))
    channels = sum(m.num_features for m in batchnorm_layers(model))
    return ModelCost(
        sum(p.numel() for p in model.parameters()), channels, saved[1][1] - saved[0][1], saved[1][0] - saved[0][0]
    )


def _counts(cfg: DictConfig, manifest: dict | None) -> tuple[int, int, int, str]:
    """(train videos, eval videos, classes, where the counts come from)."""
    if manifest is not None:
        counts = {split: sum(c.values()) for split, c in manifest["counts"].items()}
        evaluated = counts.get(cfg.data.eval_split, 0) or max((v for k, v in counts.items() if k != "train"), default=0)
        return counts.get("train", 0), evaluated, len(manifest["classes"]), "the shard manifest"
    d = cfg.data
    if d.dataset == "builtin":
        return 8 * d.builtin.train_per_class, 8 * d.builtin.test_per_class, 8, "the built-in dataset's settings"
    name = getattr(d.dataset, "value", d.dataset)
    name += str(d.release) if name == "kinetics" else ""
    train, evaluated, classes = NOMINAL.get(name, (0, 0, 0))
    if classes and d.classes:  # a class subset: its share of the videos
        train, evaluated = (n * len(d.classes) // classes for n in (train, evaluated))
    return (
        train,
        evaluated,
        len(d.classes) or classes,
        f"{name}'s nominal size (not prepared yet)",
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _resources(count: int, cpus: float, gpus: float) -> str:
    return f"{count} x {{CPU: {cpus:g}, GPU: {gpus:g}}}"


#: FLOPs per unit of work, as multiples of ModelCost.flops (forward + backward to the input)
WORK_FLOPS = {"train": 1.5, "forward": 1 / 3, "recovery": AUGMENT_OVERHEAD}


def _duration(seconds: float) -> str:
    return (
        f"{seconds / 3600:.1f} h"
        if seconds >= 3600
        else f"{seconds / 60:.1f} min"
        if seconds >= 60
        else f"{seconds:.0f} s"
    )


class _Timer:
    """Wall time of a stage from the calibration table: per phase, units of work over parallel
    workers, each at the slower of its compute and feed rates."""

    def __init__(self, table: list[dict], gpu: str):
        self.table, self.gpu = table, gpu

    def compute(self, device: str, work: str, section, cost: ModelCost, clip, cpus: float) -> tuple[float, str]:
        """(units/s of one worker, "measured" or "assumed") for `work` with the model of `section`."""
        row = calibration.compute(self.table, device, work, section.model, section.width, section.depth, clip)
        threads = max(1.0, cpus) if device == "cpu" else 1.0
        if row:
            return row["rate"] * threads, "measured"
        return GPUS[device].tflops * 1e12 * threads / (WORK_FLOPS[work] * cost.flops), "assumed"

    def stepped(self, device: str, compute: tuple[float, str], batch: int) -> tuple[float, str]:
        """An assumed `compute` (clips/s, source) in steps of `batch` clips that each cost
        GPUS[device].step_ms on top (FLOPs count no launches, all-reduce or optimiser): a worker's
        share of a small global batch keeps its GPU waiting on steps. Measured rates include them."""
        rate, source = compute
        step = GPUS[device].step_ms / 1e3
        if not step or source != "assumed":
            return compute
        return batch / (batch / rate + step), f"{source}, {batch} a step + {step * 1e3:g} ms assumed"

    def feed(self, work: str, clip, cpus: float) -> tuple[float, str]:
        """(clips/s one worker's `cpus` decode or read, where the rate comes from); (inf, "") without a row."""
        found = calibration.feed(self.table, work, clip)
        return (found[0] * max(1.0, cpus), found[1]) if found else (math.inf, "")

    def time(self, stage: "Stage", gpus: float, start: str, phases: list[tuple]) -> None:
        """Set stage.wall_s, busy, gpu_hours and timing. gpus: booked over the stage; phases:
        (what, units, parallel, compute (units/s per worker, source) or None while the GPUs
        wait, feed (units/s per worker, source) or None when the work is in memory)."""
        wall = calibration.start(self.table, start)
        computing = 0.0
        parts = [f"start {_duration(wall)}" if wall else "start not measured"]
        for what, units, parallel, compute, feed in phases:
            rates = [x[0] for x in (compute, feed) if x is not None]
            seconds = units / (parallel * min(rates)) if units and rates else 0.0
            wall += seconds
            computing += units / (parallel * compute[0]) if compute and units else 0.0
            rate = ", ".join(
                f"{label} {x[0]:,.0f}/s {x[1]}" if math.isfinite(x[0]) else f"{label} not measured"
                for label, x in (("compute", compute), ("feed", feed))
                if x
            )
            parts.append(f"{what}: {_duration(seconds)} ({rate} per worker)")
        stage.wall_s = wall
        stage.gpu_hours = wall * gpus / 3600
        stage.busy = computing / wall if gpus and wall else None
        stage.timing = "; ".join(parts)
        if stage.busy is not None and computing and stage.busy < STARVED:
            stage.warnings.append(
                f"starves its GPUs: they would compute {stage.busy:.0%} of the {_duration(wall)} they are booked; "
                "the CPU work in its timing (decoding, reading) is the limit"
            )


def _device(gpu: str, gpus_per_worker: float) -> str:
    return gpu if gpus_per_worker > 0 else "cpu"


class _Probe:
    """Existence checks that survive a store this machine cannot read (no credentials, say):
    then a stage is 'unknown' and the plan says why once."""

    def __init__(self):
        self.error = ""

    def __call__(self, fn, *args, default=None):
        try:
            return fn(*args)
        except storage.StorageError as exc:
            self.error = self.error or str(exc)
            return default


def _distill_stage(run: _Run, cfg: DictConfig, method: Method) -> Stage:
    """distill + merge of `method` (cfg: its method_config): partitions, one actor's memory, time."""
    classes, size, teacher, timer, done = run.classes, run.size, run.teacher, run.timer, run.done
    d, gpu, where = cfg.distill, timer.gpu, layout.of(cfg)
    g = GPUS[gpu]
    videos = classes * d.ipc
    partitions = max(
        d.partitions,
        math.ceil(videos / d.max_videos_per_partition) if d.max_videos_per_partition else 0,
    )
    partitions = max(1, min(partitions, classes or 1))
    per_partition = math.ceil(videos / partitions) if videos else 0
    chunk = min(d.chunk_size, per_partition)
    state = OPTIMISER_BYTES * 3 * math.prod(size)
    actor_bytes = per_partition * state + chunk * teacher.activation_bytes + 4 * teacher.params
    stage = Stage(
        f"distill/{methods.arm_name(method, cfg.distill.draw)}",
        where.distill,
        done(where.synthetic_manifest),
        _resources(d.actors, d.cpus_per_actor, d.gpus_per_actor),
        f"init clips, {videos:,} synthetic videos in {partitions} partitions of <= {per_partition}",
        f"synthetic set {_gib(videos * (3 * math.prod(size) + size[1] * size[2]))} (uint8 clips + heat maps)",
        memory=f"{_gib(actor_bytes)} per actor ({per_partition} videos x {_gib(state)} state "
        f"+ chunks of {chunk} x {_gib(teacher.activation_bytes)} activations + teacher)",
    )
    device = _device(gpu, d.gpus_per_actor)
    rounds = math.ceil(partitions / max(1, d.actors))  # partitions run side by side, one per actor
    phases = [
        (
            f"{d.iterations} iterations x {videos:,} videos ({rounds} round(s) of partitions)",
            rounds * per_partition * d.iterations,
            1,
            timer.compute(device, "recovery", cfg.teacher, teacher, size, d.cpus_per_actor),
            None,
        )
    ]
    if d.labels.views:  # the stored labels: the teacher's forward on every view of every video
        phases.append(
            (
                f"labels: {d.labels.views} views x {videos:,} videos",
                rounds * per_partition * d.labels.views,
                1,
                timer.compute(device, "forward", cfg.teacher, teacher, size, d.cpus_per_actor),
                None,
            )
        )
    timer.time(stage, d.actors * d.gpus_per_actor if device != "cpu" else 0, "distill", phases)
    if d.gpus_per_actor and actor_bytes > g.memory_gib * 2**30 * 0.9:
        stage.warnings.append(
            f"a partition needs {_gib(actor_bytes)}, more than 90% of a {gpu}'s {g.memory_gib:g} GiB: "
            f"lower distill.max_videos_per_partition or distill.chunk_size"
        )
    return stage


def _evaluate_stage(run: _Run, cfg: DictConfig, method: Method) -> Stage:
    """The students of `method` (cfg: its method_config), one per seed, each trained then tested;
    online labels add a teacher forward per clip. Its wall time is its students' one after another
    (what they book); `_fleet_wall` has them run at once."""
    train, evaluated, classes, size = run.train, run.evaluated, run.classes, run.size
    where = layout.of(cfg, method)
    teacher, student, timer, done = run.teacher, run.student, run.timer, run.done
    e, d = cfg.evaluate, cfg.distill
    real = not methods.get(method).distils
    clips = train if real else classes * d.ipc
    device = _device(timer.gpu, e.gpus_per_worker)
    rate, source = timer.compute(device, "train", e, student, size, e.cpus_per_worker)
    if regimes.get(e.labels).for_student(not real).teacher_online:  # the teacher labels every view online
        labels, _ = timer.compute(device, "forward", cfg.teacher, teacher, size, e.cpus_per_worker)
        rate = 1 / (1 / rate + 1 / labels)
    per_worker = math.ceil(e.batch_size / e.num_workers)  # as ray_train.per_worker_batch
    stage = Stage(
        f"evaluate/{methods.arm_name(method, cfg.distill.draw)}",
        where.evaluate,
        done(where.results),
        _resources(e.num_workers, e.cpus_per_worker, e.gpus_per_worker),
        f"{len(e.seeds)} seeds x {e.epochs} epochs x {clips:,} clips, then {evaluated:,} test clips",
        "per-seed results",
    )
    seeds = len(e.seeds)
    stage.units, stage.unit_workers = seeds, e.num_workers
    timer.time(
        stage,
        e.num_workers * e.gpus_per_worker if device != "cpu" else 0,
        "evaluate",
        [
            (
                f"{seeds} seed(s) x {e.epochs} epochs x {clips:,} clips",
                seeds * e.epochs * clips,
                e.num_workers,
                timer.stepped(device, (rate, source), per_worker),
                timer.feed("read", size, e.cpus_per_worker),  # the clip cache, or the set's arrays
            ),
            (
                f"{seeds} test(s) of {evaluated:,} clips",
                seeds * evaluated,
                e.num_workers,
                timer.compute(device, "forward", e, student, size, e.cpus_per_worker),
                timer.feed("read", size, e.cpus_per_worker),
            ),
        ],
    )
    if e.num_workers > 1 and per_worker < 8:
        stage.warnings.append(
            f"{per_worker} clip(s) per worker per step (evaluate.batch_size {e.batch_size} over {e.num_workers} workers)"
        )
    return stage


@dataclass
class _Run:
    """What every stage's plan reads: the config, the counts (from the shard manifest when there
    is one), the clip size, the models' costs, the timer and the store's answers."""

    cfg: DictConfig
    manifest: dict | None
    probe: _Probe
    timer: _Timer
    train: int
    evaluated: int
    classes: int
    size: tuple[int, int, int]
    teacher: ModelCost
    student: ModelCost

    def done(self, uri: str) -> bool | None:
        """True, False or None (the store could not be read)."""
        return self.probe(storage.exists, uri)


def make_plan(cfg: DictConfig, gpu: str = "a10g", table: list[dict] | None = None) -> dict:
    """The plan: {"counts": ..., "stages": [Stage, ...], "gpu_hours", "dollars", "gpu", "wall_s"},
    one function per stage, the arms in the pipeline's order (`methods.arms`: each method, and each
    of its init draws where it distils).

    table: calibration rows (default: the shipped table, `tsgd_ray.calibration`).

    Raises:
        KeyError: an unknown `gpu` (one of GPUS).
    """
    g = GPUS[gpu]
    table = calibration.load() if table is None else table
    probe = _Probe()
    manifest = probe(finished_manifest, cfg)
    train, evaluated, classes, source = _counts(cfg, manifest)
    size = layout.clip_size(cfg)
    t, e = cfg.teacher, cfg.evaluate
    run = _Run(
        cfg,
        manifest,
        probe,
        _Timer(table, gpu),
        train,
        evaluated,
        classes,
        size,
        model_cost(t.model, t.width, t.depth, size, max(classes, 1)),
        model_cost(e.model, e.width, e.depth, size, max(classes, 1)),
    )
    stages = [_prepare_stage(run), _teacher_stage(run), _stats_stage(run)]
    for method, draw in methods.arms(cfg):
        mcfg = methods.method_config(cfg, method, draw)
        if methods.get(method).distils:
            stages.append(_distill_stage(run, mcfg, method))
        stages.append(_evaluate_stage(run, mcfg, method))

    todo = [st for st in stages if not st.finished]
    fleet = [st for st in todo if st.name.startswith("evaluate/")]
    fleet_wall = _fleet_wall(cfg, fleet, table)
    return {
        "wall_s": sum(st.wall_s for st in todo if st not in fleet) + fleet_wall,
        "fleet_wall_s": fleet_wall,
        "counts": {"train": train, "eval": evaluated, "classes": classes, "source": source},
        "stages": stages,
        "gpu": gpu,
        "gpu_hours": sum(st.gpu_hours for st in todo),
        "dollars": sum(st.gpu_hours for st in todo) * g.dollars_per_hour,
        "storage_error": probe.error,
    }


def _prepare_stage(run: _Run) -> Stage:
    """Shards (probe and transcode on CPUs, or the built-in set generated) and the clip cache,
    decoded once before any stage books a GPU."""
    cfg, manifest, train, evaluated = run.cfg, run.manifest, run.train, run.evaluated
    clip_bytes = 3 * math.prod(run.size)
    shard_bytes = sum(x["bytes"] for x in manifest["shards"]) if manifest else 0
    stage = Stage(
        "prepare",
        shards_root(cfg),
        None if run.probe.error else manifest is not None,
        f"{cfg.data.prepare_concurrency or 'all free'} CPU tasks, 1 CPU each"
        + (
            f"; {_resources(cfg.data.decode_actors, cfg.data.decode_cpus_per_actor, 0)} decoding"
            if cfg.data.clip_cache
            else ""
        ),
        f"{train + evaluated:,} videos under {cfg.data.root or 'the built-in dataset'}",
        f"{_gib(shard_bytes)} of shards" if manifest else "shards (size known after prepare)",
    )
    views = cfg.data.views_per_video if cfg.data.sampling.value == "random" else 1
    per_core = calibration.prepare(run.timer.table, cfg.data.transcode_short_side)
    parts = []
    if per_core and cfg.data.root:  # the built-in dataset is generated, not probed and transcoded
        core_hours = (train + evaluated) / per_core / 3600
        parts.append(f"{core_hours:,.1f} core-hours (probe + transcode, {per_core:.2f} videos/s per core, measured)")
        if cfg.data.prepare_concurrency:
            stage.wall_s = core_hours * 3600 / cfg.data.prepare_concurrency
    if cfg.data.clip_cache:  # decoded once, on CPUs, before any stage books a GPU
        decoded = train * views + evaluated
        rate, where = run.timer.feed("decode", run.size, cfg.data.decode_cpus_per_actor)
        stage.reads += f"; the clip cache: {decoded:,} clips decoded once"
        stage.writes += f", a clip cache of {_gib(decoded * clip_bytes)}"
        if math.isfinite(rate):
            seconds = decoded / (rate * cfg.data.decode_actors)
            if stage.wall_s or not parts:  # not beside a probe time of unknown wall (all free CPUs)
                stage.wall_s += seconds
            parts.append(
                f"clip cache: {_duration(seconds)} ({cfg.data.decode_actors} decoders, {rate:,.0f} clips/s each {where})"
            )
        if manifest and not run.done(storage.join(clip_cache.cache_dir(cfg, "train"), clip_cache.MARKER)):
            stage.finished = False
    stage.timing = "; ".join(parts)
    return stage


def _teacher_stage(run: _Run) -> Stage:
    """The teacher's epochs over the training clips (nothing to do for an imported checkpoint)."""
    cfg, t, train, timer = run.cfg, run.cfg.teacher, run.train, run.timer
    imported, where = bool(t.checkpoint), layout.of(cfg)
    stage = Stage(
        "teacher",
        where.teacher,
        run.done(where.teacher_marker),
        "none (imported checkpoint)" if imported else _resources(t.num_workers, t.cpus_per_worker, t.gpus_per_worker),
        t.checkpoint if imported else f"{t.epochs} epochs x {train:,} clips",
        f"teacher.pt, {_gib(4 * run.teacher.params)} ({run.teacher.params:,} parameters)",
    )
    if imported:
        return stage
    device = _device(timer.gpu, t.gpus_per_worker)
    phase = (
        f"{t.epochs} epochs x {train:,} clips",
        t.epochs * train,
        t.num_workers,
        timer.stepped(
            device,
            timer.compute(device, "train", t, run.teacher, run.size, t.cpus_per_worker),
            math.ceil(t.batch_size / t.num_workers),
        ),
        timer.feed("read" if cfg.data.clip_cache else "decode", run.size, t.cpus_per_worker),
    )
    timer.time(stage, t.num_workers * t.gpus_per_worker if device != "cpu" else 0, "teacher", [phase])
    return stage


def _stats_stage(run: _Run) -> Stage:
    """One probe pass of the teacher over the training clips (class statistics, init candidates),
    then the chosen init clips read or decoded."""
    cfg, t, s, timer = run.cfg, run.cfg.teacher, run.cfg.stats, run.timer
    train, classes, size, where = run.train, run.classes, run.size, layout.of(cfg)
    statistics_bytes = 2 * 8 * classes * run.teacher.bn_channels  # int64 sums and squares per class and channel
    init = layout.init_per_class(cfg)
    stage = Stage(
        "stats",
        where.stats,
        run.done(where.stats_marker),
        _resources(s.actors, s.cpus_per_actor, s.gpus_per_actor),
        f"{train:,} clips once ({s.init_views} view(s) each)",
        f"class statistics {_gib(statistics_bytes)}, init clips {_gib(classes * init * 3 * math.prod(size))}",
    )
    device = _device(timer.gpu, s.gpus_per_actor)
    cached = cfg.data.clip_cache and s.init_views == 1  # as stats.units: extra views need the videos
    verb = "read" if cached else "decode"
    decoders = cfg.data.decode_actors * cfg.data.decode_cpus_per_actor
    timer.time(
        stage,
        s.actors * s.gpus_per_actor if device != "cpu" else 0,
        "stats",
        [
            (
                f"{verb} and probe {train * s.init_views:,} clips",
                train * s.init_views,
                s.actors,
                timer.compute(device, "forward", t, run.teacher, size, s.cpus_per_actor),
                timer.feed(verb, size, s.cpus_per_actor),
            ),
            (
                f"init: {verb} {classes * init:,} chosen clips",
                classes * init,
                1,
                None,
                timer.feed(verb, size, decoders),
            ),
        ],
    )
    return stage


def _fleet_wall(cfg: DictConfig, stages: list[Stage], table: list[dict]) -> float:
    """Wall time of the evaluation fleet (`tsgd_ray.runtime.fleet`): every student of `stages` on
    slots, each slot one Ray Train run that starts once and trains its students in turn, filled
    longest first; as many slots as evaluate.students_at_once, or else as the widest stage of the
    run holds workers (the cluster holds at least that)."""
    if not stages:
        return 0.0
    from tsgd_ray.runtime.fleet import assign

    start = calibration.start(table, "evaluate")
    students = [(st.wall_s - start) / st.units for st in stages for _ in range(st.units)]
    widths = [st.unit_workers for st in stages for _ in range(st.units)]
    t, s, d = cfg.teacher, cfg.stats, cfg.distill
    room = max(t.num_workers, s.actors, d.actors, *widths)
    slots = cfg.evaluate.students_at_once or max(1, room // max(widths))
    return start + max(sum(students[i] for i in slot) for slot in assign(students, min(slots, len(students))))


def render(plan: dict) -> str:
    """The plan as text: one block per stage, then the total."""
    c, gpu = plan["counts"], plan["gpu"]
    lines = [
        f"plan: {c['train']:,} train / {c['eval']:,} eval videos, {c['classes']} classes (from {c['source']}); "
        f"times on a {gpu} (compute rates 'assumed' are FLOPs at {GPUS[gpu].tflops:g} TFLOPS, "
        "'measured' come from the calibration table)"
    ]
    if plan["storage_error"]:
        lines.append(f"which stages are finished is unknown: {plan['storage_error']}")
    for st in plan["stages"]:
        state = "finished, skipped" if st.finished else "to run" if st.finished is False else "unknown"
        if not st.finished and st.wall_s:
            state += f", ~{_duration(st.wall_s)} wall"
            if st.gpu_hours:
                state += f", ~{st.gpu_hours:.2f} GPU-h booked, GPUs {st.busy:.0%} busy"
        lines += [
            f"{st.name:<22} {state}",
            f"  folder     {st.folder}",
            f"  resources  {st.resources}",
            f"  reads      {st.reads}",
            f"  writes     {st.writes}",
        ]
        if st.memory:
            lines.append(f"  memory     {st.memory}")
        if st.timing:
            lines.append(f"  time       {st.timing}")
        lines += [f"  WARNING    {w}" for w in st.warnings]
    if plan["fleet_wall_s"]:
        lines.append(f"evaluation fleet: its students at once, ~{_duration(plan['fleet_wall_s'])} wall")
    lines.append(
        f"total to run: ~{_duration(plan['wall_s'])} wall, ~{plan['gpu_hours']:.2f} GPU-hours booked, "
        f"~${plan['dollars']:.2f} at ${GPUS[gpu].dollars_per_hour:g}/h on demand "
        "(node start-up and autoscaling come on top; docs/sizing.md)"
    )
    return "\n".join(lines)
