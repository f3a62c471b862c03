"""Trace and execution context across DSPy's worker threads, plain threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dspy
from opentelemetry.sdk.trace import ReadableSpan

import roma_otel
from roma_otel import semconv as sc
from tests.conftest import answer_lm

LM_SPAN = "chat gpt-4o-mini"
PREDICT = "Predict"


def _exec_id(span: ReadableSpan) -> Any:
    return span.attributes.get(sc.EXECUTION_ID)


class Answer(dspy.Module):
    """One worker's unit of work; records which thread ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def forward(self, question: str) -> dspy.Prediction:
        with self._lock:
            self.threads.add(threading.get_ident())
        return self.predict(question=question)


class Batch(dspy.Module):
    """Fans ``Answer`` out over dspy.Parallel from inside its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = Answer()

    def forward(self, questions: list[str]) -> list[Any]:
        parallel = dspy.Parallel(num_threads=4, disable_progress_bar=True)
        return parallel([(self.answer, {"question": q}) for q in questions])


def test_parallel_workers_join_the_execution_trace(tel: Any) -> None:
    n = 8
    program = Batch()
    with dspy.context(lm=answer_lm(answer="42")), roma_otel.execution("batch") as ctx:
        results = program(questions=[f"q{i}" for i in range(n)])

    assert [r.answer for r in results] == ["42"] * n
    # The work really ran on pool threads, not in the caller.
    assert program.answer.threads and threading.get_ident() not in program.answer.threads

    exec_span = tel.span(sc.SPAN_EXECUTION)
    assert exec_span.parent is None
    assert exec_span.attributes[sc.EXECUTION_ID] == ctx.execution_id
    trace_id = exec_span.context.trace_id

    batch = tel.span("Batch")
    assert tel.parent_of(batch) is exec_span

    answers = tel.spans_named("Answer")
    predicts = tel.spans_named(PREDICT)
    lms = tel.spans_named(LM_SPAN)
    assert len(answers) == n
    assert len(predicts) == n
    assert len(lms) == n
    # Each worker's module span hangs off the span active when Parallel was called.
    for span in answers:
        assert tel.parent_of(span) is batch
    answer_ids = {s.context.span_id for s in answers}
    assert {tel.parent_of(p).context.span_id for p in predicts} == answer_ids
    predict_ids = {s.context.span_id for s in predicts}
    assert {tel.parent_of(lm).context.span_id for lm in lms} == predict_ids

    for span in tel.spans():
        assert span.context.trace_id == trace_id, span.name
        assert _exec_id(span) == ctx.execution_id, span.name
        if span.name != sc.SPAN_EXECUTION:
            assert span.attributes[sc.TASK_DEPTH] == 0, span.name
    # One execution, not one per worker.
    assert tel.metric_sum(sc.M_EXECUTIONS[0]) == 1


def test_parallel_called_directly_in_execution_parents_to_it(tel: Any) -> None:
    n = 8
    program = Answer()
    examples = [dspy.Example(question=f"q{i}").with_inputs("question") for i in range(n)]
    with dspy.context(lm=answer_lm(answer="42")), roma_otel.execution("batch") as ctx:
        results = dspy.Parallel(num_threads=4, disable_progress_bar=True)([(program, e) for e in examples])
    assert [r.answer for r in results] == ["42"] * n
    assert threading.get_ident() not in program.threads

    exec_span = tel.span(sc.SPAN_EXECUTION)
    answers = tel.spans_named("Answer")
    assert len(answers) == n
    for span in answers:
        assert tel.parent_of(span) is exec_span
        assert sc.EXECUTION_IMPLICIT not in span.attributes
    assert len(tel.spans_named(LM_SPAN)) == n
    assert {s.context.trace_id for s in tel.spans()} == {exec_span.context.trace_id}
    assert {_exec_id(s) for s in tel.spans()} == {ctx.execution_id}
    assert tel.metric_sum(sc.M_EXECUTIONS[0]) == 1


def test_parallel_inside_implicit_execution_shares_it(tel: Any) -> None:
    n = 8
    program = Batch()
    with dspy.context(lm=answer_lm(answer="42")):
        results = program(questions=[f"q{i}" for i in range(n)])
    assert len(results) == n

    root = tel.span("Batch")
    assert root.parent is None
    assert root.attributes[sc.EXECUTION_IMPLICIT] is True
    assert len(tel.spans_named("Answer")) == n
    assert len(tel.spans_named(LM_SPAN)) == n
    for span in tel.spans():
        assert span.context.trace_id == root.context.trace_id, span.name
        assert _exec_id(span) == _exec_id(root), span.name
        if span is not root:
            assert sc.EXECUTION_IMPLICIT not in span.attributes, span.name
    # The workers joined the caller's execution instead of each starting one.
    assert tel.metric_sum(sc.M_EXECUTIONS[0]) == 1


def test_two_executions_in_plain_threads_stay_apart(tel: Any) -> None:
    dspy.configure(lm=answer_lm(answer="ok"))
    calls_each = 3
    barrier = threading.Barrier(2, timeout=10)
    ids: dict[str, str] = {}
    errors: list[BaseException] = []

    def job(name: str) -> None:
        try:
            program = dspy.Predict("question -> answer")
            with roma_otel.execution(name) as ctx:
                ids[name] = ctx.execution_id
                barrier.wait()  # both executions are open at the same time
                for i in range(calls_each):
                    assert program(question=f"{name}-{i}").answer == "ok"
                barrier.wait()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(name,)) for name in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert ids["alpha"] != ids["beta"]

    exec_spans = tel.spans_named(sc.SPAN_EXECUTION)
    assert len(exec_spans) == 2
    by_task = {s.attributes[sc.EXECUTION_TASK]: s for s in exec_spans}
    assert set(by_task) == {"alpha", "beta"}
    assert by_task["alpha"].context.trace_id != by_task["beta"].context.trace_id

    for name, exec_span in by_task.items():
        assert exec_span.parent is None
        assert exec_span.attributes[sc.EXECUTION_ID] == ids[name]
        members = [s for s in tel.spans() if s.context.trace_id == exec_span.context.trace_id]
        assert {_exec_id(s) for s in members} == {ids[name]}
        predicts = [s for s in members if s.name == PREDICT]
        lms = [s for s in members if s.name == LM_SPAN]
        assert len(predicts) == calls_each
        assert len(lms) == calls_each
        for p in predicts:
            assert tel.parent_of(p) is exec_span
        for lm in lms:
            assert tel.parent_of(lm) in predicts
    assert len(tel.spans_named(LM_SPAN)) == 2 * calls_each
    assert tel.metric_sum(sc.M_EXECUTIONS[0], **{sc.L_STATUS: "completed"}) == 2


def test_evaluate_with_threads_stays_in_the_execution(tel: Any) -> None:
    devset = [dspy.Example(question=f"what is {i}+0?", answer="7").with_inputs("question") for i in range(6)]
    program = dspy.Predict("question -> answer")

    def metric(example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> bool:
        return example.answer == pred.answer

    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=4, display_progress=False)
    with dspy.context(lm=answer_lm(answer="7")), roma_otel.execution("eval") as ctx:
        result = evaluate(program)

    assert getattr(result, "score", result) == 100.0  # DSPy 3.0.0's betas return the bare score
    exec_span = tel.span(sc.SPAN_EXECUTION)
    predicts = tel.spans_named(PREDICT)
    lms = tel.spans_named(LM_SPAN)
    assert len(predicts) == len(devset)
    assert len(lms) == len(devset)
    for p in predicts:
        assert tel.parent_of(p) is exec_span
    assert {tel.parent_of(lm).context.span_id for lm in lms} == {p.context.span_id for p in predicts}
    for span in tel.spans():
        assert span.context.trace_id == exec_span.context.trace_id, span.name
        assert _exec_id(span) == ctx.execution_id, span.name


def test_asyncio_acall_and_gather_in_one_execution(tel: Any) -> None:
    program = dspy.Predict("question -> answer")

    async def main() -> str:
        async with roma_otel.execution("async batch") as ctx:
            first = await program.acall(question="single")
            assert first.answer == "yes"
            results = await asyncio.gather(*(program.acall(question=f"q{i}") for i in range(5)))
            assert [r.answer for r in results] == ["yes"] * 5
            return ctx.execution_id

    with dspy.context(lm=answer_lm(answer="yes")):
        execution_id = asyncio.run(main())

    exec_span = tel.span(sc.SPAN_EXECUTION)
    predicts = tel.spans_named(PREDICT)
    lms = tel.spans_named(LM_SPAN)
    assert len(predicts) == 6
    assert len(lms) == 6
    for p in predicts:
        assert tel.parent_of(p) is exec_span
    assert {tel.parent_of(lm).context.span_id for lm in lms} == {p.context.span_id for p in predicts}
    for span in tel.spans():
        assert span.context.trace_id == exec_span.context.trace_id, span.name
        assert _exec_id(span) == execution_id, span.name
    assert tel.metric_sum(sc.M_EXECUTIONS[0]) == 1


def test_gathered_executions_each_get_their_own_trace(tel: Any) -> None:
    program = dspy.Predict("question -> answer")
    n = 3

    async def job(i: int) -> str:
        async with roma_otel.execution(f"job-{i}") as ctx:
            await asyncio.sleep(0)  # let the other executions open before this one calls the LM
            await program.acall(question=f"q{i}")
            await asyncio.sleep(0)
            await program.acall(question=f"again {i}")
            return ctx.execution_id

    async def main() -> list[str]:
        return list(await asyncio.gather(*(job(i) for i in range(n))))

    with dspy.context(lm=answer_lm(answer="done")):
        ids = asyncio.run(main())

    assert len(set(ids)) == n
    exec_spans = tel.spans_named(sc.SPAN_EXECUTION)
    assert len(exec_spans) == n
    assert len({s.context.trace_id for s in exec_spans}) == n
    assert {s.attributes[sc.EXECUTION_ID] for s in exec_spans} == set(ids)
    for exec_span in exec_spans:
        assert exec_span.parent is None
        members = [s for s in tel.spans() if s.context.trace_id == exec_span.context.trace_id]
        assert {_exec_id(s) for s in members} == {exec_span.attributes[sc.EXECUTION_ID]}
        predicts = [s for s in members if s.name == PREDICT]
        lms = [s for s in members if s.name == LM_SPAN]
        assert len(predicts) == 2
        assert len(lms) == 2
        for p in predicts:
            assert tel.parent_of(p) is exec_span
        for lm in lms:
            assert tel.parent_of(lm) in predicts
    assert len(tel.spans_named(LM_SPAN)) == 2 * n


class Rendezvous(dspy.Module):
    """Holds both outermost calls open at once, so their implicit executions overlap."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier = barrier
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        self.barrier.wait()
        return self.predict(question=question)


