"""RomaInstrumentor's lifecycle: exact restore on uninstrument, late subclasses, suppression, sampling,
config errors at load, and failures inside roma-otel never reaching the program.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

import roma_otel
from roma_otel import RomaInstrumentor, telemetry
from roma_otel import semconv as sc
from roma_otel.compat.dspy import detect_lm_hooks
from roma_otel.config import ConfigError, load_config
from roma_otel.instrumentation.patching import ORIGINAL_ATTR, PatchedMethod
from tests.conftest import answer_lm

LM_SPAN = "chat gpt-4o-mini"


@roma_otel.toolkit
class LifecycleToolkit:
    def lookup(self, city: str) -> str:
        return city.upper()

    def explode(self, city: str) -> str:
        raise LookupError(city)


def weather(city: str) -> str:
    """A plain function tool (no toolkit)."""
    return f"sunny in {city}"


class Planner(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("goal -> plan")

    def forward(self, goal: str) -> dspy.Prediction:
        return self.plan(goal=goal)


class Executor(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = dspy.Predict("plan -> answer")
        self.weather = dspy.Tool(weather)

    def forward(self, plan: str) -> dspy.Prediction:
        tools = LifecycleToolkit()
        tools.lookup("rome")
        try:
            tools.explode("nowhere")
        except LookupError:
            pass
        self.weather(city="rome")
        return self.act(plan=plan)


class Agent(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.planner = Planner()
        self.executor = Executor()

    def forward(self, goal: str) -> dspy.Prediction:
        return self.executor(plan=self.planner(goal=goal).plan)


LM_CALLS = 2  # planner 1, executor 1
TOOL_CALLS = 3  # lookup, explode (raises), weather (dspy.Tool)


def run_agent(n: int = 1) -> list[str]:
    agent = Agent()
    with dspy.context(lm=answer_lm(plan="go", answer="done")):
        return [agent(goal=f"goal {i}").answer for i in range(n)]


# --- restore exactly ------------------------------------------------------------------------------------
_METHOD_NAMES = (
    "forward", "aforward", "__call__", "acall", "execute", "__init_subclass__",
    "_finalize_lm_response", "_process_lm_response",  # LM result hooks before DSPy 3.4 (compat.dspy)
)  # fmt: skip


def _walk_subclasses(base: type) -> list[type]:
    seen: set[type] = set()
    out: list[type] = []
    stack = [base]
    while stack:
        for sub in type.__subclasses__(stack.pop()):
            if sub not in seen:
                seen.add(sub)
                out.append(sub)
                stack.append(sub)
    return out


def _target_classes() -> list[type]:
    from dspy.adapters.types.tool import Tool
    from dspy.clients.base_lm import BaseLM
    from dspy.utils.parallelizer import ParallelExecutor

    classes = [dspy.Module, *_walk_subclasses(dspy.Module), BaseLM, *_walk_subclasses(BaseLM)]
    classes += [Tool, *_walk_subclasses(Tool), ParallelExecutor, LifecycleToolkit]
    return list(dict.fromkeys(classes))


def _execution_module() -> Any:
    """DSPy's execution module where the installed DSPy has one (3.4; compat.dspy hooks its finalize)."""
    from dspy.clients.base_lm import BaseLM

    return detect_lm_hooks(BaseLM).finalize_module


def _snapshot() -> dict[Any, Any]:
    execution = _execution_module()
    snap: dict[Any, Any] = {}
    if execution is not None:
        snap[("module", "dspy.clients.execution.finalize")] = execution.finalize
    for cls in _target_classes():
        for name in (*_METHOD_NAMES, *(n for n in ("lookup", "explode") if cls is LifecycleToolkit)):
            snap[(cls, name)] = cls.__dict__.get(name, _ABSENT)
    return snap


_ABSENT = object()


def _ours(value: Any) -> bool:
    """True when ``value`` (or anything it wraps) is a roma-otel wrapper."""
    if isinstance(value, classmethod | staticmethod | PatchedMethod):
        value = value.__func__
    seen = 0
    while value is not None and seen < 50:
        if isinstance(value, types.FunctionType) and ORIGINAL_ATTR in value.__dict__:
            return True
        value = value.__dict__.get("__wrapped__") if isinstance(value, types.FunctionType) else None
        seen += 1
    return False


