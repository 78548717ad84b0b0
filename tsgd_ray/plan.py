"""The plan of a run before any spend: per stage, whether it is finished, what it asks Ray for,
what it reads and writes, the memory of one actor, and GPU-hours and cost.

`make_plan(cfg, gpu)` does no heavy work: it reads stage markers and the shard manifest (when
prepare has run), and counts the model's FLOPs and saved activations on torch's meta device.
Before prepare, video and class counts are the dataset's nominal sizes (NOMINAL). GPU time is
FLOPs / GPUS[gpu].tflops, an assumed effective throughput (docs/sizing.md: measure it with
benchmarks/sizing.py on a GPU node); decoding runs on CPUs beside it and is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import DictConfig

from tsgd_ray import layout, methods, storage
from tsgd_ray.config import Method
from tsgd_ray.data.shards import finished_manifest, shards_root


@dataclass(frozen=True)
class GPU:
    memory_gib: float
    tflops: float  # assumed effective bf16 throughput on small 3D CNNs (docs/sizing.md)
    dollars_per_hour: float  # on-demand, us-west-2 list price of the usual instance (docs/sizing.md)


GPUS = {
    "a10g": GPU(24, 20, 1.21),  # g5.2xlarge
    "l4": GPU(24, 15, 0.98),  # g6.2xlarge
    "h100": GPU(80, 150, 12.29),  # one eighth of a p5.48xlarge
}
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
    gpu_hours: float = 0.0
    memory: str = ""
    warnings: list[str] = field(default_factory=list)


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


def _hours(flops: float, gpu: GPU) -> float:
    return flops / (gpu.tflops * 1e12) / 3600


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


def _distill_stage(
    cfg: DictConfig, method: Method, classes: int, size: tuple[int, int, int], teacher: ModelCost, gpu: str, done
) -> Stage:
    """distill + merge of `method` (cfg: its method_config): partitions, one actor's memory, GPU time."""
    d, g = cfg.distill, GPUS[gpu]
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
        f"distill/{method.value}",
        layout.distill_dir(cfg),
        done(storage.join(layout.synthetic_dir(cfg), layout.SYNTHETIC_MANIFEST)),
        _resources(d.actors, d.cpus_per_actor, d.gpus_per_actor),
        f"init clips, {videos:,} synthetic videos in {partitions} partitions of <= {per_partition}",
        f"synthetic set {_gib(videos * (3 * math.prod(size) + size[1] * size[2]))} (uint8 clips + heat maps)",
        _hours(videos * d.iterations * teacher.flops * AUGMENT_OVERHEAD, g),
        f"{_gib(actor_bytes)} per actor ({per_partition} videos x {_gib(state)} state "
        f"+ chunks of {chunk} x {_gib(teacher.activation_bytes)} activations + teacher)",
    )
    if d.gpus_per_actor and actor_bytes > g.memory_gib * 2**30 * 0.9:
        stage.warnings.append(
            f"a partition needs {_gib(actor_bytes)}, more than 90% of a {gpu}'s {g.memory_gib:g} GiB: "
            f"lower distill.max_videos_per_partition or distill.chunk_size"
        )
    return stage


