"""``execute_tool`` spans, tool metrics and tool records for toolkits, dspy.Tool and dspy.ReAct."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import types
from datetime import UTC, datetime, timedelta
from typing import Any

import dspy
import pydantic
import pytest
from opentelemetry.trace import StatusCode

import roma_otel
from roma_otel import semconv as sc
from roma_otel.config import default_config
from roma_otel.instrumentation.tools import FUNCTION_TOOLKIT

TOOL_INVOCATIONS = sc.M_TOOL_INVOCATIONS[0]
TOOL_SUCCESS = sc.M_TOOL_INVOCATIONS_SUCCESS[0]
TOOL_FAILED = sc.M_TOOL_INVOCATIONS_FAILED[0]
TOOL_DURATION = sc.M_TOOL_DURATION_MS[0]
TOOL_METRICS = (TOOL_INVOCATIONS, TOOL_SUCCESS, TOOL_FAILED, TOOL_DURATION)


def tool_span_name(name: str) -> str:
    return f"{sc.SPAN_TOOL_PREFIX} {name}"


def json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def tool_spans(tel: Any) -> list[Any]:
    return [s for s in tel.spans() if s.name.startswith(sc.SPAN_TOOL_PREFIX + " ")]


def weather(city: str) -> dict:
    return {"city": city, "sky": "soleggiato ☀", "temp_c": 21}


@roma_otel.toolkit
class WeatherToolkit:
    """Two tools: one answers, one always raises the same ValueError object."""

    def __init__(self) -> None:
        self.error = ValueError("no forecast for Atlantis")

    def lookup(self, city: str) -> dict:
        """Current weather in a city."""
        return weather(city)

    def forecast(self, city: str, days: int) -> dict:
        """Forecast for the next days."""
        raise self.error


@roma_otel.toolkit
class NotesToolkit:
    """A tool that calls a sibling tool of the same instance, and an async tool."""

    def get(self, key: str) -> str:
        return f"note {key}"

    def summary(self, key: str) -> str:
        return "summary of " + self.get(key)

    async def fetch(self, key: str) -> dict:
        await asyncio.sleep(0.005)
        return {"key": key, "text": self.get(key)}


@roma_otel.toolkit
class SlowToolkit:
    def wait(self, ms: int) -> dict:
        time.sleep(ms / 1000.0)
        return {"waited_ms": ms}


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def fetch_page(url: str) -> dict:
    """Fetch a page (pretend)."""
    await asyncio.sleep(0.005)
    return {"url": url, "body": "héllo"}


def chat(**fields: Any) -> str:
    return "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in fields.items()) + "[[ ## completed ## ]]"


class ScriptedLM(dspy.LM):
    """A real dspy.LM answering each call, offline, with the next reply of a script."""

    def __init__(self, replies: list[str]) -> None:
        super().__init__("openai/gpt-4o-mini", cache=False)
        self.replies = list(replies)
        self.calls = 0
        self._lock = threading.Lock()

    def _next(self) -> str:
        with self._lock:
            reply = self.replies[self.calls]
            self.calls += 1
            return reply

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, mock_response=self._next(), **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        return await super().acall(*args, mock_response=self._next(), **kwargs)


GOOD_ARGS = {"city": "Zürich"}
BAD_ARGS = {"city": "Atlantis", "days": 3}


def react_script() -> list[str]:
    return [
        chat(next_thought="Check the weather.", next_tool_name="lookup", next_tool_args=json.dumps(GOOD_ARGS)),
        chat(next_thought="Now the forecast.", next_tool_name="forecast", next_tool_args=json.dumps(BAD_ARGS)),
        chat(next_thought="Enough.", next_tool_name="finish", next_tool_args="{}"),
        chat(reasoning="It is sunny.", answer="sunny, 21C"),
    ]


def test_react_with_toolkit_makes_one_span_per_tool_call(tel: Any) -> None:
    toolkit = WeatherToolkit()
    agent = dspy.ReAct("question -> answer", tools=[toolkit.lookup, toolkit.forecast], max_iters=5)
    lm = ScriptedLM(react_script())
    with dspy.context(lm=lm):
        pred = agent(question="Weather in Zürich?")

    assert lm.calls == 4
    assert pred.answer == "sunny, 21C"
    assert pred.trajectory["observation_0"] == weather(**GOOD_ARGS)
    assert "no forecast for Atlantis" in pred.trajectory["observation_1"]

    # One span per tool call, none doubled by dspy.Tool; ReAct's internal finish sentinel is not a tool call.
    assert sorted(s.name for s in tool_spans(tel)) == sorted([tool_span_name("lookup"), tool_span_name("forecast")])
    react = tel.span("ReAct")
    good = tel.span(tool_span_name("lookup"))
    bad = tel.span(tool_span_name("forecast"))

    for span in (good, bad):
        assert tel.parent_of(span) is react
        assert span.context.trace_id == react.context.trace_id
        assert span.attributes[sc.EXECUTION_ID] == react.attributes[sc.EXECUTION_ID]
        assert span.attributes[sc.TASK_DEPTH] == 0
        assert span.attributes[sc.GEN_AI_OPERATION_NAME] == sc.OP_EXECUTE_TOOL
        assert span.attributes[sc.TOOL_DURATION_MS] > 0

    assert good.attributes[sc.GEN_AI_TOOL_NAME] == "lookup"
    assert good.attributes[sc.TOOLKIT_CLASS] == "WeatherToolkit"
    assert good.attributes[sc.TOOL_SUCCESS] is True
    assert good.attributes[sc.TOOL_INPUT_SIZE] == json_size(GOOD_ARGS)
    assert good.attributes[sc.TOOL_OUTPUT_SIZE] == json_size(weather(**GOOD_ARGS))
    assert good.attributes[sc.TOOL_INPUT_SIZE] > 0 and good.attributes[sc.TOOL_OUTPUT_SIZE] > 0
    assert good.status.status_code == StatusCode.OK
    assert sc.ERROR_TYPE not in good.attributes

    assert bad.attributes[sc.GEN_AI_TOOL_NAME] == "forecast"
    assert bad.attributes[sc.TOOLKIT_CLASS] == "WeatherToolkit"
    assert bad.attributes[sc.TOOL_SUCCESS] is False
    assert bad.attributes[sc.TOOL_INPUT_SIZE] == json_size(BAD_ARGS)
    assert bad.attributes[sc.TOOL_INPUT_SIZE] > 0
    assert bad.attributes[sc.ERROR_TYPE] == "ValueError"
    assert bad.status.status_code == StatusCode.ERROR

    kit = {sc.L_TOOLKIT_CLASS: "WeatherToolkit"}
    assert tel.metric_sum(TOOL_INVOCATIONS, **kit) == 2
    assert tel.metric_sum(TOOL_INVOCATIONS, **kit, **{sc.L_TOOL_NAME: "lookup"}) == 1
    assert tel.metric_sum(TOOL_INVOCATIONS, **kit, **{sc.L_TOOL_NAME: "forecast"}) == 1
    assert tel.metric_sum(TOOL_SUCCESS, **kit) == 1
    assert tel.metric_sum(TOOL_SUCCESS, **kit, **{sc.L_TOOL_NAME: "lookup"}) == 1
    assert tel.metric_sum(TOOL_FAILED, **kit) == 1
    assert tel.metric_sum(TOOL_FAILED, **kit, **{sc.L_TOOL_NAME: "forecast", sc.L_ERROR_TYPE: "ValueError"}) == 1
    assert tel.metric_sum(TOOL_DURATION, **kit) == 2
    # ReAct's finish sentinel is not counted: two tool calls in all.
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOLKIT_CLASS: FUNCTION_TOOLKIT}) == 0
    assert tel.metric_sum(TOOL_INVOCATIONS) == 2
    assert tel.metric_sum(TOOL_DURATION) == 2


def test_react_async_with_toolkit(tel: Any) -> None:
    toolkit = WeatherToolkit()
    agent = dspy.ReAct("question -> answer", tools=[toolkit.lookup, toolkit.forecast], max_iters=5)
    lm = ScriptedLM(react_script())
    with dspy.context(lm=lm):
        pred = asyncio.run(agent.acall(question="Weather in Zürich?"))

    assert lm.calls == 4
    assert pred.answer == "sunny, 21C"
    react = tel.span("ReAct")
    assert len(tool_spans(tel)) == 2
    for name in ("lookup", "forecast"):
        span = tel.span(tool_span_name(name))
        assert tel.parent_of(span) is react
    assert tel.span(tool_span_name("forecast")).attributes[sc.ERROR_TYPE] == "ValueError"
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOLKIT_CLASS: "WeatherToolkit"}) == 2
    assert tel.metric_sum(TOOL_FAILED, **{sc.L_ERROR_TYPE: "ValueError"}) == 1


def test_direct_call_reraises_the_same_exception(tel: Any) -> None:
    toolkit = WeatherToolkit()
    with pytest.raises(ValueError) as info:
        toolkit.forecast("Atlantis", 3)
    assert info.value is toolkit.error

    with pytest.raises(ValueError) as info:
        dspy.Tool(toolkit.forecast)(**BAD_ARGS)
    assert info.value is toolkit.error

    spans = tel.spans_named(tool_span_name("forecast"))
    assert len(spans) == 2
    for span in spans:
        assert span.attributes[sc.ERROR_TYPE] == "ValueError"
        assert span.attributes[sc.TOOL_SUCCESS] is False
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes[sc.TOOL_INPUT_SIZE] > 0
        assert span.attributes[sc.TOOL_OUTPUT_SIZE] == 0
        assert [e.name for e in span.events] == ["exception"]
    assert tel.metric_sum(TOOL_FAILED, **{sc.L_ERROR_TYPE: "ValueError", sc.L_TOOL_NAME: "forecast"}) == 2
    assert tel.metric_sum(TOOL_SUCCESS) == 0


def test_plain_function_tool_and_async_tool(tel: Any) -> None:
    assert dspy.Tool(add)(a=2, b=3) == 5
    span = tel.span(tool_span_name("add"))
    assert span.attributes[sc.TOOLKIT_CLASS] == FUNCTION_TOOLKIT
    assert span.attributes[sc.GEN_AI_TOOL_NAME] == "add"
    assert span.attributes[sc.TOOL_SUCCESS] is True
    assert span.attributes[sc.TOOL_INPUT_SIZE] == json_size({"a": 2, "b": 3})
    assert span.attributes[sc.TOOL_OUTPUT_SIZE] == json_size(5)
    assert span.parent is None

    page = asyncio.run(dspy.Tool(fetch_page).acall(url="https://example.org/é"))
    assert page == {"url": "https://example.org/é", "body": "héllo"}
    aspan = tel.span(tool_span_name("fetch_page"))
    assert aspan.attributes[sc.TOOLKIT_CLASS] == FUNCTION_TOOLKIT
    assert aspan.attributes[sc.TOOL_SUCCESS] is True
    assert aspan.attributes[sc.TOOL_INPUT_SIZE] == json_size({"url": "https://example.org/é"})
    assert aspan.attributes[sc.TOOL_OUTPUT_SIZE] == json_size(page)
    assert aspan.attributes[sc.TOOL_DURATION_MS] >= 4.0  # covers the awaited coroutine, not just its creation

    # An async toolkit method through Tool.acall: one span, from the method's own wrapper.
    notes = NotesToolkit()
    result = asyncio.run(dspy.Tool(notes.fetch).acall(key="k1"))
    assert result == {"key": "k1", "text": "note k1"}
    fspan = tel.span(tool_span_name("fetch"))
    assert fspan.attributes[sc.TOOLKIT_CLASS] == "NotesToolkit"
    assert fspan.attributes[sc.TOOL_OUTPUT_SIZE] == json_size(result)
    assert fspan.attributes[sc.TOOL_DURATION_MS] >= 4.0
    assert tel.spans_named(tool_span_name("get")) == []  # its sibling call inside is not a new invocation

    assert len(tool_spans(tel)) == 3
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOLKIT_CLASS: FUNCTION_TOOLKIT}) == 2
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOLKIT_CLASS: "NotesToolkit"}) == 1
    assert tel.metric_sum(TOOL_SUCCESS) == 3
    assert tel.metric_sum(TOOL_DURATION) == 3


class _FakeLangChainArgs(pydantic.BaseModel):
    query: str


class FakeLangChainTool:
    """Duck-typed LangChain ``BaseTool``: what ``dspy.Tool.from_langchain`` reads."""

    name = "web_search"
    description = "Search the web."
    args_schema = _FakeLangChainArgs

    async def ainvoke(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"hits": [payload["query"]]}


class FakeMCPSession:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        self.calls.append((name, arguments))
        from mcp.types import TextContent  # the stub below

        # isError is the MCP result's field (DSPy 3.0 reads it); is_error what later DSPy versions read.
        content = [TextContent(f"result for {arguments['path']}")]
        return types.SimpleNamespace(content=content, is_error=False, isError=False)


def test_converted_langchain_and_mcp_tools_are_traced(tel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tools DSPy builds from LangChain/MCP tools are user tool calls (ROMA's MCP toolkits use these)."""
    lc_tool = dspy.Tool.from_langchain(FakeLangChainTool())
    assert asyncio.run(lc_tool.acall(query="otel")) == {"hits": ["otel"]}

    # A minimal stand-in for the optional ``mcp`` package: dspy only needs mcp.types.TextContent.
    mcp_types = types.ModuleType("mcp.types")

    class TextContent:
        def __init__(self, text: str) -> None:
            self.text = text

    mcp_types.TextContent = TextContent  # type: ignore[attr-defined]
    mcp_pkg = types.ModuleType("mcp")
    mcp_pkg.types = mcp_types  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mcp", mcp_pkg)
    monkeypatch.setitem(sys.modules, "mcp.types", mcp_types)
    session = FakeMCPSession()
    mcp_tool_spec = types.SimpleNamespace(
        name="read_file",
        description="Read a file.",
        inputSchema={"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    )
    mcp_tool = dspy.Tool.from_mcp_tool(session, mcp_tool_spec)
    assert asyncio.run(mcp_tool.acall(path="/tmp/x")) == "result for /tmp/x"
    assert session.calls == [("read_file", {"path": "/tmp/x"})]

    for name, args, result in (
        ("web_search", {"query": "otel"}, {"hits": ["otel"]}),
        ("read_file", {"path": "/tmp/x"}, "result for /tmp/x"),
    ):
        spans = tel.spans_named(tool_span_name(name))
        assert len(spans) == 1, [s.name for s in tel.spans()]
        span = spans[0]
        assert span.attributes[sc.TOOLKIT_CLASS] == FUNCTION_TOOLKIT
        assert span.attributes[sc.TOOL_SUCCESS] is True
        assert span.attributes[sc.TOOL_INPUT_SIZE] == json_size(args)
        expected_out = len(result.encode("utf-8")) if isinstance(result, str) else json_size(result)
        assert span.attributes[sc.TOOL_OUTPUT_SIZE] == expected_out
        assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOL_NAME: name}) == 1


