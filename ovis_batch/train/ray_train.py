"""Fine-tuning on Ray Train: the same training process on several workers (GPUs, nodes), data parallel.

Each Ray Train worker runs `session.run_training(plan)`: Ray Train starts the processes, sets up the
torch process group (NCCL on GPUs, gloo on CPUs) and the rank variables, and the Hugging Face Trainer
inside each worker picks them up (DDP, or DeepSpeed ZeRO when the settings ask for it). Rank 0 writes
the checkpoints straight into RUN_DIR in the standard layout, so RUN_DIR must be a folder every node
sees (a shared filesystem) and the pairs data a path or URI every node can read. Ray's own run
records go to `RUN_DIR/ray/`; nothing is copied into Ray's checkpoint storage.
"""

from __future__ import annotations

from typing import Any

from ovis_batch.train.job import FinetunePlan

RAY_STORAGE = "ray"


def _train_worker(config: dict[str, Any]) -> None:
    from ovis_batch.train.session import run_training

    run_training(config["plan"])


def train_on_ray(plan: FinetunePlan) -> None:
    """Run the plan on `settings.workers` Ray Train workers of the connected cluster; raises if one fails."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = plan.settings
    resources = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker > 0:
        resources["GPU"] = settings.gpus_per_worker
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(name="finetune", storage_path=str(plan.run_dir.resolve() / RAY_STORAGE)),
    )
    trainer.fit()
