"""Per-call overhead of roma-otel against no instrumentation, a bare SDK span and OpenInference's DSPy instrumentor.

All configurations run side by side in one process, interleaved round by round, so a noisy shared
machine shifts them together; the report quotes medians and ratios. Usage:

    python benchmarks/overhead.py [--rounds 15] [--calls 2000] [--markdown]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from dspy.utils import DummyLM
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from roma_otel import RomaInstrumentor, execution
from roma_otel.config import default_config


class DiscardingExporter(SpanExporter):
    """Accepts spans and drops them: the benchmark measures the application thread, not export."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make_tracer_provider(sampled: bool = True) -> TracerProvider:
    provider = TracerProvider() if sampled else TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(BatchSpanProcessor(DiscardingExporter(), max_queue_size=1 << 16))
    return provider


# --- the three calls --------------------------------------------------------------------------------
class Trivial(dspy.Module):
    def forward(self, x: int) -> int:
        return x


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def make_calls() -> dict[str, Callable[[], Any]]:
    trivial = Trivial()
    predict = dspy.Predict("question -> answer")
    tool = dspy.Tool(add)
    return {
        "module": lambda: trivial(x=1),
        "predict": lambda: predict(question="What is 6 x 7?"),
        "tool": lambda: tool(a=1, b=2),
    }


# --- configurations --------------------------------------------------------------------------------
@contextmanager
def none() -> Iterator[Callable[[Callable[[], Any]], Callable[[], Any]]]:
    yield lambda call: call


@contextmanager
def bare_span(provider: TracerProvider) -> Iterator[Callable[[Callable[[], Any]], Callable[[], Any]]]:
    tracer = provider.get_tracer("bench")

    def wrap(call: Callable[[], Any]) -> Callable[[], Any]:
        def spanned() -> Any:
            with tracer.start_as_current_span("call"):
                return call()

        return spanned

    yield wrap


@contextmanager
def roma(provider: TracerProvider, meter_provider: MeterProvider) -> Iterator[Any]:
    inst = RomaInstrumentor()
    inst.instrument(tracer_provider=provider, meter_provider=meter_provider, config=default_config())
    try:
        yield lambda call: call
    finally:
        inst.uninstrument()


@contextmanager
def roma_nested(provider: TracerProvider, meter_provider: MeterProvider) -> Iterator[Any]:
    """roma-otel with the call made inside an already-running execution (the steady state of an agent)."""
    with roma(provider, meter_provider), execution("bench"):
        yield lambda call: call


@contextmanager
def openinference(provider: TracerProvider) -> Iterator[Any]:
    from openinference.instrumentation.dspy import DSPyInstrumentor

    inst = DSPyInstrumentor()
    inst.instrument(tracer_provider=provider, skip_dep_check=True)
    try:
        yield lambda call: call
    finally:
        inst.uninstrument()