def _leftovers() -> list[str]:
    """Every roma-otel wrapper still installed on a DSPy/ROMA/test class or DSPy's execution module, and
    roma-otel's post-import hook still on ``sys.meta_path``."""
    execution = _execution_module()
    found = [repr(f) for f in sys.meta_path if type(f).__module__.startswith("roma_otel")]
    if execution is not None and (_ours(execution.finalize) or hasattr(execution.finalize, "__wrapped__")):
        found.append("dspy.clients.execution.finalize")
    prefixes = ("dspy", "roma_dspy", "roma_otel", __name__, "tests.")
    for cls in [object, *_walk_subclasses(object)]:
        if not str(getattr(cls, "__module__", "")).startswith(prefixes):
            continue
        for name, value in list(vars(cls).items()):
            if _ours(value):
                found.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return found


def test_uninstrument_restores_every_original_object(make_tel: Any) -> None:
    before = _snapshot()
    assert _leftovers() == []

    tel = make_tel()
    from dspy.adapters.types.tool import Tool
    from dspy.clients.base_lm import BaseLM
    from dspy.utils.parallelizer import ParallelExecutor

    hooks = detect_lm_hooks(BaseLM)
    # Instrumented: these really are wrapped, so the restore below is not vacuous.
    for owner, name in (
        (dspy.Predict, "forward"),
        (Planner, "forward"),
        (BaseLM, "__call__"),
        (BaseLM, "acall"),
        (Tool, "__call__"),
        (Tool, "acall"),
        (ParallelExecutor, "execute"),
        (LifecycleToolkit, "lookup"),
    ):
        assert _ours(owner.__dict__[name]), (owner, name)
    if hooks.finalize_module is not None:
        assert _ours(hooks.finalize_module.finalize)
    for name in ("_finalize_lm_response", "_process_lm_response"):
        assert _ours(BaseLM.__dict__.get(name)) is getattr(hooks, name.lstrip("_")), name
    assert run_agent() == ["done"]
    assert len(tel.spans_named(LM_SPAN)) == LM_CALLS

    tel.instrumentor.uninstrument()

    after = _snapshot()
    changed = [
        f"{getattr(k[0], '__qualname__', k[0])}.{k[1]}" for k in before if after.get(k, _ABSENT) is not before[k]
    ]
    assert changed == [], f"not restored to the very same object: {changed}"
    for (owner, name), value in after.items():
        if value is _ABSENT:
            continue
        assert not _ours(value), (owner, name)
        if owner == "module" or name in ("forward", "aforward", "execute", "lookup", "explode"):
            # DSPy's own with_callbacks decorators carry __wrapped__ (BaseLM.__call__, Tool.__call__);
            # everything else must carry none.
            assert not hasattr(value, "__wrapped__"), (owner, name)
    if hooks.finalize_module is not None:
        assert ORIGINAL_ATTR not in vars(hooks.finalize_module.finalize)
    assert "__init_subclass__" not in dspy.Module.__dict__ or not _ours(dspy.Module.__dict__["__init_subclass__"])
    assert _leftovers() == []

    # Uninstrumented programs make no telemetry.
    spans_before = len(tel.spans())
    assert run_agent() == ["done"]
    assert len(tel.spans()) == spans_before


def _late_forward(self: Any, goal: str) -> dspy.Prediction:
    return self.inner(goal=goal)


def _late_direct_forward(self: Any, goal: str) -> dspy.Prediction:
    return self.inner(goal=goal)


def test_subclass_defined_after_instrument_gets_spans_and_loses_them_on_uninstrument(make_tel: Any) -> None:
    tel = make_tel()

    class LatePlanner(Planner):  # a subclass of an existing subclass; its role comes from the MRO
        forward = _late_forward

        def __init__(self) -> None:
            super().__init__()
            self.inner = dspy.Predict("goal -> plan")

    class LateDirect(dspy.Module):
        forward = _late_direct_forward

        def __init__(self) -> None:
            super().__init__()
            self.inner = dspy.Predict("goal -> plan")

    assert _ours(LatePlanner.__dict__["forward"])
    with dspy.context(lm=answer_lm(plan="p")):
        assert LatePlanner()(goal="g").plan == "p"
        assert LateDirect().forward(goal="g").plan == "p"  # forward() directly, not __call__

    late = tel.span("LatePlanner")
    direct = tel.span("LateDirect")
    for span, cls in ((late, LatePlanner), (direct, LateDirect)):
        assert span.attributes[sc.MODULE_CLASS].endswith(cls.__qualname__)
        assert sc.EXECUTION_ID in span.attributes
        lm = [s for s in tel.spans_named(LM_SPAN) if s.context.trace_id == span.context.trace_id]
        assert len(lm) == 1
    assert late.attributes[sc.MODULE] == "planner"  # the role from the class name
    assert direct.attributes[sc.MODULE] == "LateDirect"

    tel.instrumentor.uninstrument()
    assert LatePlanner.__dict__["forward"] is _late_forward
    assert LateDirect.__dict__["forward"] is _late_direct_forward
    assert not hasattr(LatePlanner.__dict__["forward"], "__wrapped__")
    assert "aforward" not in LatePlanner.__dict__

    class AfterUninstrument(dspy.Module):
        def forward(self, x: str) -> str:
            return x

    assert not _ours(AfterUninstrument.__dict__["forward"])
    assert _leftovers() == []


