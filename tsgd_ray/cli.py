"""`tsgd-ray <command> CONFIG [key=value ...]`: the command-line entry point.

Every command loads and validates the config before any Ray work; errors a user can cause
(`tsgd_ray.errors.UserError`) end the program with one line on stderr and exit code 2.
`python -m tsgd_ray <command> CONFIG [key=value ...]` (for `ray job submit`) is the same program.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

from omegaconf import DictConfig

from tsgd_ray import __version__
from tsgd_ray.config import load_config, to_yaml
from tsgd_ray.console import Console, echo
from tsgd_ray.errors import find_user_error

log = logging.getLogger("tsgd_ray")


def command_config(cfg: DictConfig) -> int:
    """Print the resolved config as YAML."""
    print(to_yaml(cfg), end="")
    return 0


def command_prepare(cfg: DictConfig, verbose: bool = False) -> int:
    """Catalog the dataset, write its shards and manifest, and decode its clips once (the clip caches)."""
    from tsgd_ray.data import clip_cache
    from tsgd_ray.data.shards import shards_root
    from tsgd_ray.runtime.cluster import ray_for
    from tsgd_ray.stages.prepare import decode_once, run_prepare

    with Console(cfg.storage.output_root, "prepare", verbose), ray_for(cfg, verbose):
        manifest = run_prepare(cfg)
        caches = decode_once(cfg)
        counts = {split: sum(c.values()) for split, c in manifest["counts"].items()}
        echo(
            json.dumps(
                {
                    "shards": shards_root(cfg),
                    "classes": len(manifest["classes"]),
                    "videos": counts,
                    "shard_files": len(manifest["shards"]),
                    "skipped": len(manifest["skipped"]),
                    "decoded": {split: clip_cache.decodes(marker) for split, marker in caches.items()},
                }
            )
        )
    return 0


def _stages(cfg: DictConfig, stages: tuple[str, ...], command: str, verbose: bool) -> int:
    from tsgd_ray.runtime.cluster import ray_for
    from tsgd_ray.stages.pipeline import preflight, results_table, run_stages
    from tsgd_ray.tracking import Tracker

    catalog = preflight(cfg, stages)  # a user error found here leaves the output root untouched
    with Console(cfg.storage.output_root, command, verbose):
        with ray_for(cfg, verbose), Tracker(cfg, command) as tracker:
            results = run_stages(cfg, stages, tracker.context(), catalog)
        if results:
            echo(results_table(results))
            teacher = [r["teacher_top1"] for r in results if "teacher_top1" in r]
            if teacher:
                echo(f"teacher (the ceiling) on the same test clips: top-1 {100 * teacher[0]:.1f} %")
        echo(tracker.summary())
    return 0


def command_run(cfg: DictConfig, verbose: bool = False) -> int:
    """Run every stage (prepare, teacher, stats, init, distill, merge, evaluate), skipping finished ones."""
    from tsgd_ray.stages.pipeline import STAGES

    return _stages(cfg, STAGES, "run", verbose)


def command_plan(cfg: DictConfig, gpu: str = "a10g") -> int:
    """Print the plan: per stage, finished or not, resources, reads and writes, memory, GPU-hours, cost."""
    from tsgd_ray.plan import make_plan, render

    print(render(make_plan(cfg, gpu)))
    return 0


def command_export(cfg: DictConfig, to: str, fmt: str, method: str = "") -> int:
    """Export the merged synthetic set (of distill.method, or --method) as mp4, safetensors or webdataset."""
    from tsgd_ray import layout, storage
    from tsgd_ray.config import Method
    from tsgd_ray.methods import method_config
    from tsgd_ray.synthetic import export

    source = layout.of(method_config(cfg, Method(method)) if method else cfg).synthetic
    summary = export(source, to, fmt)
    echo(
        f"exported {summary['videos']} videos of {len(summary['classes'])} classes from {source} to "
        f"{storage.absolute(to)} as {fmt} ({len(summary['files'])} files)"
    )
    return 0


def command_doctor(cfg: DictConfig) -> int:
    """Check this machine, or every node of the cluster, for the config: torch, CUDA, decoders, storage, MLflow, Ray."""
    from tsgd_ray.doctor import run_doctor

    run_doctor(cfg, echo)
    return 0


def command_compare(cfg: DictConfig) -> int:
    """Compare the finished runs of the config's MLflow experiment: differing params, top-1/top-5."""
    from tsgd_ray.tracking import compare_runs

    print(compare_runs(cfg))
    return 0


def _stage_command(stage: str) -> Callable[..., int]:
    def command(cfg: DictConfig, verbose: bool = False) -> int:
        return _stages(cfg, (stage,), stage, verbose)

    command.__doc__ = f"Run the {stage} stage only (its inputs must be finished)."
    return command


COMMANDS: dict[str, Callable[..., int]] = {
    "config": command_config,
    "prepare": command_prepare,
    "run": command_run,
    **{stage: _stage_command(stage) for stage in ("teacher", "stats", "init", "distill", "merge", "evaluate")},
    "plan": command_plan,
    "doctor": command_doctor,
    "compare": command_compare,
    "export": command_export,
}


RAY_COMMANDS = ("prepare", "run", "teacher", "stats", "init", "distill", "merge", "evaluate")  # quiet console, log file


def run_command(name: str, config: str, overrides: Sequence[str], **options) -> int:
    """Load the config, then run the named command (with the command's own `options`).

    A UserError, raised here or inside a Ray task, actor or Ray Train worker, ends as its one-line
    message on stderr and exit code 2; anything else is a bug and keeps its traceback.
    """
    try:
        cfg = load_config(config, overrides)
        return COMMANDS[name](cfg, **options)
    except Exception as exc:
        error = find_user_error(exc)
        if error is None:
            raise
        print(f"tsgd-ray {name}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsgd-ray", description="Temporal Saliency-Guided Distillation of video datasets on Ray."
    )
    parser.add_argument("--version", action="version", version=f"tsgd-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0])
        p.add_argument(
            "config", help="a YAML file, or the name of a shipped config (default, ucf101, hmdb51, kinetics400, ssv2)"
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.num_frames=8")
        if name == "plan":
            from tsgd_ray.plan import GPUS

            p.add_argument(
                "--gpu", choices=sorted(GPUS), default="a10g", help="the GPU the times, memory and cost assume"
            )
        if name == "export":
            from tsgd_ray.config import Method
            from tsgd_ray.synthetic import FORMATS

            p.add_argument("--to", required=True, help="the folder or URI to write (must not hold an export)")
            p.add_argument("--format", dest="fmt", choices=FORMATS, default="safetensors", help="what to write")
            p.add_argument(
                "--method",
                choices=[m.value for m in Method if m.value != "full"],
                default="",
                help="whose set (default: distill.method)",
            )
        if name in RAY_COMMANDS:
            p.add_argument(
                "--verbose",
                action="store_true",
                help="show Ray's and the workers' own output on the console too (it is always in the log file)",
            )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, options and key=value overrides in any order (argparse alone stops at an
    option between overrides)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tsgd_ray").setLevel(logging.INFO)  # before a Console opens (preflight) and after
    options = {"gpu": args.gpu} if args.command == "plan" else {}
    if args.command == "export":
        options.update(to=args.to, fmt=args.fmt, method=args.method)
    if args.command in RAY_COMMANDS:
        options["verbose"] = args.verbose
    return run_command(args.command, args.config, args.overrides, **options)


if __name__ == "__main__":
    sys.exit(main())
