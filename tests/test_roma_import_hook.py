"""roma-otel never imports ROMA: what the program has not imported yet is patched when it imports it.

Each test runs in a fresh interpreter (sys.modules must start without ``roma_dspy``), with the stand-in
package (tests/standin) importable through ``tests.conftest``. This module imports no ``roma_dspy`` at
top level: the child processes import it from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.roma_script import FINAL, GOAL, answers

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "standin"


# Every class roma-otel patches in ROMA, and what it wraps there (the context's `set` is a classmethod).
PATCHED = {
    "roma_dspy.core.engine.solve.RecursiveSolver": ("solve", "async_solve", "event_solve", "async_event_solve"),
    "roma_dspy.core.engine.runtime.ModuleRuntime": ("_execute_agent_with_tracing",),
    "roma_dspy.core.context.execution_context.ExecutionContext": ("set",),
    "roma_dspy.tools.base.manager.ToolkitManager": (
        "_create_toolkit_instance",
        "get_tools_for_execution",
        "cleanup_execution",
    ),
    "roma_dspy.tools.base.base.BaseToolkit": ("__init_subclass__",),
    "roma_dspy.tools.core.echo.EchoToolkit": ("echo", "aecho", "fail"),
}


# --- run inside the child process ------------------------------------------------------------------
def roma_modules() -> list[str]:
    return sorted(m for m in sys.modules if m == "roma_dspy" or m.startswith("roma_dspy."))


def our_finders() -> list[str]:
    return [repr(f) for f in sys.meta_path if type(f).__module__.startswith("roma_otel")]


def patched_attributes() -> dict[str, list[str]]:
    """For each class in PATCHED (importing it), the attributes that are roma-otel's wrappers now."""
    import importlib

    from roma_otel.instrumentation.patching import ORIGINAL_ATTR

    out: dict[str, list[str]] = {}
    for path, names in PATCHED.items():
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        ours = []
        for attr in names:
            value = cls.__dict__.get(attr)
            func = getattr(value, "__func__", value)  # a classmethod's function
            if attr == "__init_subclass__":  # the subclass hook (BaseToolkit has none of its own)
                if value is not None and func.__module__ == "roma_otel.instrumentation.patching":
                    ours.append(attr)
            elif value is not None and (hasattr(value, ORIGINAL_ATTR) or hasattr(func, ORIGINAL_ATTR)):
                ours.append(attr)
        out[path] = ours
    return out


def run_program(tel: Any) -> list[Any]:
    """A solver run with toolkits, and a toolkit tool inside an execution; the spans it made, normalised."""
    import dspy
    from dspy.utils import DummyLM
    from roma_dspy.config.schemas.toolkit import ToolkitConfig
    from roma_dspy.core.engine.solve import RecursiveSolver
    from roma_dspy.tools.core.echo import EchoToolkit

    import roma_otel
    from roma_otel import semconv as sc

    with dspy.context(lm=DummyLM(answers())):
        root = RecursiveSolver(max_depth=2, toolkit_configs=[ToolkitConfig("CalculatorToolkit")]).solve(GOAL)
    assert root.result == FINAL
    with roma_otel.execution("echo"):
        assert EchoToolkit().echo("hi") == "hi"
    kept = (sc.MODULE, sc.TASK_DEPTH, sc.EXECUTION_TASK, sc.EXECUTION_TOTAL_TASKS, sc.TOOLKIT_OPERATION)
    out = []
    for span in tel.spans():
        parent = tel.parent_of(span)
        attrs = span.attributes or {}
        out.append(
            [
                span.name,
                parent.name if parent is not None else None,
                sorted(attrs),
                {k: attrs[k] for k in kept if k in attrs},
            ]
        )
    return sorted(out, key=json.dumps)


# --- the parent side --------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ROMA_OTEL_", "TOOLKIT_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return env


def run_child(body: str, *args: str) -> Any:
    """Run ``body`` in a fresh interpreter with the stand-in importable; return what it printed as JSON."""
    prelude = textwrap.dedent("""
        import json, sys
        from tests.conftest import make_telemetry  # puts tests/standin on sys.path; imports no roma_dspy
        from tests.test_roma_import_hook import our_finders, patched_attributes, roma_modules, run_program
        assert roma_modules() == [], roma_modules()
    """)
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


NOT_PATCHED = {path: [] for path in PATCHED}
ALL_PATCHED = {path: list(names) for path, names in PATCHED.items()}


def test_instrument_does_not_import_roma_and_patches_it_when_the_program_does() -> None:
    out = run_child("""
        tel = make_telemetry()
        imported_at_instrument = roma_modules()
        finders = our_finders()
        import roma_dspy.core.engine.solve  # the program's own import: ROMA's side effects are its own
        print(json.dumps({"imported": imported_at_instrument, "finders": len(finders),
                          "patched": patched_attributes(), "finders_after": our_finders()}))
    """)
    assert out["imported"] == []
    assert out["finders"] == 1  # the post-import hook waits for ROMA
    assert out["patched"] == ALL_PATCHED
    assert out["finders_after"] == []  # every awaited module arrived: the hook took itself off