# --- suppression and sampling ---------------------------------------------------------------------------
def test_suppress_instrumentation_makes_no_spans_and_no_metrics(make_tel: Any) -> None:
    tel = make_tel()
    with suppress_instrumentation():
        assert run_agent(2) == ["done", "done"]
    assert tel.spans() == []
    assert tel.metrics() == {}

    # Outside the block the same program is observed again.
    run_agent()
    assert len(tel.spans_named(LM_SPAN)) == LM_CALLS
    assert tel.metric_sum("lm_calls") == LM_CALLS


def test_suppression_by_the_legacy_plain_key_is_honoured_too(make_tel: Any) -> None:
    """The wrappers read the current context once (telemetry.enabled_context) instead of calling
    is_instrumentation_enabled(); both must agree on both keys it checks, including the plain string
    key that older instrumentations set."""
    from opentelemetry import context as otel_context
    from opentelemetry.instrumentation.utils import is_instrumentation_enabled

    from roma_otel.telemetry import enabled_context

    tel = make_tel()
    assert enabled_context() is otel_context.get_current() and is_instrumentation_enabled() is True
    with suppress_instrumentation():
        assert enabled_context() is None and is_instrumentation_enabled() is False
    token = otel_context.attach(otel_context.set_value("suppress_instrumentation", True))
    try:
        assert enabled_context() is None and is_instrumentation_enabled() is False
        assert run_agent(2) == ["done", "done"]
    finally:
        otel_context.detach(token)
    assert tel.spans() == []
    assert tel.metrics() == {}


def test_suppress_instrumentation_covers_roma_toolkit_manager_hooks(make_tel: Any) -> None:
    """ROMA's ToolkitManager is auto-instrumented too; suppression must silence it like the rest."""
    from roma_dspy.config.schemas.toolkit import ToolkitConfig
    from roma_dspy.tools.base.manager import ToolkitManager

    tel = make_tel()

    async def use_toolkits() -> float:
        manager = ToolkitManager()
        tools = await manager.get_tools_for_execution("exec-1", None, [ToolkitConfig("CalculatorToolkit")])
        result = tools["add"](a=1, b=2)
        await manager.cleanup_execution("exec-1")
        return result

    with suppress_instrumentation():
        assert asyncio.run(use_toolkits()) == 3
    assert [s.name for s in tel.spans()] == []
    assert tel.metrics() == {}


@pytest.mark.parametrize(
    "sampler",
    [ALWAYS_OFF, ParentBased(TraceIdRatioBased(0.0))],
    ids=["always_off", "parent_based_ratio_0"],
)
def test_sampled_out_traces_still_count_every_call(make_tel: Any, sampler: Any) -> None:
    tel = make_tel(sampler=sampler)
    runs = 3
    assert run_agent(runs) == ["done"] * runs
    assert tel.spans() == []
    assert tel.metric_sum("lm_calls") == LM_CALLS * runs
    assert tel.metric_sum("lm_calls", module="planner") == runs
    assert tel.metric_sum("lm_calls", module="executor") == runs
    assert tel.metric_sum("tool_invocations") == TOOL_CALLS * runs
    assert tel.metric_sum("tool_invocations_success") == 2 * runs
    assert tel.metric_sum("tool_invocations_failed", error_type="LookupError") == runs
    assert tel.metric_sum("tool_invocations", toolkit_class="dspy.Tool", tool_name="weather") == runs
    assert tel.metric_sum("tool_duration_ms") == TOOL_CALLS * runs
    assert tel.metric_sum("executions", status="completed") == runs