def make_plan(cfg: DictConfig, gpu: str = "a10g") -> dict:
    """The plan: {"counts": ..., "stages": [Stage, ...], "gpu_hours", "dollars", "gpu"}.

    Raises:
        KeyError: an unknown `gpu` (one of GPUS).
    """
    g = GPUS[gpu]
    probe = _Probe()
    manifest = probe(finished_manifest, cfg)
    _done = lambda uri: probe(storage.exists, uri)  # noqa: E731 - True, False or None (unknown)
    train, evaluated, classes, source = _counts(cfg, manifest)
    size = layout.clip_size(cfg)
    clip_bytes = 3 * math.prod(size)
    t, s, d, e = cfg.teacher, cfg.stats, cfg.distill, cfg.evaluate
    teacher = model_cost(t.model, t.width, t.depth, size, max(classes, 1))
    student = model_cost(e.model, e.width, e.depth, size, max(classes, 1))
    stages = []

    shard_bytes = sum(x["bytes"] for x in manifest["shards"]) if manifest else 0
    stages.append(
        Stage(
            "prepare",
            shards_root(cfg),
            None if probe.error else manifest is not None,
            f"{cfg.data.prepare_concurrency or 'all free'} CPU tasks, 1 CPU each",
            f"{train + evaluated:,} videos under {cfg.data.root or 'the built-in dataset'}",
            f"{_gib(shard_bytes)} of shards" if manifest else "shards (size known after prepare)",
        )
    )

    teacher_flops = t.epochs * train * 1.5 * teacher.flops  # weight gradients add about half
    imported = bool(t.checkpoint)
    stages.append(
        Stage(
            "teacher",
            layout.teacher_dir(cfg),
            _done(storage.join(layout.teacher_dir(cfg), layout.TEACHER_MARKER)),
            "none (imported checkpoint)"
            if imported
            else _resources(t.num_workers, t.cpus_per_worker, t.gpus_per_worker),
            t.checkpoint if imported else f"{t.epochs} epochs x {train:,} clips",
            f"teacher.pt, {_gib(4 * teacher.params)} ({teacher.params:,} parameters)",
            0.0 if imported else _hours(teacher_flops, g),
        )
    )

    statistics_bytes = 2 * 8 * classes * teacher.bn_channels  # int64 sums and squares per class and channel
    stages.append(
        Stage(
            "stats",
            layout.stats_dir(cfg),
            _done(storage.join(layout.stats_dir(cfg), layout.STATS_MARKER)),
            _resources(s.actors, s.cpus_per_actor, s.gpus_per_actor),
            f"{train:,} clips once ({s.init_views} view(s) each)",
            f"class statistics {_gib(statistics_bytes)}, init clips {_gib(classes * d.ipc * clip_bytes)}",
            _hours(train * s.init_views * teacher.flops / 3, g),
        )
    )

    for method in dict.fromkeys([d.method, *e.baselines]):  # as `run` does them
        mcfg = methods.method_config(cfg, method)
        if methods.get(method).distils:
            stages.append(_distill_stage(mcfg, method, classes, size, teacher, gpu, _done))
        clips = train if not methods.get(method).distils else classes * d.ipc
        epochs = mcfg.evaluate.epochs
        per_seed = epochs * clips * (student.flops * 1.5 + teacher.flops / 3) + evaluated * student.flops / 3
        stages.append(
            Stage(
                f"evaluate/{method.value}",
                layout.evaluate_dir(mcfg, method),
                _done(layout.results_uri(mcfg, method)),
                _resources(e.num_workers, e.cpus_per_worker, e.gpus_per_worker),
                f"{len(e.seeds)} seeds x {epochs} epochs x {clips:,} clips, then {evaluated:,} test clips",
                "per-seed results",
                _hours(len(e.seeds) * per_seed, g),
            )
        )

    todo = sum(st.gpu_hours for st in stages if not st.finished)
    return {
        "counts": {"train": train, "eval": evaluated, "classes": classes, "source": source},
        "stages": stages,
        "gpu": gpu,
        "gpu_hours": todo,
        "dollars": todo * g.dollars_per_hour,
        "storage_error": probe.error,
    }


def render(plan: dict) -> str:
    """The plan as text: one block per stage, then the total."""
    c, g = plan["counts"], GPUS[plan["gpu"]]
    lines = [
        f"plan: {c['train']:,} train / {c['eval']:,} eval videos, {c['classes']} classes (from {c['source']}); "
        f"GPU times on a {plan['gpu']} at an assumed {g.tflops:g} TFLOPS"
    ]
    if plan["storage_error"]:
        lines.append(f"which stages are finished is unknown: {plan['storage_error']}")
    for st in plan["stages"]:
        state = "finished, skipped" if st.finished else "to run" if st.finished is False else "unknown"
        if not st.finished and st.gpu_hours:
            state += f", ~{st.gpu_hours:.2f} GPU-h"
        lines += [
            f"{st.name:<22} {state}",
            f"  folder     {st.folder}",
            f"  resources  {st.resources}",
            f"  reads      {st.reads}",
            f"  writes     {st.writes}",
        ]
        if st.memory:
            lines.append(f"  memory     {st.memory}")
        lines += [f"  WARNING    {w}" for w in st.warnings]
    lines.append(
        f"total to run: ~{plan['gpu_hours']:.2f} GPU-hours, ~${plan['dollars']:.2f} at ${g.dollars_per_hour:g}/h on demand "
        "(compute only: node start-up and idle time come on top; docs/sizing.md)"
    )
    return "\n".join(lines)