def measure(call: Callable[[], Any], n: int) -> float:
    """Seconds per call over ``n`` calls."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round for module/tool calls")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table for BENCHMARKS.md")
    args = parser.parse_args(argv)

    # History off: otherwise every configuration grows DSPy's history by one entry per call, and the
    # growing heap makes later rounds' garbage collections (hence timings) depend on the order.
    dspy.configure(lm=DummyLM(itertools.repeat({"answer": "42"})), disable_history=True)
    sampled = make_tracer_provider(True)
    sampled_out = make_tracer_provider(False)
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    calls = make_calls()
    configs: dict[str, Callable[[], Any]] = {
        "none": none,
        "bare SDK span": lambda: bare_span(sampled),
        "roma-otel": lambda: roma(sampled, meter_provider),
        "roma-otel (inside an execution)": lambda: roma_nested(sampled, meter_provider),
        "bare SDK span, sampled out": lambda: bare_span(sampled_out),
        "roma-otel, sampled out": lambda: roma(sampled_out, meter_provider),
        "roma-otel, sampled out (inside an execution)": lambda: roma_nested(sampled_out, meter_provider),
        "OpenInference": lambda: openinference(sampled),
    }
    per_call = {"module": args.calls, "predict": max(50, args.calls // 10), "tool": args.calls}
    results: dict[tuple[str, str], list[float]] = {}
    collection: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for config_name, factory in configs.items():
            with factory() as wrap:
                for call_name, call in calls.items():
                    wrapped = wrap(call)
                    for _ in range(20):  # warm caches of the configuration just installed
                        wrapped()
                    reader.get_metrics_data()  # start the measurement with nothing queued
                    n = per_call[call_name]
                    results.setdefault((config_name, call_name), []).append(measure(wrapped, n))
                    # What the calls left for the collecting thread (histogram values queued by roma-otel,
                    # counter callbacks): timed as a scrape right after them, per call, fixed costs included.
                    start = time.perf_counter()
                    reader.get_metrics_data()
                    collection.setdefault((config_name, call_name), []).append((time.perf_counter() - start) / n)
    sampled.shutdown()
    sampled_out.shutdown()

    median = {key: statistics.median(values) * 1e6 for key, values in results.items()}
    collect = {key: statistics.median(values) * 1e6 for key, values in collection.items()}
    lines = [
        f"python {sys.version.split()[0]}, dspy {dspy.__version__}, {args.rounds} rounds, median µs per call",
        "",
        "| configuration | " + " | ".join(f"{c} call (µs)" for c in calls) + " | "
        + " | ".join(f"{c} overhead (µs)" for c in calls) + " |",
        "|---|" + "---:|" * (2 * len(calls)),
    ]  # fmt: skip
    for config_name in configs:
        row = [f"{median[(config_name, c)]:.1f}" for c in calls]
        row += [
            "—" if config_name == "none" else f"{median[(config_name, c)] - median[('none', c)]:+.1f}" for c in calls
        ]
        lines.append(f"| {config_name} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Paid later by the collecting thread (a scrape right after the calls), µs per call:",
        "",
        "| configuration | " + " | ".join(f"{c}" for c in calls) + " |",
        "|---|" + "---:|" * len(calls),
    ]
    for config_name in configs:
        lines.append(f"| {config_name} | " + " | ".join(f"{collect[(config_name, c)]:.1f}" for c in calls) + " |")

    def overhead(config_name: str, call: str) -> float:
        return median[(config_name, call)] - median[("none", call)]

    oi_predict = overhead("OpenInference", "predict")
    nested_predict = overhead("roma-otel (inside an execution)", "predict") / oi_predict
    total_predict = (overhead("roma-otel", "predict") + collect[("roma-otel", "predict")]) / oi_predict

    lines += [
        "",
        "Ratios (overheads over the same baseline):",
        f"- module call: roma-otel / bare SDK span = "
        f"{overhead('roma-otel', 'module') / overhead('bare SDK span', 'module'):.2f} (target ≤ 1.3)",
        f"- module call inside an execution: roma-otel / bare SDK span = "
        f"{overhead('roma-otel (inside an execution)', 'module') / overhead('bare SDK span', 'module'):.2f}",
        f"- Predict call: roma-otel / OpenInference = "
        f"{overhead('roma-otel', 'predict') / overhead('OpenInference', 'predict'):.3f} (target ≤ 0.2); "
        f"inside an execution {nested_predict:.3f}; counting what the collecting thread pays later {total_predict:.3f}",
        f"- tool call: roma-otel / OpenInference = "
        f"{overhead('roma-otel', 'tool') / overhead('OpenInference', 'tool'):.2f}",
        f"- module call sampled out: {overhead('roma-otel, sampled out', 'module'):.1f} µs as the outermost call, "
        f"{overhead('roma-otel, sampled out (inside an execution)', 'module'):.1f} µs inside an execution "
        "(target ≤ 3 µs); the SDK alone, a bare span sampled out as the outermost call: "
        f"{overhead('bare SDK span, sampled out', 'module'):.1f} µs",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
