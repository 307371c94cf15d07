"""Where ``ctx-callback watch`` logs its rows: the training run's TensorBoard log dir, W&B run and MLflow run.

Each sink writes a row as the Trainer's own integration would have written it from ``Trainer.log``, so the watcher's
curves land next to the training curves:

- TensorBoard (:class:`TensorBoardSink`): scalars tagged ``train/<key>`` (the Trainer's ``rewrite_logs``) at the
  checkpoint's global step, in a new event file of the given log dir (``output_dir/runs/<run>`` by default for the
  Trainer; any folder works).
- W&B (:class:`WandbSink`): ``wandb.init(id=RUN_ID, resume="allow")``, then ``run.log({"train/<key>": value,
  "train/global_step": step})``, the step metric the Trainer's ``WandbCallback`` defines. Offline mode works
  (``WANDB_MODE=offline``: the rows go into a local run folder, synced later).
- MLflow (:class:`MlflowSink`): ``MlflowClient(tracking_uri).log_batch(run_id, metrics)`` with the keys unchanged
  (as the Trainer's ``MLflowCallback`` logs them) at the global step; it does not make the run active, so a training
  process logging to it at the same time is not disturbed.

Packages are imported only when their sink is asked for: a missing one is a :class:`~ctx_callback.errors.
ConfigurationError` naming the package to install.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from .errors import ConfigurationError

__all__ = ["MlflowSink", "TensorBoardSink", "WandbSink", "make_sinks"]


def _plain(row: dict[str, Any]) -> dict[str, float]:
    """Plain Python floats (TensorBoard drops other types); NaN kept (the Trainer logs it too)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _need(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigurationError(f"logging to {package} needs the {package!r} package ({err}); "
                                 f"pip install {package}, or drop the option.") from None


class TensorBoardSink:
    """Writes rows into a TensorBoard log dir (module docstring).

    Args:
        log_dir: The training run's TensorBoard log dir (created if missing).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike) -> None:
        _need("tensorboard", "tensorboard")
        self.log_dir = os.fspath(log_dir)
        self.writer: Any = None  # created at the first row: a restart that logs nothing adds no event file

    def log(self, row: dict[str, Any], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)
        for key, value in _plain(row).items():
            self.writer.add_scalar(key if key.startswith("eval_") else f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    """Resumes a W&B run by id and logs rows into it (module docstring).

    Args:
        run_id: The run's id (``wandb.run.id`` in the training process, or ``WANDB_RUN_ID``).
        project: Its project (default: W&B's, from ``WANDB_PROJECT``).
        entity: Its entity.
    """

    name = "wandb"

    def __init__(self, run_id: str, project: str | None = None, entity: str | None = None) -> None:
        wandb = _need("wandb", "wandb")
        self.run = wandb.init(id=run_id, resume="allow", project=project, entity=entity)

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({**{f"train/{k}": v for k, v in _plain(row).items()}, "train/global_step": int(step)})

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """Logs rows into an existing MLflow run (module docstring).

    Args:
        run_id: The run's id (``mlflow.active_run().info.run_id`` in the training process).
        tracking_uri: The tracking server or store (default: MLflow's, from ``MLFLOW_TRACKING_URI``).
    """

    name = "mlflow"

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        tracking = _need("mlflow.tracking", "mlflow")
        self.client = tracking.MlflowClient(tracking_uri=tracking_uri)
        self.client.get_run(run_id)  # fails now, naming the run, rather than at the first row
        self.run_id = run_id

    def log(self, row: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(step)) for k, v in _plain(row).items() if not math.isinf(v)]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        pass


def make_sinks(tensorboard_dir: str | None = None, wandb_run_id: str | None = None, wandb_project: str | None = None,
               wandb_entity: str | None = None, mlflow_run_id: str | None = None,
               mlflow_tracking_uri: str | None = None) -> list[Any]:
    """The sinks the options ask for (none: the rows go only into the watcher's state file).

    Raises:
        ConfigurationError: A package is missing.
    """
    sinks: list[Any] = []
    if tensorboard_dir:
        sinks.append(TensorBoardSink(tensorboard_dir))
    if wandb_run_id:
        sinks.append(WandbSink(wandb_run_id, wandb_project, wandb_entity))
    if mlflow_run_id:
        sinks.append(MlflowSink(mlflow_run_id, mlflow_tracking_uri))
    return sinks
