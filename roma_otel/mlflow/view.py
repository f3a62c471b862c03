"""How an execution's spans read in MLflow: span types, the trace's name, request and response, cost,
session and user.

MLflow shows what it finds under its own attribute names (``semconv``'s ``MLFLOW_*``), read at store time
(``mlflow/tracing/otel/translation/``, the SQL store's ``log_spans``):

- the span-type column (and the ``span.type = 'TOOL'`` filter) is the raw ``mlflow.spanType`` of each span;
- the trace list's Request/Response come from the root span's inputs and outputs, which MLflow takes from
  ``input.value``/``output.value`` (and ``gen_ai.input.messages``/``gen_ai.output.messages``);
- a span's cost is ``mlflow.llm.cost`` when present; without it MLflow prices the call from its own table;
- per-trace token and cost totals sum the LM spans' ``gen_ai.usage.*`` and ``mlflow.llm.cost``.

Everything here runs in the bridge's worker on finished spans, never on the program's threads. Values are
raw (strings, not JSON-quoted strings): MLflow JSON-encodes every OTLP attribute value itself.
"""

from __future__ import annotations

import json
from typing import Any

from roma_otel import semconv as sc
from roma_otel.context import ExecutionContext
from roma_otel.cost import split_cost
from roma_otel.redaction import fields_of

__all__ = ["lm_view", "request_summary", "response_summary", "root_view", "session_and_user", "span_type", "trace_name",
           "trace_tags_from"]  # fmt: skip

_NAME_CHARS = 100  # a trace name is a list label, not the goal
_SESSION_KEYS = ("session_id", "session", sc.MLFLOW_TRACE_SESSION)
_USER_KEYS = ("user_id", "user", sc.MLFLOW_TRACE_USER)

_BY_OPERATION = {
    sc.OP_CHAT: sc.MLFLOW_TYPE_CHAT_MODEL,
    sc.OP_TEXT_COMPLETION: sc.MLFLOW_TYPE_LLM,
    sc.OP_EXECUTE_TOOL: sc.MLFLOW_TYPE_TOOL,
    sc.OP_INVOKE_AGENT: sc.MLFLOW_TYPE_AGENT,
}


def span_type(name: str, attrs: Any) -> str | None:
    """The MLflow span type of a roma-otel span other than the root (which is always AGENT)."""
    op = attrs.get(sc.GEN_AI_OPERATION_NAME)
    if op is not None and op in _BY_OPERATION:
        return _BY_OPERATION[op]
    if sc.TOOLKIT_OPERATION in attrs:
        return sc.MLFLOW_TYPE_TASK
    if sc.MODULE_CLASS in attrs:
        return sc.MLFLOW_TYPE_AGENT if attrs.get(sc.MODULE) in sc.ROLES else sc.MLFLOW_TYPE_CHAIN
    if name == sc.SPAN_TASK:
        return sc.MLFLOW_TYPE_CHAIN
    return None


