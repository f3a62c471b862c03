"""Every span, attribute and metric name roma-otel emits, defined once.

Dashboards, alert rules, the Postgres and MLflow bridges and the tests import names from here and
nowhere else. The Prometheus series a metric becomes is written beside it: the exporter appends
``_total`` to counters and ``_bucket``/``_sum``/``_count`` to histograms, and appends a unit suffix
unless the unit is empty, which is why the contract metrics below carry no unit.
"""

from __future__ import annotations

from typing import Final

# --- span names ---------------------------------------------------------------------------------
SPAN_EXECUTION: Final = "roma.execution"  # explicit execution or ROMA solver run
SPAN_TASK: Final = "roma.task"  # one node of a ROMA task DAG (atomize/plan/execute/aggregate)
SPAN_TOOL_PREFIX: Final = "execute_tool"  # "execute_tool {tool_name}" (GenAI semconv)
SPAN_TOOLKIT_PREFIX: Final = "toolkit"  # "toolkit {operation} {toolkit_class}"

# --- GenAI semantic-convention attributes -----------------------------------------------------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"  # opt-in
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
GEN_AI_TOOL_CALL_ARGUMENTS: Final = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT: Final = "gen_ai.tool.call.result"
GEN_AI_TOOL_TYPE: Final = "gen_ai.tool.type"
GEN_AI_SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"  # opt-in (see GENAI_LATEST_OPT_IN)
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_AGENT_ID: Final = "gen_ai.agent.id"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
ERROR_TYPE: Final = "error.type"

# A module's or an execution's captured inputs and outputs (JSON), under the names GenAI backends read
# for non-LM spans (OpenInference's; MLflow, Phoenix and Langfuse show them as the span's inputs/outputs).
INPUT_VALUE: Final = "input.value"
OUTPUT_VALUE: Final = "output.value"

OP_CHAT: Final = "chat"
OP_TEXT_COMPLETION: Final = "text_completion"
OP_EXECUTE_TOOL: Final = "execute_tool"
OP_INVOKE_AGENT: Final = "invoke_agent"
TOOL_TYPE_FUNCTION: Final = "function"

# With OTEL_SEMCONV_STABILITY_OPT_IN containing this value, roma-otel follows the GenAI conventions as of
# GENAI_SEMCONV_TAG: ROMA roles and executions become `invoke_agent {name}` spans with gen_ai.agent.name, an
# LM call's system prompt moves to gen_ai.system_instructions, agent content to gen_ai.input/output.messages,
# LM spans get gen_ai.response.finish_reasons and tool spans gen_ai.tool.type. Without it nothing changes.
# The metric names and attributes at that tag are the ones below (gen_ai.client.token.usage and
# gen_ai.client.operation.duration with gen_ai.provider.name); the newer GenAI repository's token counters
# are not in any tagged release yet, so they are not emitted.
SEMCONV_OPT_IN_ENV: Final = "OTEL_SEMCONV_STABILITY_OPT_IN"
GENAI_LATEST_OPT_IN: Final = "gen_ai_latest_experimental"
# open-telemetry/semantic-conventions v1.41.1 (ead83b9b), the last tag defining the GenAI conventions before
# they moved to open-telemetry/semantic-conventions-genai (which has no tag yet).
GENAI_SEMCONV_TAG: Final = "v1.41.1"
GENAI_SEMCONV_SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.41.0"
TOKEN_TYPE_INPUT: Final = "input"
TOKEN_TYPE_OUTPUT: Final = "output"

# --- roma-otel span attributes ------------------------------------------------------------------
EXECUTION_ID: Final = "roma.execution.id"
EXECUTION_TASK: Final = "roma.execution.task"
EXECUTION_MAX_DEPTH: Final = "roma.execution.max_depth"
EXECUTION_SOLVER_TYPE: Final = "roma.execution.solver_type"
EXECUTION_CONFIG_VERSION: Final = "roma.execution.config_version"
EXECUTION_STATUS: Final = "roma.execution.status"
EXECUTION_TOTAL_TASKS: Final = "roma.execution.total_tasks"
EXECUTION_COMPLETED_TASKS: Final = "roma.execution.completed_tasks"
EXECUTION_FAILED_TASKS: Final = "roma.execution.failed_tasks"
EXECUTION_TOTAL_COST: Final = "roma.execution.total_cost"
EXECUTION_TOTAL_TOKENS: Final = "roma.execution.total_tokens"
EXECUTION_DURATION: Final = "roma.execution.execution_duration"  # seconds
EXECUTION_MAX_DEPTH_REACHED: Final = "roma.execution.max_depth_reached"
EXECUTION_IMPLICIT: Final = "roma.execution.implicit"  # true when the outermost module call made it