def test_a_sampled_out_execution_root_builds_no_attributes(make_tel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 2 §2: build no attributes for a span that does not record, also for an execution's root."""
    from roma_otel.instrumentation import executions, modules

    built: list[str] = []
    real_root, real_execution = modules._root_attributes, executions.execution_attributes

    def count_root(*args: Any) -> dict[str, Any]:
        built.append("module root")
        return real_root(*args)

    def count_execution(ctx: Any) -> dict[str, Any]:
        built.append("execution")
        return real_execution(ctx)

    monkeypatch.setattr(modules, "_root_attributes", count_root)
    monkeypatch.setattr(executions, "execution_attributes", count_execution)

    class Outer(dspy.Module):
        def forward(self, x: int) -> int:
            return x

    dropped = make_tel(sampler=ParentBased(ALWAYS_OFF))
    assert Outer()(x=1) == 1  # an implicit execution
    with roma_otel.execution("explicit"):
        pass
    assert built == []
    assert dropped.metric_sum("executions", status="completed") == 2  # still counted
    dropped.instrumentor.uninstrument()

    recorded = make_tel()  # the same program, sampled: both roots get their attributes
    Outer()(x=1)
    with roma_otel.execution("explicit"):
        pass
    assert built == ["module root", "execution"]
    assert {s.name for s in recorded.spans()} == {"Outer", sc.SPAN_EXECUTION}



def test_a_root_that_fails_to_start_leaves_no_context_behind(make_tel: Any) -> None:
    """If starting an execution's root raises inside roma-otel (here another span processor's on_start),
    the call runs uninstrumented and the next calls start fresh executions: nothing of the failed one
    stays current."""
    from opentelemetry.sdk.trace import SpanProcessor

    from roma_otel.context import ExecutionContext
    from roma_otel.instrumentation.modules import _MODULE

    class FailsOnce(SpanProcessor):
        failed = False

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("processor bug")

    class Outer(dspy.Module):
        def forward(self, x: int) -> int:
            return x

    tel = make_tel()
    tel.tracer_provider.add_span_processor(FailsOnce())
    assert Outer()(x=1) == 1
    assert FailsOnce.failed
    assert ExecutionContext.get() is None and _MODULE.get() is None
    assert Outer()(x=2) == 2 and Outer()(x=3) == 3
    # The SDK raised out of start_span before handing the failed span over: only the later two end.
    roots = [s for s in tel.spans() if s.name == "Outer"]
    ids = [s.attributes.get(sc.EXECUTION_ID) for s in roots]
    assert len(roots) == 2 and all(ids) and len(set(ids)) == 2  # two fresh executions, one each
    assert all(s.attributes.get(sc.EXECUTION_IMPLICIT) for s in roots)


# --- configuration errors fail at load ---------------------------------------------------------------------
def test_bad_env_value_fails_at_load_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"TOOLKIT_SAMPLE_RATE": "1.5"})
    message = str(info.value)
    assert "TOOLKIT_SAMPLE_RATE" in message
    assert "1.5" in message


def test_instrument_reads_the_environment_and_fails_before_patching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_SAMPLE_RATE", "1.5")
    with pytest.raises(ConfigError, match="TOOLKIT_SAMPLE_RATE"):
        RomaInstrumentor().instrument()
    assert telemetry.ACTIVE is None
    assert not _ours(dspy.Predict.__dict__["forward"])


@pytest.mark.parametrize("bad", ["nope", {"observability": {}}, 42])
def test_instrument_rejects_a_config_that_is_not_a_config_object(bad: Any) -> None:
    with pytest.raises(TypeError, match="RomaOtelConfig"):
        RomaInstrumentor().instrument(config=bad)
    assert telemetry.ACTIVE is None
    assert not _ours(dspy.Predict.__dict__["forward"])