def lm_view(attrs: Any, *, with_cost: bool) -> dict[str, Any]:
    """What an LM span adds for MLflow: roma-otel's cost as MLflow's, and the system prompt in the chat.

    An unpriced call gets no cost and an empty MLflow model, so MLflow does not put a price of its own on
    it: unknown stays unknown. ``with_cost``: the receiving MLflow has per-span cost (3.17 has, 3.6 not).
    """
    out: dict[str, Any] = {}
    if with_cost and sc.LM_COST_SOURCE in attrs:
        usd = attrs.get(sc.LM_COST_USD)
        if usd is None:
            out[sc.MLFLOW_LLM_MODEL] = ""
        else:
            out[sc.MLFLOW_LLM_COST] = json.dumps(_cost(attrs, float(usd)))
    system = attrs.get(sc.GEN_AI_SYSTEM_INSTRUCTIONS)
    if system is not None and sc.GEN_AI_INPUT_MESSAGES in attrs:
        # The latest conventions keep the system prompt apart; MLflow's chat view only shows messages.
        try:
            merged = [{"role": "system", "parts": json.loads(system)}, *json.loads(attrs[sc.GEN_AI_INPUT_MESSAGES])]
            out[sc.GEN_AI_INPUT_MESSAGES] = json.dumps(merged, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return out


def _cost(attrs: Any, usd: float) -> dict[str, float]:
    """MLflow's cost of an LM span: our total, split into input and output by the model's list prices
    (a provider reports one total; a price we computed splits exactly). No split without a list price."""
    cost: dict[str, float] = {}
    model = f"{attrs.get(sc.GEN_AI_PROVIDER_NAME)}/{attrs.get(sc.GEN_AI_REQUEST_MODEL)}"
    split = split_cost(model, attrs.get(sc.GEN_AI_USAGE_INPUT_TOKENS, 0), attrs.get(sc.GEN_AI_USAGE_OUTPUT_TOKENS, 0))
    if usd == 0.0:
        cost = {"input_cost": 0.0, "output_cost": 0.0}
    elif split is not None and sum(split) > 0:
        share = split[0] / sum(split)
        cost = {"input_cost": usd * share, "output_cost": usd * (1 - share)}
    cost["total_cost"] = usd
    return cost


def _first(mapping: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = mapping.get(key)
        if value is not None and value != "":
            return str(value)
    return None


def request_summary(ctx: ExecutionContext | None) -> dict[str, Any]:
    """The trace's request without its content: the goal's length, the input field names."""
    out: dict[str, Any] = {}
    if ctx is None:
        return out
    if ctx.task is not None:
        out["goal_chars"] = len(str(ctx.task))
    if ctx.inputs is not None:
        out["input_fields"] = sorted(str(k) for k in ctx.inputs)
    if ctx.solver_type is not None:
        out["solver"] = ctx.solver_type
    return out


def response_summary(ctx: ExecutionContext | None) -> dict[str, Any]:
    """The trace's response without its content: the status and the output field names (or type)."""
    if ctx is None:
        return {}
    out: dict[str, Any] = {"status": ctx.status}
    if ctx.output is not None:
        fields = fields_of(ctx.output)
        if fields is not None:
            out["output_fields"] = [str(k) for k in fields]
        else:
            out["output_type"] = type(ctx.output).__name__
    return out


def trace_name(ctx: ExecutionContext | None, root_name: str, capture: bool) -> str:
    """The trace's name in MLflow's list: the goal (with content capture on), else the module or solver."""
    if capture and ctx is not None and ctx.task is not None:
        goal = " ".join(str(ctx.task).split())
        if goal:
            return goal if len(goal) <= _NAME_CHARS else goal[: _NAME_CHARS - 1] + "…"
    if root_name != sc.SPAN_EXECUTION:
        return root_name
    return (ctx.solver_type if ctx is not None else None) or "execution"


def trace_tags_from(ctx: ExecutionContext | None) -> dict[str, str]:
    """Trace tags the execution's metadata asks for (``metadata["tags"]``), and its unpriced LM calls."""
    tags: dict[str, str] = {}
    if ctx is None:
        return tags
    user_tags = ctx.metadata.get("tags")
    if isinstance(user_tags, dict):
        tags.update({str(k): str(v) for k, v in user_tags.items()})
    if ctx.cost_unknown_calls:
        tags["roma_otel.cost_unknown_calls"] = str(ctx.cost_unknown_calls)
    return tags


def session_and_user(ctx: ExecutionContext | None) -> tuple[str | None, str | None]:
    if ctx is None:
        return None, None
    return _first(ctx.metadata, _SESSION_KEYS), _first(ctx.metadata, _USER_KEYS)


def root_view(ctx: ExecutionContext | None, attrs: Any) -> dict[str, Any]:
    """What the root span adds for MLflow: its type, a request and a response (content-free summaries where
    capture did not put them there), session and user."""
    out: dict[str, Any] = {sc.MLFLOW_SPAN_TYPE: sc.MLFLOW_TYPE_AGENT}
    if sc.INPUT_VALUE not in attrs and sc.GEN_AI_INPUT_MESSAGES not in attrs:
        out[sc.INPUT_VALUE] = json.dumps(request_summary(ctx))
    if sc.OUTPUT_VALUE not in attrs and sc.GEN_AI_OUTPUT_MESSAGES not in attrs:
        out[sc.OUTPUT_VALUE] = json.dumps(response_summary(ctx))
    session, user = session_and_user(ctx)
    if session is not None:
        out[sc.SESSION_ID] = session
    if user is not None:
        out[sc.USER_ID] = user
    return out
