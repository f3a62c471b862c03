"""Instrumented programs still behave: optimizers, copies, save/load, return values, exceptions."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.clients.base_lm import BaseLM
from opentelemetry.trace import StatusCode

import roma_otel
from roma_otel import semconv as sc
from roma_otel.instrumentation.patching import ORIGINAL_ATTR
from tests.conftest import answer_lm

LM_SPAN = "chat gpt-4o-mini"


class QA(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generate = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.generate(question=question)


TRAINSET = [
    dspy.Example(question="Capital of France?", answer="Paris").with_inputs("question"),
    dspy.Example(question="Capital of Italy?", answer="Rome").with_inputs("question"),
    dspy.Example(question="Where is the Louvre?", answer="Paris").with_inputs("question"),
    dspy.Example(question="Where is the Eiffel Tower?", answer="Paris").with_inputs("question"),
]


def exact(example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> bool:
    return example.answer == pred.answer


def paris_lm() -> Any:
    return answer_lm(reasoning="It is in France.", answer="Paris")


def compile_qa() -> QA:
    optimizer = dspy.BootstrapFewShot(metric=exact, max_bootstrapped_demos=2, max_labeled_demos=0, max_rounds=1)
    with dspy.context(lm=paris_lm()):
        return optimizer.compile(QA(), trainset=TRAINSET)


def demos_of(program: QA) -> list[dict[str, Any]]:
    return [dict(d.toDict() if hasattr(d, "toDict") else d) for d in program.generate.predict.demos]


def test_bootstrap_compile_copy_save_load(make_tel: Any, tmp_path: Path) -> None:
    # Reference run without instrumentation.
    plain = compile_qa()
    plain_path = tmp_path / "plain.json"
    plain.save(str(plain_path))
    with dspy.context(lm=paris_lm()):
        plain_pred = plain(question="Capital of France?")

    tel = make_tel()
    compiled = compile_qa()

    # Trainset 0 and 2 pass the metric, 1 fails: three teacher runs, two demos.
    assert compiled._compiled is True
    assert demos_of(compiled) == demos_of(plain)
    assert [d["question"] for d in demos_of(compiled)] == ["Capital of France?", "Where is the Louvre?"]
    assert len(tel.spans_named("QA")) == 3
    assert len(tel.spans_named("ChainOfThought")) == 3
    assert len(tel.spans_named(LM_SPAN)) == 3
    for root in tel.spans_named("QA"):
        assert root.parent is None
        assert root.attributes[sc.EXECUTION_IMPLICIT] is True
    assert tel.metric_sum(sc.M_EXECUTIONS[0]) == 3

    before = len(tel.spans())
    with dspy.context(lm=paris_lm()):
        pred = compiled(question="Capital of France?")
        clone = copy.deepcopy(compiled)
        clone_pred = clone(question="Capital of France?")
    assert pred == plain_pred
    assert clone_pred == plain_pred
    assert demos_of(clone) == demos_of(compiled)
    assert clone.generate.predict is not compiled.generate.predict
    assert len(tel.spans_named("QA")) == 5  # the compiled program and its copy are both traced
    assert len(tel.spans()) == before + 2 * 4  # QA, ChainOfThought, Predict, LM per call

    path = tmp_path / "compiled.json"
    compiled.save(str(path))
    saved = json.loads(path.read_text())
    assert saved == json.loads(plain_path.read_text())
    loaded = QA()
    loaded.load(str(path))
    assert demos_of(loaded) == demos_of(compiled)
    with dspy.context(lm=paris_lm()):
        loaded_pred = loaded(question="Capital of France?")
    assert loaded_pred == plain_pred
    assert len(tel.spans_named("QA")) == 6


def _run_pair(lm_fields: dict[str, str], module_factory: Any) -> tuple[Any, Any]:
    with dspy.context(lm=answer_lm(**lm_fields)):
        sync = module_factory()(question="What is 6*7?")
        asynchronous = asyncio.run(module_factory().acall(question="What is 6*7?"))
    return sync, asynchronous


@pytest.mark.parametrize(
    ("name", "factory", "fields"),
    [
        ("Predict", lambda: dspy.Predict("question -> answer"), {"answer": "42"}),
        (
            "ChainOfThought",
            lambda: dspy.ChainOfThought("question -> answer: int"),
            {"reasoning": "six sevens", "answer": "42"},
        ),
    ],
)
def test_return_values_identical_with_and_without_instrumentation(
    make_tel: Any, name: str, factory: Any, fields: dict[str, str]
) -> None:
    plain_sync, plain_async = _run_pair(fields, factory)
    tel = make_tel()
    inst_sync, inst_async = _run_pair(fields, factory)

    assert type(inst_sync) is type(plain_sync) is dspy.Prediction
    assert inst_sync == plain_sync
    assert inst_sync.toDict() == plain_sync.toDict()
    assert inst_async == plain_async
    assert inst_sync.answer == plain_sync.answer
    if name == "ChainOfThought":
        assert inst_sync.answer == 42 and inst_sync.reasoning == "six sevens"
    # And it was really instrumented: one module span and one LM span per call.
    assert len(tel.spans_named(name)) == 2
    assert len(tel.spans_named(LM_SPAN)) == 2


class BoomError(RuntimeError):
    pass


class Exploding(dspy.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        self.predict(question=question)
        raise self.exc


class Outer(dspy.Module):
    def __init__(self, inner: Exploding) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, question: str) -> dspy.Prediction:
        return self.inner(question=question)


def test_exception_in_forward_propagates_unchanged(tel: Any) -> None:
    boom = BoomError("kaboom")
    program = Outer(Exploding(boom))
    with dspy.context(lm=answer_lm(answer="x")), pytest.raises(BoomError) as info:
        program(question="q")
    assert info.value is boom
    assert str(info.value) == "kaboom"
    assert info.value.__cause__ is None and info.value.__context__ is None

    inner = tel.span("Exploding")
    outer = tel.span("Outer")
    assert tel.parent_of(inner) is outer
    for span in (inner, outer):
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes[sc.ERROR_TYPE] == "BoomError"
        assert [e.name for e in span.events] == ["exception"]
    assert outer.attributes[sc.EXECUTION_STATUS] == "failed"
    # The Predict call that succeeded before the raise is not marked failed.
    predict = tel.span("Predict")
    assert predict.status.status_code != StatusCode.ERROR
    assert sc.ERROR_TYPE not in predict.attributes
    assert tel.metric_sum(sc.M_EXECUTIONS[0], **{sc.L_STATUS: "failed"}) == 1
    assert tel.metric_sum(sc.M_EXECUTIONS[0], **{sc.L_STATUS: "completed"}) == 0

    # Async path: same object, same error status.
    boom2 = BoomError("async kaboom")

    class AsyncExploding(dspy.Module):
        async def aforward(self, question: str) -> dspy.Prediction:
            raise boom2

    with pytest.raises(BoomError) as ainfo:
        asyncio.run(AsyncExploding().acall(question="q"))
    assert ainfo.value is boom2
    aspan = tel.span("AsyncExploding")
    assert aspan.status.status_code == StatusCode.ERROR
    assert aspan.attributes[sc.ERROR_TYPE] == "BoomError"


@roma_otel.toolkit
class EchoKit:
    def echo(self, text: str) -> str:
        return text


def test_uninstrument_stops_all_spans(make_tel: Any) -> None:
    tel = make_tel()
    program = QA()
    kit = EchoKit()
    with dspy.context(lm=paris_lm()):
        assert program(question="q").answer == "Paris"
    assert kit.echo("hi") == "hi"
    assert dspy.Tool(kit.echo)(text="yo") == "yo"
    made = len(tel.spans())
    assert made == 4 + 2
    invocations = tel.metric_sum(sc.M_TOOL_INVOCATIONS[0])
    assert invocations == 2

    roma_otel.RomaInstrumentor().uninstrument()
    # Every patched attribute is back to the original.
    for cls in (dspy.Module, dspy.Predict, dspy.ChainOfThought, QA):
        assert not hasattr(cls.__dict__.get("forward"), ORIGINAL_ATTR), cls
    assert not hasattr(BaseLM.__dict__["__call__"], ORIGINAL_ATTR)
    assert not hasattr(EchoKit.__dict__["echo"], ORIGINAL_ATTR)

    with dspy.context(lm=paris_lm()):
        assert program(question="q").answer == "Paris"
        assert asyncio.run(dspy.Predict("question -> answer").acall(question="q")).answer == "Paris"
    assert kit.echo("hi") == "hi"
    assert dspy.Tool(kit.echo)(text="yo") == "yo"

    class DefinedAfter(dspy.Module):
        def forward(self) -> str:
            return "x"

    assert DefinedAfter()() == "x"
    assert len(tel.spans()) == made
    assert tel.metric_sum(sc.M_TOOL_INVOCATIONS[0]) == invocations

    # Instrumenting again traces once per call, not twice.
    again = make_tel()
    with dspy.context(lm=paris_lm()):
        program(question="q")
    assert kit.echo("hi") == "hi"
    assert sorted(s.name for s in again.spans()) == sorted(
        ["QA", "ChainOfThought", "Predict", LM_SPAN, f"{sc.SPAN_TOOL_PREFIX} echo"]
    )
    assert len(tel.spans()) == made
