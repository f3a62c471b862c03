"""The cross-version contract: one small instrumented program gives the same telemetry in every matrix cell.

The program has what every DSPy version must instrument alike: a ROMA role module called through
``forward`` and one through ``aforward``, nested ``dspy.Predict`` calls on a real ``dspy.LM`` (litellm's
offline ``mock_response``, so usage and cost go through DSPy's and litellm's own accounting), a
``dspy.Tool``, a toolkit method, a tool that raises, and ``dspy.Parallel`` over worker threads.

What it produced is reduced to what must not differ between versions: the span tree (each span's path
of names from its root, and its kind), each span's attribute keys, and the Prometheus series (names and
labels) the exporter serves. That is compared with ``tests/contract/expected.json``; a difference fails
naming the cell (``ROMA_OTEL_CELL``, set by noxfile.py) and the key. ``ROMA_OTEL_CONTRACT_WRITE=1``
rewrites the expectation (review the diff: it is the contract).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import dspy
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import roma_otel
from roma_otel import RomaInstrumentor
from roma_otel.compat import degraded
from roma_otel.compat.otel import prometheus_reader
from roma_otel.config import default_config
from tests.conftest import answer_lm

EXPECTED = Path(__file__).parent / "contract" / "expected.json"
CELL = os.environ.get("ROMA_OTEL_CELL", "local")
# Labels the Prometheus exporter adds by itself (which exporter versions add them, and the scope's version,
# differ): not part of roma-otel's series.
_EXPORTER = "otel_scope_"


@roma_otel.toolkit
class CalculatorToolkit:
    def evaluate(self, expression: str) -> float:
        if not expression.replace(" ", "").replace("+", "").isdigit():
            raise ValueError(f"not a sum: {expression!r}")
        return float(sum(int(p) for p in expression.split("+")))


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Executor(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("question -> answer")
        self.tools = CalculatorToolkit()

    def forward(self, question: str) -> Any:
        self.tools.evaluate("1 + 2")
        try:
            self.tools.evaluate("1 + x")
        except ValueError:
            pass
        dspy.Tool(add)(a=1, b=2)
        return self.answer(question=question)


class Aggregator(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.combine = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> Any:
        return await self.combine.acall(question=question)


def run_program() -> None:
    # temperature and max_tokens given: DSPy 3.0-3.3's dspy.LM defaults them (0.0, 4000) and 3.4's does not,
    # and the LM span records what the request really carried.
    lm = answer_lm(answer="42")
    lm.kwargs.update(temperature=0.0, max_tokens=1000)
    dspy.configure(lm=lm)
    with roma_otel.execution("contract goal", max_depth=2, solver_type="ContractSolver"):
        Executor().forward(question="first")  # a role module called through forward, as ROMA does
        dspy.Parallel(num_threads=2)([(Executor(), {"question": q}) for q in ("a", "b")])
        asyncio.run(Aggregator().aforward(question="all"))


def observe() -> dict[str, Any]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry(auto_describe=True)
    reader, release = prometheus_reader(registry)
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, config=default_config())
    try:
        run_program()
        series = sorted(
            {
                json.dumps(
                    [sample.name, {k: v for k, v in sorted(sample.labels.items()) if not k.startswith(_EXPORTER)}]
                )
                for family in registry.collect()
                for sample in family.samples
                if family.name != "target"  # the exporter's resource series, not roma-otel's
            }
        )
    finally:
        instrumentor.uninstrument()
        release()
        meter_provider.shutdown()
    spans = list(exporter.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}

    def path(span: Any) -> str:
        names = [span.name]
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return " > ".join(reversed(names))

    tree = Counter(f"{path(s)} [{s.kind.name}]" for s in spans)
    keys: dict[str, set[str]] = {}
    for s in spans:
        keys.setdefault(s.name, set()).update(s.attributes or {})
    return {
        "tree": dict(sorted(tree.items())),
        "attribute_keys": {name: sorted(found) for name, found in sorted(keys.items())},
        "prometheus_series": [json.loads(s) for s in series],
    }


def differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for span_path in sorted(set(expected["tree"]) | set(got["tree"])):
        want, have = expected["tree"].get(span_path, 0), got["tree"].get(span_path, 0)
        if want != have:
            out.append(f"span tree: {span_path!r} expected {want}x, got {have}x")
    for name in sorted(set(expected["attribute_keys"]) | set(got["attribute_keys"])):
        want_keys = set(expected["attribute_keys"].get(name, []))
        have_keys = set(got["attribute_keys"].get(name, []))
        out += [f"span {name!r}: attribute key {k!r} missing" for k in sorted(want_keys - have_keys)]
        out += [f"span {name!r}: unexpected attribute key {k!r}" for k in sorted(have_keys - want_keys)]
    want_series = {json.dumps(s, sort_keys=True) for s in expected["prometheus_series"]}
    have_series = {json.dumps(s, sort_keys=True) for s in got["prometheus_series"]}
    out += [f"Prometheus series missing: {s}" for s in sorted(want_series - have_series)]
    out += [f"unexpected Prometheus series: {s}" for s in sorted(have_series - want_series)]
    return out


def test_the_contract_program_gives_the_stored_telemetry() -> None:
    degraded.clear()
    got = observe()
    if os.environ.get("ROMA_OTEL_CONTRACT_WRITE") == "1":
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(EXPECTED.read_text())
    found = differences(expected, got)
    assert not found, f"cell {CELL}: {len(found)} difference(s) from tests/contract/expected.json:\n" + "\n".join(
        found[:60]
    )
    assert not degraded.degradations(), f"cell {CELL}: instrumentation degraded: {degraded.degradations()}"


def test_a_changed_span_or_series_is_named_in_the_difference() -> None:
    expected = json.loads(EXPECTED.read_text())
    got = json.loads(json.dumps(expected))
    lm_span = next(name for name in got["attribute_keys"] if name.startswith("chat "))
    got["attribute_keys"][lm_span].remove("gen_ai.usage.input_tokens")
    got["prometheus_series"].pop()
    first = next(iter(got["tree"]))
    got["tree"][first] += 1
    found = differences(expected, got)
    assert f"span {lm_span!r}: attribute key 'gen_ai.usage.input_tokens' missing" in found
    assert any(f.startswith("Prometheus series missing:") for f in found)
    assert any(f.startswith(f"span tree: {first!r}") for f in found)
    assert len(found) == 3


@pytest.fixture(autouse=True)
def _no_leftover_lm() -> Any:
    yield
    dspy.configure(lm=None)