def test_sibling_tool_call_is_one_invocation(tel: Any) -> None:
    notes = NotesToolkit()
    assert dspy.Tool(notes.summary)(key="a") == "summary of note a"
    assert notes.summary("b") == "summary of note b"
    assert [s.name for s in tool_spans(tel)] == [tool_span_name("summary")] * 2
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOLKIT_CLASS: "NotesToolkit"}) == 2
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOL_NAME: "get"}) == 0

    # Called on its own, the sibling is an invocation of its own.
    assert notes.get("c") == "note c"
    assert len(tel.spans_named(tool_span_name("get"))) == 1
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOLKIT_CLASS: "NotesToolkit"}) == 3


def _call_everything() -> int:
    """Five tool calls, one failing; returns how many were made."""
    weather = WeatherToolkit()
    tool = dspy.Tool(weather.lookup)
    for city in ("Rome", "Oslo", "Lima"):
        assert tool(city=city)["city"] == city
    with pytest.raises(ValueError) as info:
        weather.forecast("Atlantis", 1)
    assert info.value is weather.error
    assert dspy.Tool(add)(a=1, b=1) == 2
    return 5


def test_sample_rate_zero_counts_without_spans(make_tel: Any) -> None:
    cfg = default_config()
    cfg.observability.toolkit_metrics.sample_rate = 0.0
    tel = make_tel(cfg)
    with roma_otel.execution("sampled out") as ctx:
        calls = _call_everything()
    assert tool_spans(tel) == []
    assert [s.name for s in tel.spans()] == [sc.SPAN_EXECUTION]
    assert ctx.tool_invocations == []  # records follow sampling
    assert tel.metric_sum(TOOL_INVOCATIONS) == calls
    assert tel.metric_sum(TOOL_SUCCESS) == calls - 1
    assert tel.metric_sum(TOOL_FAILED, **{sc.L_ERROR_TYPE: "ValueError"}) == 1
    assert tel.metric_sum(TOOL_DURATION) == calls
    assert tel.metric_sum(TOOL_INVOCATIONS, **{sc.L_TOOLKIT_CLASS: "WeatherToolkit"}) == 4