def test_a_solver_run_makes_the_same_spans_whether_roma_is_imported_before_or_after_instrument() -> None:
    body = """
        if sys.argv[1] == "roma-first":
            import roma_dspy.core.engine.solve, roma_dspy.tools.core.echo
        tel = make_telemetry()
        if sys.argv[1] == "instrument-first":
            assert roma_modules() == [], roma_modules()
        print(json.dumps({"spans": run_program(tel), "patched": patched_attributes()}))
    """
    deferred = run_child(body, "instrument-first")
    assert deferred["patched"] == ALL_PATCHED
    names = [span[0] for span in deferred["spans"]]
    assert names.count("roma.execution") == 2 and "execute_tool echo" in names, names
    executions = [span[3] for span in deferred["spans"] if span[0] == "roma.execution"]
    assert {"roma.task.depth": 0, "roma.execution.task": GOAL, "roma.execution.total_tasks": 3} in executions
    executors = [s for s in deferred["spans"] if s[3].get("roma.module") == "executor" and "roma.module.class" in s[2]]
    assert len(executors) == 2  # module spans of the executor role (not its LM calls)
    assert any(span[3].get("roma.toolkit.operation") == "create" for span in deferred["spans"])
    assert deferred == run_child(body, "roma-first")


def test_uninstrument_before_roma_is_imported_leaves_no_hook_and_roma_unpatched() -> None:
    out = run_child("""
        tel = make_telemetry()
        waiting = our_finders()
        tel.instrumentor.uninstrument()
        after = our_finders()
        spans = run_program(tel)  # imports ROMA now
        print(json.dumps({"waiting": len(waiting), "after": after, "imported": roma_modules() != [],
                          "patched": patched_attributes(), "spans": spans}))
    """)
    assert out["waiting"] == 1
    assert out["after"] == []
    assert out["imported"]
    assert out["patched"] == NOT_PATCHED
    assert out["spans"] == []


def test_a_hooked_module_keeps_its_loader_and_reloads_and_other_lookups_are_untouched() -> None:
    out = run_child("""
        import importlib, importlib.machinery, importlib.util, inspect
        tel = make_telemetry()
        other = importlib.util.find_spec("json.decoder")
        missing = importlib.util.find_spec("roma_otel_no_such_module")
        import roma_dspy.core.engine.solve as solve
        loaders = [type(solve.__loader__).__name__, solve.__spec__.loader is solve.__loader__]
        source = "class RecursiveSolver" in inspect.getsource(solve)
        reloaded = importlib.reload(solve) is solve  # re-executed: a new, unpatched RecursiveSolver
        print(json.dumps({"other": type(other.loader).__name__, "missing": missing is None,
                          "loaders": loaders, "source": source, "reloaded": reloaded,
                          "finders": our_finders()}))
    """)
    assert out == {
        "other": "SourceFileLoader",
        "missing": True,
        "loaders": ["SourceFileLoader", True],
        "source": True,
        "reloaded": True,
        "finders": [],
    }


def test_a_patch_that_fails_at_import_is_swallowed_counted_and_the_rest_still_apply() -> None:
    out = run_child("""
        import roma_otel.instrumentation.roma as roma
        from roma_otel import semconv as sc
        from roma_otel.compat import degraded

        def broken(patcher, cls):
            raise RuntimeError("unknown shape")

        roma._TARGETS = (("roma_dspy.core.engine.solve", "RecursiveSolver", broken), *roma._TARGETS[1:])
        tel = make_telemetry()
        from roma_dspy.core.engine.solve import RecursiveSolver  # must not raise
        print(json.dumps({"patched": patched_attributes(),
                          "degraded": [list(k) for k in degraded.degradations() if k[0] == "roma-dspy"],
                          "errors": tel.metric_sum(sc.M_INSTRUMENTATION_ERRORS[0], where="compat.roma-dspy")}))
    """)
    assert out["patched"] == {**ALL_PATCHED, "roma_dspy.core.engine.solve.RecursiveSolver": []}
    assert out["degraded"] == [["roma-dspy", "ROMA executions, tasks and toolkit lifecycle"]]
    assert out["errors"] == 1


def test_concurrent_first_imports_patch_once() -> None:
    out = run_child("""
        import importlib, threading
        from roma_otel.instrumentation.patching import ORIGINAL_ATTR
        tel = make_telemetry()
        barrier = threading.Barrier(8)
        got = []

        def load():
            barrier.wait()
            got.append(importlib.import_module("roma_dspy.core.engine.solve").RecursiveSolver)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        from roma_dspy.core.context.execution_context import ExecutionContext
        solve = got[0].__dict__["solve"]
        set_ = ExecutionContext.__dict__["set"].__func__
        print(json.dumps({"classes": len(set(got)), "patched": patched_attributes(),
                          "once": [not hasattr(getattr(solve, ORIGINAL_ATTR), ORIGINAL_ATTR),
                                   not hasattr(getattr(set_, ORIGINAL_ATTR), ORIGINAL_ATTR)],
                          "patches": len(tel.instrumentor._patcher)}))
        tel.instrumentor.uninstrument()
        assert patched_attributes() == {path: [] for path in patched_attributes()}
    """)
    assert out["classes"] == 1
    assert out["patched"] == ALL_PATCHED
    assert out["once"] == [True, True]


def test_zero_code_startup_does_not_import_roma() -> None:
    from tests.test_zero_code import _opentelemetry_instrument

    program = textwrap.dedent("""
        import json, sys
        before = sorted(m for m in sys.modules if m.startswith("roma_dspy"))
        from roma_dspy.core.engine.solve import RecursiveSolver
        print(json.dumps([before, hasattr(RecursiveSolver.__dict__["solve"], "_roma_otel_original")]))
    """)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(STANDIN), env["PYTHONPATH"]])
    env.update(
        {
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "dspy",  # openinference's; roma-otel alone here
        }
    )
    done = subprocess.run(
        [_opentelemetry_instrument(), sys.executable, "-c", program],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[], True]