TASK_ID: Final = "roma.task.id"
TASK_DEPTH: Final = "roma.task.depth"
TASK_GOAL: Final = "roma.task.goal"
TASK_AGENT_TYPE: Final = "roma.task.agent_type"

MODULE: Final = "roma.module"  # ROMA role (atomizer, planner, ...) or the module's class name
MODULE_CLASS: Final = "roma.module.class"  # the module's qualified class name

LM_COST_USD: Final = "roma.lm.cost_usd"
LM_COST_SOURCE: Final = "roma.lm.cost_source"  # provider | price_table | cache | unknown
LM_CACHE_HIT: Final = "roma.lm.cache_hit"
LM_LATENCY_MS: Final = "roma.lm.latency_ms"
LM_TOTAL_TOKENS: Final = "roma.lm.total_tokens"

TOOLKIT_CLASS: Final = "roma.toolkit.class"
TOOL_INPUT_SIZE: Final = "roma.tool.input_size_bytes"
TOOL_OUTPUT_SIZE: Final = "roma.tool.output_size_bytes"
TOOL_SUCCESS: Final = "roma.tool.success"
TOOL_DURATION_MS: Final = "roma.tool.duration_ms"

TOOLKIT_OPERATION: Final = "roma.toolkit.operation"  # create | cache_hit | cache_miss | cleanup
TOOLKIT_DURATION_MS: Final = "roma.toolkit.duration_ms"
TOOLKIT_SUCCESS: Final = "roma.toolkit.success"
TOOLKIT_ERROR: Final = "roma.toolkit.error"

ROLES: Final = ("atomizer", "planner", "executor", "aggregator", "verifier")
TOOLKIT_OPERATIONS: Final = ("create", "cache_hit", "cache_miss", "cleanup")

# --- MLflow's names: what MLflow's trace store and UI read (set by the MLflow bridge, roma_otel/mlflow) ----
MLFLOW_SPAN_TYPE: Final = "mlflow.spanType"  # its span-type column and the `span.type = 'TOOL'` filter
MLFLOW_TRACE_TAG_PREFIX: Final = "mlflow.traceTag."  # root-span attributes MLflow >= 3.13 makes trace tags
MLFLOW_TRACE_NAME: Final = "mlflow.traceName"  # the trace tag naming the trace in the trace list
MLFLOW_LLM_COST: Final = "mlflow.llm.cost"  # JSON {input_cost, output_cost, total_cost} in USD (MLflow >= 3.x)
MLFLOW_LLM_MODEL: Final = "mlflow.llm.model"
MLFLOW_SOURCE_RUN: Final = "mlflow.sourceRun"  # trace metadata: the run a trace belongs to
MLFLOW_TRACE_SESSION: Final = "mlflow.trace.session"  # trace metadata
MLFLOW_TRACE_USER: Final = "mlflow.trace.user"  # trace metadata
SESSION_ID: Final = "session.id"  # read by MLflow >= 3.x from spans as the trace's session
USER_ID: Final = "user.id"
# MLflow span types (mlflow.entities.SpanType) by the kind of roma-otel span
MLFLOW_TYPE_AGENT: Final = "AGENT"  # executions, ROMA role modules
MLFLOW_TYPE_CHAIN: Final = "CHAIN"  # other modules, task-tree nodes
MLFLOW_TYPE_CHAT_MODEL: Final = "CHAT_MODEL"  # chat LM calls
MLFLOW_TYPE_LLM: Final = "LLM"  # text-completion LM calls
MLFLOW_TYPE_TOOL: Final = "TOOL"  # tool calls
MLFLOW_TYPE_TASK: Final = "TASK"  # toolkit lifecycle steps (create, cache hit/miss, cleanup)

# --- metric label keys (Prometheus labels, identical after translation) -------------------------
L_TOOLKIT_CLASS: Final = "toolkit_class"
L_TOOL_NAME: Final = "tool_name"
L_ERROR_TYPE: Final = "error_type"
L_MODULE: Final = "module"
L_MODEL: Final = "model"
L_TOKEN_TYPE: Final = "token_type"
L_CACHE_HIT: Final = "cache_hit"
L_STATUS: Final = "status"
L_OPERATION: Final = "operation"
L_SUCCESS: Final = "success"