def test_track_invocations_off_makes_no_spans_and_no_metrics(make_tel: Any) -> None:
    cfg = default_config()
    cfg.observability.toolkit_metrics.track_invocations = False
    tel = make_tel(cfg)
    with roma_otel.execution("untracked") as ctx:
        _call_everything()
    assert tool_spans(tel) == []
    assert ctx.tool_invocations == []
    metrics = tel.metrics()
    for name in TOOL_METRICS:
        assert sum(getattr(p, "value", None) or getattr(p, "count", 0) for p in metrics.get(name, [])) == 0


def test_execution_context_records_each_sampled_call(tel: Any) -> None:
    slow = SlowToolkit()
    weather = WeatherToolkit()
    wait_ms = 30
    before = datetime.now(UTC)
    with roma_otel.execution("records") as ctx:
        assert roma_otel.ExecutionContext.get() is ctx
        assert slow.wait(wait_ms) == {"waited_ms": wait_ms}
        assert dspy.Tool(slow.wait)(ms=wait_ms) == {"waited_ms": wait_ms}
        with pytest.raises(ValueError):
            weather.forecast(**BAD_ARGS)
        records = list(roma_otel.ExecutionContext.get().tool_invocations)
    after = datetime.now(UTC)

    assert len(records) == 3
    spans = sorted(tool_spans(tel), key=lambda s: s.start_time)
    assert [s.name for s in spans] == [tool_span_name("wait")] * 2 + [tool_span_name("forecast")]
    for record, span in zip(records, spans, strict=True):
        assert record.execution_id == ctx.execution_id
        assert record.tool_name == span.attributes[sc.GEN_AI_TOOL_NAME]
        assert record.toolkit_class == span.attributes[sc.TOOLKIT_CLASS]
        assert record.input_size_bytes == span.attributes[sc.TOOL_INPUT_SIZE]
        assert record.output_size_bytes == span.attributes[sc.TOOL_OUTPUT_SIZE]
        assert record.success is span.attributes[sc.TOOL_SUCCESS]
        assert record.duration_ms > 0
        end = record.invoked_at + timedelta(milliseconds=record.duration_ms)
        assert before <= record.invoked_at < end <= after + timedelta(milliseconds=5)
        # invoked_at is the start of the call (ROMA records the end): it matches the span's start.
        assert abs(record.invoked_at.timestamp() * 1e9 - span.start_time) < 5e6
        assert record.invoked_at.timestamp() * 1e9 < span.end_time

    wait1, wait2, failed = records
    for record in (wait1, wait2):
        assert record.toolkit_class == "SlowToolkit"
        assert record.success is True
        assert record.error is None
        assert record.duration_ms >= wait_ms * 0.9
        assert record.output_size_bytes == json_size({"waited_ms": wait_ms})
        # The start lies a full tool duration before the end of the call.
        assert (end_of(record) - record.invoked_at) >= timedelta(milliseconds=wait_ms * 0.9)
    assert wait1.input_size_bytes == json_size(wait_ms)
    assert wait2.input_size_bytes == json_size({"ms": wait_ms})
    assert failed.toolkit_class == "WeatherToolkit"
    assert failed.success is False
    assert failed.error == "no forecast for Atlantis"
    assert failed.metadata.get("error_type") == "ValueError"
    assert failed.input_size_bytes == json_size(BAD_ARGS)
    assert failed.output_size_bytes == 0


def end_of(record: Any) -> datetime:
    return record.invoked_at + timedelta(milliseconds=record.duration_ms)
