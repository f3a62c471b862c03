"""The seed's ``MLflowManager``: an async API over one MLflow experiment, every blocking call off the loop.

``initialize``, ``start_run``, ``log_metric``, ``log_param``, ``end_run`` and ``run_context`` work on one
active run per manager; the bridge's worker uses the same connection code (``connect()``) synchronously.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roma_otel.compat import mlflow as mlflow_compat
from roma_otel.mlflow.runs import TAG_VERSION
from roma_otel.version import __version__

_ARTIFACTS = "artifacts"  # _call(...): through compat.mlflow.ArtifactWriter, not the client

if TYPE_CHECKING:
    from roma_otel.config import MLflowConfig

__all__ = ["MLflowManager", "default_tracking_uri", "ensure_experiment", "is_http_uri", "resolve_tracking_uri"]

DEFAULT_DB = "mlflow.db"


def default_tracking_uri() -> str:
    """``sqlite:///mlflow.db`` in the working directory, made absolute so a later ``chdir`` changes nothing."""
    return "sqlite:///" + str(Path(DEFAULT_DB).resolve())


def resolve_tracking_uri(uri: str | None) -> str:
    """The configured URI; none means the local SQLite store, and a bare ``*.db`` path a SQLite file there."""
    if not uri:
        return default_tracking_uri()
    if "://" not in uri and uri.endswith((".db", ".sqlite", ".sqlite3")):
        return "sqlite:///" + str(Path(uri).expanduser().resolve())
    return uri


def is_http_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (or restored from the trash) if need be."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # another process created it meanwhile
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return str(experiment.experiment_id)


class MLflowManager:
    """Runs in one MLflow experiment, from ``config.observability.mlflow``.

    One run is active per manager at a time: ``log_*`` calls go to it, ``run_context()`` joins it or
    starts (and ends) one. The manager never touches MLflow's global state (``mlflow.set_tracking_uri``,
    the fluent active-run stack), so the program's own MLflow use is unaffected.
    """

    def __init__(
        self,
        config: MLflowConfig | None = None,
        *,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
    ) -> None:
        if config is None:
            from roma_otel.config import load_config

            config = load_config().observability.mlflow
        self.config = config
        self.tracking_uri = resolve_tracking_uri(tracking_uri or config.tracking_uri)
        self.experiment_name = experiment_name or config.experiment_name
        self.artifact_location = config.artifact_location
        self.experiment_id: str | None = None
        self.client: Any = None
        self.artifacts: mlflow_compat.ArtifactWriter | None = None
        self.run_id: str | None = None
        self._initialized = False
        self._lock = threading.Lock()

    # --- connection (blocking; the async API and the bridge's worker call it) ------------------------
    def connect(self) -> str:
        """Create the client and find or create the experiment; returns the experiment id. Blocking."""
        with self._lock:
            if not self._initialized:
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=self.tracking_uri)
                self.experiment_id = ensure_experiment(client, self.experiment_name, self.artifact_location)
                self.client = client
                self.artifacts = mlflow_compat.ArtifactWriter(client, self.tracking_uri)
                self._initialized = True
            assert self.experiment_id is not None
            return self.experiment_id

    async def initialize(self) -> None:
        await asyncio.to_thread(self.connect)

    async def _call(self, method: str, *args: Any, on: str = "client", **kwargs: Any) -> Any:
        """``self.<on>.<method>(*args, **kwargs)`` in a worker thread, connecting first if needed."""
        if not self._initialized:
            await self.initialize()
        return await asyncio.to_thread(getattr(getattr(self, on), method), *args, **kwargs)

    def _active(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MLflowManager: no active run; call start_run() or use run_context()")
        return self.run_id

    # --- the seed's API ---------------------------------------------------------------------------------
    async def start_run(self, run_name: str | None = None, tags: Mapping[str, Any] | None = None) -> str:
        """Start a run in the experiment and make it the active one; returns its run id."""
        if self.run_id is not None:
            raise RuntimeError(f"MLflowManager: run {self.run_id} is still active; end_run() it first")
        if not self._initialized:
            await self.initialize()
        all_tags = {TAG_VERSION: __version__, **{str(k): str(v) for k, v in (tags or {}).items()}}
        run = await self._call("create_run", self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        return self.run_id

    async def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        await self._call("log_metric", self._active(), key, float(value), step=step or 0)

    async def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Several metrics in ``log_batch`` requests of at most 1000."""
        import time

        from mlflow.entities import Metric

        run_id, now = self._active(), int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            await self._call("log_batch", run_id, metrics=items[i : i + 1000])

    async def log_param(self, key: str, value: Any) -> None:
        await self._call("log_param", self._active(), key, value)

    async def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self._active()
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            await self._call("log_batch", run_id, params=items[i : i + 100])

    async def set_tag(self, key: str, value: Any) -> None:
        await self._call("set_tag", self._active(), key, value)

    async def log_dict(self, dictionary: Any, artifact_file: str) -> None:
        await self._call("log_dict", self._active(), dictionary, artifact_file, on=_ARTIFACTS)

    async def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        await self._call("log_artifact", self._active(), local_path, artifact_path, on=_ARTIFACTS)

    async def end_run(self, status: str = "FINISHED") -> None:
        """End the active run with ``status`` (FINISHED, FAILED or KILLED)."""
        run_id = self._active()
        await self._call("set_terminated", run_id, status)
        self.run_id = None

    @asynccontextmanager
    async def run_context(
        self, run_name: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> AsyncIterator[str]:
        """Join the active run, or start one that ends FINISHED (FAILED if the block raises)."""
        if self.run_id is not None:
            yield self.run_id
            return
        run_id = await self.start_run(run_name=run_name, tags=tags)
        try:
            yield run_id
        except BaseException:
            await self.end_run(status="FAILED")
            raise
        await self.end_run(status="FINISHED")
