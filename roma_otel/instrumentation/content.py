"""Which span attributes captured content goes to, and what it looks like there.

Only reached when content capture is on (``Telemetry.redactor`` is set). Module and execution spans carry
their inputs and outputs as ``input.value`` / ``output.value`` (JSON); LM spans carry chat messages in the
GenAI conventions' shape (``roma_otel.messages``). With the latest GenAI conventions opted in
(``OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental``), agent spans (ROMA roles, executions) carry
``gen_ai.input.messages`` / ``gen_ai.output.messages`` instead, and an LM call's system prompt moves to
``gen_ai.system_instructions``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from roma_otel import messages as msg
from roma_otel import semconv as sc
from roma_otel.redaction import dumps_within, redact

if TYPE_CHECKING:
    from roma_otel.telemetry import Telemetry

__all__ = ["call_inputs", "emit_inference_event", "execution_inputs", "input_attributes", "lm_attributes",
           "output_attributes"]  # fmt: skip

INFERENCE_EVENT = "gen_ai.client.inference.operation.details"  # the conventions' event for an LM call


def call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A module call's arguments as one mapping (positional ones under ``args``)."""
    return {"args": list(args), **kwargs} if args else dict(kwargs)


def execution_inputs(task: Any) -> dict[str, Any]:
    """What an execution was asked to do, as its root span's input."""
    return {"goal": task}


def _agent_or_value(tel: Telemetry, value: Any, agent: bool, output: bool) -> dict[str, str]:
    redactor = tel.redactor
    assert redactor is not None
    if agent and tel.genai_latest:
        if output:
            return {sc.GEN_AI_OUTPUT_MESSAGES: redactor.render(msg.agent_output_messages(redact(value)))}
        return {sc.GEN_AI_INPUT_MESSAGES: redactor.render(msg.agent_input_messages(redact(value)))}
    return {sc.OUTPUT_VALUE if output else sc.INPUT_VALUE: redactor.render_json(value)}


def input_attributes(tel: Telemetry, inputs: Any, agent: bool) -> dict[str, str]:
    """A module's or an execution's inputs; ``agent``: a ROMA role or an execution."""
    return _agent_or_value(tel, inputs, agent, output=False)


def output_attributes(tel: Telemetry, outputs: Any, agent: bool) -> dict[str, str]:
    return _agent_or_value(tel, outputs, agent, output=True)


def lm_attributes(
    tel: Telemetry, messages: Any, outputs: Any, failed: bool, finish_reasons: list[str]
) -> dict[str, str]:
    """An LM call's prompt (and, when it returned, its completions) as GenAI messages."""
    redactor = tel.redactor
    assert redactor is not None
    attrs: dict[str, str] = {}
    inputs = msg.input_messages(messages)
    if tel.genai_latest:
        system, inputs = msg.split_system_instructions(inputs)
        if system:
            attrs[sc.GEN_AI_SYSTEM_INSTRUCTIONS] = redactor.render(system)
    attrs[sc.GEN_AI_INPUT_MESSAGES] = redactor.render(inputs)
    if not failed:
        attrs[sc.GEN_AI_OUTPUT_MESSAGES] = redactor.render(msg.output_messages(outputs, finish_reasons))
    return attrs


def emit_inference_event(
    tel: Telemetry, span: Any, base: dict[str, Any], messages: Any, outputs: Any, failed: bool, reasons: list[str]
) -> None:
    """The LM call's content as the GenAI inference event (``destination: event`` or ``span_and_event``).

    A log record in the span's context, its content structured (not JSON text), redacted and capped like
    span content; ``base``: the call's operation, model, provider and usage attributes.
    """
    from opentelemetry import trace
    from opentelemetry._logs import LogRecord

    redactor, logger = tel.event_redactor, tel.content_events
    assert redactor is not None and logger is not None

    def structured(value: Any) -> Any:
        return json.loads(dumps_within(redact(value), redactor.max_length))

    attrs = dict(base)
    system, inputs = msg.split_system_instructions(msg.input_messages(messages))
    if system:
        attrs[sc.GEN_AI_SYSTEM_INSTRUCTIONS] = structured(system)
    attrs[sc.GEN_AI_INPUT_MESSAGES] = structured(inputs)
    if not failed:
        attrs[sc.GEN_AI_OUTPUT_MESSAGES] = structured(msg.output_messages(outputs, reasons))
    context = trace.set_span_in_context(span) if span is not None else None
    logger.emit(LogRecord(event_name=INFERENCE_EVENT, attributes=attrs, context=context))
