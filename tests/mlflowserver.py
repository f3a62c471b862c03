"""A real ``mlflow server`` for the tests: on a free loopback port, SQLite backend, local artifact store."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Server", "free_port", "run_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return response.status == 200
    except Exception:
        return False


def _warm_up(url: str) -> None:
    """Send the server its first OTLP request: it loads its span-pricing code then, which takes seconds once."""
    from mlflow import MlflowClient
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    experiment_id = MlflowClient(url).create_experiment("warm-up")
    exporter = OTLPSpanExporter(endpoint=url + "/v1/traces", headers={"x-mlflow-experiment-id": experiment_id},
                                timeout=60)  # fmt: skip
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    attributes = {"gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 1}
    provider.get_tracer("warm-up").start_span("chat gpt-4o-mini", attributes=attributes).end()
    provider.shutdown()


@dataclass
class Server:
    url: str
    port: int
    root: Path


@contextlib.contextmanager
def run_server(root: Path) -> Iterator[Server]:
    """``mlflow server`` on a free loopback port with a SQLite backend and a local artifact store under ``root``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    log = (root / "server.log").open("wb")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/m.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow server did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        _warm_up(url)
        yield Server(url, port, root)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)  # the server and the workers it started (its own process group)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)
        log.close()


