"""Teacher stage: Ray Train DDP over the clip cache (or clips decoded live), or a user's checkpoint imported.

Writes ``<teacher_dir>/teacher.pt`` (state dict + class map, loadable with weights_only=True) and
then ``teacher.json`` (the completion marker: sha256, source, loss per epoch). Ray Train keeps a
checkpoint per epoch under ``<teacher_dir>/ray_train``; a rerun after a crash resumes from the
latest one, and a rerun after success does nothing.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from omegaconf import DictConfig

from tsgd_ray import layout, storage
from tsgd_ray.artifacts import new_teacher
from tsgd_ray.console import Progress
from tsgd_ray.core import training
from tsgd_ray.core.models import checkpoint_bytes, load_checkpoint
from tsgd_ray.data.shards import read_manifest, shards_root
from tsgd_ray.runtime import ray_train
from tsgd_ray.runtime.cluster import check_gpus
from tsgd_ray.settings import teacher_settings
from tsgd_ray.stages.skeleton import run_stage
from tsgd_ray.tracking import OFF, RunContext, is_mlflow_uri, live_curve, read_mlflow_checkpoint

log = logging.getLogger(__name__)


def _train_worker(loop_config: dict) -> None:
    """Ray Train loop: `training.fit` over teacher.epochs passes of this worker's share of the
    clips, a checkpoint (and a live-curve report) after every epoch; resumes from the latest."""
    import ray.train
    import ray.train.torch

    cfg, classes, source = loop_config["cfg"], loop_config["classes"], loop_config["source"]
    t = cfg.teacher
    settings = teacher_settings(cfg)
    rank, world, device = ray_train.worker_setup(t, "teacher", cfg.device)
    batch_size = ray_train.per_worker_batch(t.batch_size, world)
    model = ray.train.torch.prepare_model(new_teacher(cfg, len(classes)))
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    resume = ray_train.latest_state()
    progress = Progress("teacher", t.epochs, "epoch")
    streams: dict[int, object] = {}
    downloaded = [source.store_bytes()]
    pinned = device.type == "cuda"

    def batches(epoch: int):
        streams[epoch] = source.batches("train", epoch, batch_size, rank, world, cfg.seed * 1000 + epoch, pinned)
        return streams[epoch]

    def step(batch: dict, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        x = settings.inputs.model_input(batch["clip"].to(device, non_blocking=True))  # uint8 over the bus
        return training.teacher_step(model, optimizer, x, batch["label"].to(device), settings, generator)

    def checkpoint_and_report(state: training.FitState) -> None:
        row = state.history[-1]
        row["bad_videos"] = source.bad("train", streams.pop(state.epoch))
        row["workers"] = world  # fewer after a lost node, where teacher.min_workers allows
        row["store_bytes"] = source.store_bytes() - downloaded[0]  # through rank 0's node cache
        downloaded[0] += row["store_bytes"]
        if rank == 0:
            progress.update(state.epoch + 1, loss=row["loss"])
        ray_train.report({"epoch": state.epoch, "loss": row["loss"]}, state, rank)

    training.fit(
        model,
        batches,
        step,
        settings.fit,
        source.steps("train", world, batch_size),
        [checkpoint_and_report],
        resume=resume,
        epoch_context=lambda: ray_train.uneven_inputs(model),
        generator=generator,
    )


def _train(cfg: DictConfig, folder: str, classes: list[str], curve=None) -> tuple[torch.nn.Module, list[dict]]:
    """Train the teacher with Ray Train, its runs under `folder` (the teacher's); `curve`: a
    controller-side callback (`tracking.live_curve`)."""
    from ray.train.torch import TorchTrainer

    model = new_teacher(cfg, len(classes))
    if cfg.teacher.epochs == 0:
        return model, []
    check_gpus(cfg, "teacher.gpus_per_worker", cfg.teacher.gpus_per_worker)
    source = ray_train.ClipSource(cfg, {"train": "train"})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg, "classes": classes, "source": source},
        scaling_config=ray_train.scaling_config(cfg.teacher, cfg.device),
        torch_config=ray_train.torch_config(cfg.teacher, cfg.device),
        run_config=ray_train.run_config(
            storage.join(folder, "ray_train"), "teacher", cfg.ray.max_failures, [curve] if curve else []
        ),
        datasets=source.datasets,
        dataset_config=ray_train.data_config(source.datasets),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"teacher training under {folder} finished without a checkpoint")
    state = ray_train.checkpoint_state(result.checkpoint)
    model.load_state_dict(state["model"])
    return model, state["history"]


def run_teacher(cfg: DictConfig, run: RunContext = OFF) -> dict:
    """Train (or import) the teacher unless this config's teacher is finished; returns its marker.
    Logs to a child "teacher" of `run`: the curve, live; a trained teacher as an MLflow model,
    whose URI is tagged on `run` too.

    Raises:
        ManifestError: shards not prepared. ModelError: an imported checkpoint that does not fit.
    """
    classes = read_manifest(shards_root(cfg))["classes"]
    where = layout.of(cfg)

    def work(stage: RunContext) -> dict:
        source_uri = cfg.teacher.checkpoint
        if source_uri:
            data = (
                read_mlflow_checkpoint(cfg, source_uri) if is_mlflow_uri(source_uri) else storage.read_bytes(source_uri)
            )
            model = load_checkpoint(new_teacher(cfg, len(classes)), data, classes)
            history, source = [], "imported"
        else:
            model, history = _train(cfg, where.teacher, classes, live_curve(stage.uri, stage.run_id) if stage else None)
            source = "trained"
        storage.write_once(
            where.teacher_file,
            checkpoint_bytes(model, classes, {"model": cfg.teacher.model, "source": source}),
        )
        stored = storage.read_bytes(where.teacher_file)
        digest = hashlib.sha256(stored).hexdigest()  # of what is stored
        stage.set_tags({"teacher_sha256": digest, "source": source})  # its curve was logged live
        if stage and source == "trained":  # reusable elsewhere as teacher.checkpoint=models:/<id>
            t = cfg.teacher
            model_uri = stage.log_teacher(
                stored,
                {"model": t.model, "width": t.width, "depth": t.depth, "classes": len(classes), "sha256": digest},
            )
            stage.parent.set_tags({"teacher_model": model_uri})
            log.info("teacher: logged to MLflow as %s (teacher.checkpoint=%s reuses it)", model_uri, model_uri)
        return {
            "uri": where.teacher_file,
            "sha256": digest,
            "source": source,
            "classes": len(classes),
            "history": history,
        }

    return run_stage(cfg, "teacher", where.teacher_marker, work, run)
