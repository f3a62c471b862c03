"""``roma-otel demo``: run the ROMA-style agent under roma-otel and show what it recorded.

Spans go to memory (and to OTLP too when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set); metrics are served
on the Prometheus endpoint while the agent runs, and afterwards with ``--keep-serving``.
"""

from __future__ import annotations

import os
import re
import sys
import time
import urllib.request
from typing import Any, TextIO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from roma_otel import semconv as sc
from roma_otel.report import build_tree, render_tools, render_tree, tool_rows

__all__ = ["run_demo"]

_SCOPE_LABELS = re.compile(r',?otel_scope_[a-z_]+="[^"]*"')


class _Progress(SpanProcessor):
    """Prints a line as each task of the tree finishes, so a long (real-model) run shows progress."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def on_end(self, span: ReadableSpan) -> None:
        if span.name != sc.SPAN_TASK:
            return
        attrs = span.attributes or {}
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        mark = "✗" if span.status.status_code.name == "ERROR" else "✓"
        goal = str(attrs.get(sc.TASK_GOAL, ""))[:70]
        print(
            f"  {mark} task done [depth {attrs.get(sc.TASK_DEPTH)}] {goal} ({ms:.0f} ms)",
            file=self.out,
            flush=True,
        )


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _contract_lines(text: str) -> list[str]:
    wanted = ("tool_invocations_total", "tool_invocations_failed_total", "lm_calls_total", "lm_cost_usd_total",
              "executions_total", "tasks_total", "toolkit_lifecycle_events_total")  # fmt: skip
    # The scope labels are the same on every series; leave them out of the printout.
    return [
        _SCOPE_LABELS.sub("", line).replace("{,", "{")
        for line in text.splitlines()
        if line.startswith(wanted)
    ]


def run_demo(
    *,
    goal: str | None = None,
    model: str | None = None,
    offline: bool = True,
    max_depth: int = 2,
    use_async: bool = False,
    host: str = "127.0.0.1",
    port: int = 9464,
    keep_serving: float | None = None,
    out: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    from roma_otel import RomaInstrumentor, load_config
    from roma_otel.demo.agent import DEMO_GOAL, build_offline_lm, run_demo_agent

    goal = goal or DEMO_GOAL
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "roma-otel-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(_Progress(out))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

    config = load_config()
    config.observability.prometheus.enabled = True
    config.observability.prometheus.host = host
    config.observability.prometheus.port = port
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(tracer_provider=provider, config=config)
    endpoint: Any = instrumentor.prometheus_endpoint
    try:
        lm = (
            build_offline_lm(model or "openai/gpt-4o-mini")
            if offline
            else dspy.LM(model or "openai/gpt-4o-mini")
        )
        kind = "offline LM (litellm mock responses, real token and cost accounting)" if offline else "live LM"
        print(f"roma-otel demo: goal={goal!r}\n  model={lm.model} via {kind}", file=out)
        print(f"  Prometheus metrics: {endpoint.url}\n", file=out, flush=True)
        result = run_demo_agent(goal, lm=lm, max_depth=max_depth, use_async=use_async)
        provider.force_flush()
        spans = memory.get_finished_spans()

        print("\nExecution tree (LM calls, tokens, cost and latency per node):", file=out)
        print(render_tree(build_tree(spans)), file=out)
        print("\nTools:", file=out)
        print(render_tools(tool_rows(spans)), file=out)
        print(f"\nStatus: {result.status}\nAnswer: {result.answer}", file=out)
        print(f"\nA few series scraped from {endpoint.url}:", file=out)
        for line in _contract_lines(_scrape(endpoint.url)):
            print(f"  {line}", file=out)
        if keep_serving is not None:
            forever = keep_serving <= 0
            print(
                f"\nServing metrics at {endpoint.url} "
                + ("until Ctrl-C" if forever else f"for {keep_serving:.0f} s")
                + ".",
                file=out,
                flush=True,
            )
            deadline = None if forever else time.monotonic() + keep_serving
            try:
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.2)
            except KeyboardInterrupt:
                pass
        return 0 if result.status == "completed" else 1
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