# --- failures inside roma-otel are swallowed ----------------------------------------------------------------
@pytest.fixture
def broken_cost(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import roma_otel.instrumentation.lm as lm_module

    def compute_cost(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("price table exploded")

    monkeypatch.setattr(lm_module, "compute_cost", compute_cost)
    yield


def test_internal_error_is_swallowed_and_counted(make_tel: Any, broken_cost: None) -> None:
    tel = make_tel()
    # Same program, same answers as when roma-otel works.
    assert run_agent(2) == ["done", "done"]
    errors = tel.metrics().get(sc.M_INSTRUMENTATION_ERRORS[0], [])
    assert errors, "roma_otel_instrumentation_errors was not recorded"
    assert sum(p.value for p in errors) == LM_CALLS * 2
    # Other telemetry still flows: module spans and tool metrics.
    assert len(tel.spans_named("Planner")) == 2
    assert tel.metric_sum("tool_invocations") == TOOL_CALLS * 2


def test_internal_error_in_cost_still_ends_the_lm_span_and_counts_the_call(make_tel: Any, broken_cost: None) -> None:
    """A failure computing cost should cost only the cost figure, not the LM span or the call count."""
    tel = make_tel()
    assert run_agent() == ["done"]
    assert len(tel.spans_named(LM_SPAN)) == LM_CALLS, "the LM span was never ended (leaked)"
    assert tel.metric_sum("lm_calls") == LM_CALLS


# --- coexistence with another DSPy instrumentation ----------------------------------------------------------
def test_coexists_with_openinference_instrumented_first(make_tel: Any) -> None:
    """openinference-instrumentation-dspy (a dev dependency, entry point "dspy") wraps Predict.forward with
    wrapt before roma-otel does when its entry point is listed first, as happens with
    ``opentelemetry-instrument`` outside the repository. The program must still run, traced by both."""
    pytest.importorskip("openinference.instrumentation.dspy")
    from openinference.instrumentation.dspy import DSPyInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    # openinference's uninstrument() leaves e.g. dspy.LM.__call__ set to BaseLM's function where there
    # was none, which would hide later tests' LM calls from roma-otel: put DSPy's classes back exactly.
    dspy_classes = [c for c in _walk_subclasses(object) if str(c.__module__).startswith("dspy")]
    saved = {c: dict(vars(c)) for c in dspy_classes}

    other = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(other))
    openinference = DSPyInstrumentor()
    # skip_dep_check: its "dspy >= ..." range admits no pre-release, so it refuses ROMA's dspy 3.0.4b1.
    openinference.instrument(tracer_provider=provider, skip_dep_check=True)
    try:
        tel = make_tel()
        try:
            assert run_agent() == ["done"]
            assert len(tel.spans_named(LM_SPAN)) == LM_CALLS
            assert other.get_finished_spans(), "openinference made no spans"
        finally:
            tel.instrumentor.uninstrument()
    finally:
        openinference.uninstrument()
        for cls, before in saved.items():
            for name in set(vars(cls)) - set(before):
                if not name.startswith("_abc_"):
                    delattr(cls, name)
            for name, value in before.items():
                if vars(cls).get(name) is not value and name not in ("__dict__", "__weakref__", "__doc__"):
                    setattr(cls, name, value)
    assert _leftovers() == []


def test_a_program_pickled_by_value_carries_its_own_methods_not_roma_otels(tel: Any, tmp_path: Path) -> None:
    """DSPy's ``save(..., modules_to_serialize=[...])`` pickles the user's classes by value with cloudpickle:
    the instrumented program must save, and load in a process without roma-otel as its uninstrumented self."""
    import cloudpickle

    (tmp_path / "by_value_program.py").write_text(
        textwrap.dedent("""
        import dspy

        class Echo(dspy.Module):
            def forward(self, q):
                return dspy.Prediction(a=q.upper())

            async def aforward(self, q):
                return dspy.Prediction(a=q.lower())
        """)
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import by_value_program

        program = by_value_program.Echo()
        assert _ours(by_value_program.Echo.__dict__["forward"])  # instrumented here
        assert program(q="hi").a == "HI" and tel.spans_named("Echo")
        cloudpickle.register_pickle_by_value(by_value_program)
        try:
            blob = cloudpickle.dumps(program)
        finally:
            cloudpickle.unregister_pickle_by_value(by_value_program)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("by_value_program", None)
    (tmp_path / "program.pkl").write_bytes(blob)
    check = textwrap.dedent(f"""
        import asyncio, pickle, sys, types
        program = pickle.loads(open({str(tmp_path / "program.pkl")!r}, "rb").read())
        forward = type(program).__dict__["forward"]
        assert type(forward) is types.FunctionType and not hasattr(forward, "_roma_otel_original"), forward
        assert program.forward(q="hi").a == "HI" and asyncio.run(program.aforward(q="Hi")).a == "hi"
        assert not [m for m in sys.modules if m.startswith("roma_otel")], "loading pulled in roma-otel"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
