"""Screenshots of the offline demo's traces in MLflow's trace UI, with headless Chromium (README's MLflow section).

    python scripts/mlflow_screenshots.py --out docs/

Starts ``mlflow server`` on a free port, runs ``roma-otel demo`` against it with content capture on, then
drives the system's Chromium (``chromium``, Debian's package) over the DevTools protocol on a pipe (no
browser download, standard library only) and saves:

- ``mlflow-traces.png``: the trace list (names, requests, responses);
- ``mlflow-trace.png``: the demo's trace with an LM span selected (its chat view).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 1600, 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """Chromium with ``--remote-debugging-pipe``: JSON messages, NUL-terminated, on fds 3 (in) and 4 (out)."""

    def __init__(self) -> None:
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise SystemExit("needs Chromium: apt-get install chromium")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-pipe", "about:blank"]  # fmt: skip

        def fds() -> None:
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self._proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=fds, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, ready: str, timeout: float = 90.0) -> None:
        """Navigate, then wait until the JavaScript condition ``ready`` holds (MLflow's UI renders late)."""
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"Boolean({ready})").get("value"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: not ready after {timeout:.0f}s ({ready})")
            time.sleep(0.5)
        time.sleep(1.5)
        # MLflow 3.17 opens its assistant panel over the page on first visit: close it
        self.evaluate("document.querySelector('[aria-label=\"Close\"]')?.click()")
        time.sleep(1.0)

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True).get("result", {})

    def click_text(self, text: str, settle: float = 3.0) -> bool:
        """Click the innermost element whose own text is ``text``; True when one was found."""
        found = self.evaluate(
            "(() => { const all = [...document.querySelectorAll('body *')]"
            f".filter(e => e.childElementCount === 0 && e.textContent.trim() === {json.dumps(text)});"
            " if (!all.length) return false; all[0].click(); return true; })()"
        ).get("value")
        time.sleep(settle)
        return bool(found)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path}")

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait(10)


def _wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server at {url} did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OTEL_"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", MLFLOW_DISABLE_TELEMETRY="true")
    with tempfile.TemporaryDirectory(prefix="roma-otel-shots-") as tmp:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/m.db",
             "--artifacts-destination", f"{tmp}/artifacts", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        browser = None
        try:
            _wait_healthy(url)
            demo_env = {**env, "MLFLOW_ENABLED": "true", "MLFLOW_TRACKING_URI": url,
                        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "SPAN_ONLY",
                        "ROMA_OTEL_MLFLOW_FLUSH_TIMEOUT": "60"}  # fmt: skip
            demo = [sys.executable, "-m", "roma_otel.cli", "demo", "--no-postgres", "--port", "0"]
            subprocess.run([*demo, "--repeat", "2"], env=demo_env, check=True, stdout=subprocess.DEVNULL)
            goal = "What is 17 * 23, and how much is that per day over 3 days?"
            subprocess.run([*demo, "--goal", goal], env=demo_env, check=True, stdout=subprocess.DEVNULL)

            from mlflow import MlflowClient

            client = MlflowClient(url)
            experiment_id = client.get_experiment_by_name("ROMA-DSPy").experiment_id
            traces = client.search_traces(locations=[experiment_id], max_results=10)
            trace_id = traces[-1].info.trace_id
            browser = Browser()
            browser.open(f"{url}/#/experiments/{experiment_id}/traces",
                         "document.querySelector('[aria-label^=\"Open trace tr-\"]')")  # fmt: skip
            browser.click_text("Got it")  # a first-visit tip over the list
            browser.screenshot(args.out / "mlflow-traces.png")
            browser.open(f"{url}/#/experiments/{experiment_id}/traces?selectedEvaluationId={trace_id}",
                         "document.body.innerText.includes('chat gpt-4o-mini')")  # fmt: skip
            if not browser.click_text("chat gpt-4o-mini"):
                print("no LM span found to select; the screenshot shows the root", file=sys.stderr)
            browser.screenshot(args.out / "mlflow-trace.png")
        finally:
            if browser is not None:
                browser.close()
            os.killpg(server.pid, 15)
            server.wait(10)


if __name__ == "__main__":
    main()