# --- metrics: (instrument name, unit, description). Prometheus series in the comment. -----------
# Tools (the seed's PromQL is written against these exact series)
M_TOOL_INVOCATIONS: Final = ("tool_invocations", "", "Tool calls")  # tool_invocations_total
M_TOOL_INVOCATIONS_SUCCESS: Final = (
    "tool_invocations_success",
    "",
    "Tool calls that returned",
)  # tool_invocations_success_total
M_TOOL_INVOCATIONS_FAILED: Final = (
    "tool_invocations_failed",
    "",
    "Tool calls that raised",
)  # tool_invocations_failed_total
M_TOOL_DURATION_MS: Final = (
    "tool_duration_ms",
    "",
    "Tool call duration in milliseconds",
)  # tool_duration_ms_bucket/_sum/_count
# Per-module LM usage: the seed's {module}_calls, {module}_tokens, {module}_cost, {module}_avg_latency
M_LM_CALLS: Final = ("lm_calls", "", "LM calls by module")  # lm_calls_total
M_LM_TOKENS: Final = ("lm_tokens", "", "LM tokens by module and token_type")  # lm_tokens_total
M_LM_COST_USD: Final = ("lm_cost_usd", "", "LM cost in USD by module")  # lm_cost_usd_total
M_LM_COST_UNKNOWN: Final = (
    "lm_cost_unknown",
    "",
    "LM calls whose cost could not be priced",
)  # lm_cost_unknown_total
M_LM_LATENCY_MS: Final = ("lm_latency_ms", "", "LM call latency in milliseconds")  # lm_latency_ms_bucket
# GenAI semantic conventions
M_GENAI_TOKEN_USAGE: Final = (
    "gen_ai.client.token.usage",
    "{token}",
    "Number of input and output tokens used",
)  # gen_ai_client_token_usage_bucket
M_GENAI_OPERATION_DURATION: Final = (
    "gen_ai.client.operation.duration",
    "s",
    "GenAI operation duration",
)  # gen_ai_client_operation_duration_seconds_bucket
# Executions, tasks and toolkit lifecycle
M_EXECUTIONS: Final = ("executions", "", "Executions by final status")  # executions_total
M_EXECUTION_DURATION_SECONDS: Final = (
    "execution_duration_seconds",
    "",
    "Execution wall time in seconds",
)  # execution_duration_seconds_bucket
M_EXECUTION_COST_USD: Final = (
    "execution_cost_usd",
    "",
    "Execution LM cost in USD",
)  # execution_cost_usd_bucket
M_TASKS: Final = ("tasks", "", "Tasks by final status")  # tasks_total
M_TOOLKIT_LIFECYCLE: Final = (
    "toolkit_lifecycle_events",
    "",
    "Toolkit lifecycle events by operation",
)  # toolkit_lifecycle_events_total
M_TOOLKIT_LIFECYCLE_DURATION_MS: Final = (
    "toolkit_lifecycle_duration_ms",
    "",
    "Toolkit lifecycle operation duration in milliseconds",
)  # toolkit_lifecycle_duration_ms_bucket
M_INSTRUMENTATION_ERRORS: Final = (
    "roma_otel_instrumentation_errors",
    "",
    "Failures inside roma-otel itself, swallowed",
)  # roma_otel_instrumentation_errors_total

M_PERSISTENCE_DROPPED: Final = (
    "roma_otel_persistence_dropped",
    "",
    "Trace rows a persistence bridge had to drop (queue or spool full)",
)  # roma_otel_persistence_dropped_total

# Bucket boundaries (floats, so Prometheus renders le="5.0" consistently).
TOOL_DURATION_MS_BUCKETS: Final = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0, 120000.0, 300000.0, 600000.0,
)  # fmt: skip
LM_LATENCY_MS_BUCKETS: Final = (
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    120000.0, 300000.0,
)  # fmt: skip
EXECUTION_DURATION_SECONDS_BUCKETS: Final = (
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
EXECUTION_COST_USD_BUCKETS: Final = (
    0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0,
)  # fmt: skip
GENAI_TOKEN_USAGE_BUCKETS: Final = (
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
)  # fmt: skip
GENAI_OPERATION_DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip

# The Prometheus series names the dashboards and alert rules depend on (asserted by the tests).
PROMETHEUS_SERIES: Final = (
    "tool_invocations_total",
    "tool_invocations_success_total",
    "tool_invocations_failed_total",
    "tool_duration_ms_bucket",
    "tool_duration_ms_sum",
    "tool_duration_ms_count",
    "lm_calls_total",
    "lm_tokens_total",
    "lm_cost_usd_total",
    "lm_latency_ms_bucket",
    "gen_ai_client_token_usage_bucket",
    "gen_ai_client_operation_duration_seconds_bucket",
    "executions_total",
    "execution_duration_seconds_bucket",
    "execution_cost_usd_bucket",
    "tasks_total",
    "toolkit_lifecycle_events_total",
    "toolkit_lifecycle_duration_ms_bucket",
)