def test_concurrent_outermost_calls_are_separate_implicit_executions(tel: Any) -> None:
    dspy.configure(lm=answer_lm(answer="ok"))
    program = Rendezvous(threading.Barrier(2, timeout=10))
    errors: list[BaseException] = []
    seen: list[Any] = []

    def call(i: int) -> None:
        try:
            assert roma_otel.ExecutionContext.get() is None
            seen.append(program(question=f"q{i}").answer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert seen == ["ok", "ok"]

    assert tel.spans_named(sc.SPAN_EXECUTION) == []
    roots = tel.spans_named("Rendezvous")
    assert len(roots) == 2
    for root in roots:
        assert root.parent is None
        assert root.attributes[sc.EXECUTION_IMPLICIT] is True
        assert root.attributes[sc.EXECUTION_STATUS] == "completed"
    assert roots[0].context.trace_id != roots[1].context.trace_id
    assert _exec_id(roots[0]) != _exec_id(roots[1])
    for root in roots:
        members = [s for s in tel.spans() if s.context.trace_id == root.context.trace_id]
        assert sorted(s.name for s in members) == sorted(["Rendezvous", PREDICT, LM_SPAN])
        assert {_exec_id(s) for s in members} == {_exec_id(root)}
        for s in members:
            if s is not root:
                assert sc.EXECUTION_IMPLICIT not in s.attributes, s.name
    assert tel.metric_sum(sc.M_EXECUTIONS[0]) == 2
    assert tel.metric_sum(sc.M_EXECUTIONS[0], **{sc.L_STATUS: "completed"}) == 2


def test_bind_context_carries_execution_into_a_plain_thread(tel: Any) -> None:
    """The public helper behind the ParallelExecutor hook, used by hand."""
    n = 2
    dspy.configure(lm=answer_lm(answer="ok"))
    program = dspy.Predict("question -> answer")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            program(question=f"q{i}")
        except BaseException as exc:
            errors.append(exc)

    with roma_otel.execution("manual") as ctx:
        threads = [threading.Thread(target=roma_otel.bind_context(work), args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors
    exec_span = tel.span(sc.SPAN_EXECUTION)
    predicts = tel.spans_named(PREDICT)
    assert len(predicts) == n
    for p in predicts:
        assert tel.parent_of(p) is exec_span
        assert _exec_id(p) == ctx.execution_id
        assert sc.EXECUTION_IMPLICIT not in p.attributes
