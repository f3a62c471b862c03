"""Generate the Grafana dashboards and the Prometheus recording/alerting rules from ``roma_otel.semconv``.

Run ``python scripts/gen_dashboards.py`` after changing a panel or a rule (``--check`` exits 1 if the committed
files differ); tests/test_dashboards.py and tests/test_prometheus_rules.py hold the committed files to this output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from roma_otel import semconv as sc

ROOT = Path(__file__).resolve().parent.parent
OVERVIEW_PATH = Path("grafana/dashboards/roma-overview.json")
TOOLS_PATH = Path("grafana/dashboards/roma-tools.json")
RULES_PATH = Path("prometheus/rules/roma-otel.rules.yml")

DATASOURCE_UID = "roma-prometheus"  # grafana/provisioning/datasources/prometheus.yaml provisions this uid
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
RANGE = "$__range"

# --- series names, derived from the semconv instruments ------------------------------------------------------
_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds"}  # units roma-otel uses; "", "1" and "{...}" add nothing


def base_name(metric: tuple[str, str, str]) -> str:
    """The Prometheus name of an instrument before ``_total``/``_bucket``: dots become underscores and a
    unit suffix is appended unless the name already ends with it (ANCHORS §5, and the collector's normaliser)."""
    name, unit, _ = metric
    name = name.replace(".", "_")
    suffix = _UNIT_SUFFIX.get(unit, "")
    if suffix and not name.endswith(f"_{suffix}"):
        name = f"{name}_{suffix}"
    return name


def total(metric: tuple[str, str, str]) -> str:
    return f"{base_name(metric)}_total"


def hist(metric: tuple[str, str, str], part: str = "bucket") -> str:
    return f"{base_name(metric)}_{part}"


TOOL_CALLS = total(sc.M_TOOL_INVOCATIONS)
TOOL_OK = total(sc.M_TOOL_INVOCATIONS_SUCCESS)
TOOL_FAILED = total(sc.M_TOOL_INVOCATIONS_FAILED)
TOOL_MS = sc.M_TOOL_DURATION_MS
LM_CALLS = total(sc.M_LM_CALLS)
LM_TOKENS = total(sc.M_LM_TOKENS)
LM_COST = total(sc.M_LM_COST_USD)
LM_LATENCY = sc.M_LM_LATENCY_MS
GENAI_TOKENS = sc.M_GENAI_TOKEN_USAGE
GENAI_DURATION = sc.M_GENAI_OPERATION_DURATION
EXECUTIONS = total(sc.M_EXECUTIONS)
EXEC_SECONDS = sc.M_EXECUTION_DURATION_SECONDS
EXEC_COST = sc.M_EXECUTION_COST_USD
TASKS = total(sc.M_TASKS)
LIFECYCLE = total(sc.M_TOOLKIT_LIFECYCLE)
LIFECYCLE_MS = sc.M_TOOLKIT_LIFECYCLE_DURATION_MS

TK, TOOL, ERR, MOD = sc.L_TOOLKIT_CLASS, sc.L_TOOL_NAME, sc.L_ERROR_TYPE, sc.L_MODULE
STATUS, OP = sc.L_STATUS, sc.L_OPERATION
HIT, MISS = "cache_hit", "cache_miss"
assert {HIT, MISS} <= set(sc.TOOLKIT_OPERATIONS)
COMPLETED, FAILED = "completed", "failed"


def sel(name: str, *matchers: str) -> str:
    """``name{m1, m2}``; empty matchers are dropped."""
    kept = [m for m in matchers if m]
    return f"{name}{{{', '.join(kept)}}}" if kept else name


def rate(selector: str, window: str = RATE) -> str:
    return f"rate({selector}[{window}])"


def increase(selector: str, window: str = RANGE) -> str:
    return f"increase({selector}[{window}])"


def sum_by(labels: str, inner: str) -> str:
    return f"sum by ({labels}) ({inner})" if labels else f"sum({inner})"


def quantile(q: float, labels: str, bucket_selector: str, window: str = RATE) -> str:
    by = f"le, {labels}" if labels else "le"
    return f"histogram_quantile({q}, sum by ({by}) ({rate(bucket_selector, window)}))"


def le_matcher(bound: float, buckets: tuple[float, ...]) -> str:
    """Match one bucket bound as roma-otel renders it (``5.0``) and as a Go exporter such as the collector's
    renders it (``5``): Prometheus 2.x does not normalise ``le`` (ANCHORS §5)."""
    if bound not in buckets:
        raise ValueError(f"{bound} is not a bucket bound of {buckets}")
    if bound.is_integer():
        return f'le=~"{int(bound)}(\\\\.0)?"'
    return f'le="{bound!r}"'


def contract_series() -> set[str]:
    """Every series name a dashboard or rule may read: the contract plus each histogram's _sum and _count."""
    names = set(sc.PROMETHEUS_SERIES)
    for name in sc.PROMETHEUS_SERIES:
        if name.endswith("_bucket"):
            names |= {name.replace("_bucket", "_sum"), name.replace("_bucket", "_count")}
    return names


_PROMQL_WORDS = {"by", "without", "and", "or", "unless", "offset", "on", "ignoring", "group_left", "group_right",
                 "bool", "le", "inf", "nan", "vector"}  # fmt: skip


def referenced_series(expr: str) -> set[str]:
    """Metric names (and recorded-rule names) an expression reads: identifiers that are not a function call,
    a label name, a keyword, a duration or inside a string."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_groupings = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_matchers)
    without_ranges = re.sub(r"\[[^\]]*\]", "[]", without_groupings)
    found = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", without_ranges):
        word, rest = match.group(0), without_ranges[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue
        found.add(word)
    return found


# --- Grafana ----------------------------------------------------------------------------------------------
def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": False, "text": "Prometheus", "value": DATASOURCE_UID},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value label filter; "All" is the regex ``.*`` so an unset filter matches every series."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def target(ref: str, expr: str, legend: str, *, instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "instant": instant,
        "legendFormat": legend,
        "range": not instant,
        "refId": ref,
    }


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    unit: str,
    *,
    ratio: bool = False,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never", "spanNulls": False},
    }
    if ratio:
        defaults.update({"min": 0, "max": 1})
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def stat(title: str, description: str, expr: str, unit: str, *, good_above: float | None = None) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "blue", "value": None}]
    if good_above is not None:
        steps = [{"color": "red", "value": None}, {"color": "green", "value": good_above}]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
        "targets": [target("A", expr, "", instant=True)],
    }


def layout(stats: list[dict[str, Any]], graphs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stats in a row of four across the top, then graphs two per row; ids in reading order."""
    panels: list[dict[str, Any]] = []
    for i, panel in enumerate(stats):
        panels.append(
            {"id": len(panels) + 1, "gridPos": {"h": 4, "w": 6, "x": 6 * (i % 4), "y": 4 * (i // 4)}, **panel}
        )
    top = 4 * ((len(stats) + 3) // 4)
    for i, panel in enumerate(graphs):
        grid = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": top + 8 * (i // 2)}
        panels.append({"id": len(panels) + 1, "gridPos": grid, **panel})
    return panels


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]], panels: list[Any]) -> dict:
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "asDropdown": False,
                "icon": "external link",
                "includeVars": False,
                "keepTime": True,
                "tags": ["roma-otel"],
                "targetBlank": False,
                "title": "roma-otel dashboards",
                "type": "dashboards",
            }
        ],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["roma-otel", "dspy", "llm"],
        "templating": {"list": [datasource_variable(), *variables]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
    }


def ratio_or_zero(numerator: str, denominator: str) -> str:
    """numerator / denominator, with an absent numerator (e.g. no failure yet) read as 0, not as no data."""
    return f"({numerator} or vector(0)) / {denominator}"


def overview_dashboard() -> dict[str, Any]:
    mod = f'{MOD}=~"$module"'
    done, failed = f'{STATUS}="{COMPLETED}"', f'{STATUS}="{FAILED}"'
    stats = [
        stat("Executions", "Executions finished in the time range.", sum_by("", increase(EXECUTIONS)), "short"),
        stat(
            "Execution success rate",
            "Share of executions in the time range that completed.",
            ratio_or_zero(sum_by("", increase(sel(EXECUTIONS, done))), sum_by("", increase(EXECUTIONS))),
            "percentunit",
            good_above=0.95,
        ),
        stat("LM cost", "LM spend in the time range, USD.", sum_by("", increase(sel(LM_COST, mod))), "currencyUSD"),
        stat(
            "LM tokens",
            "Input and output tokens in the time range.",
            sum_by("", increase(sel(LM_TOKENS, mod))),
            "short",
        ),
    ]
    graphs = [
        timeseries(
            "Executions per minute",
            "Executions finishing per minute, by final status (completed / failed).",
            [target("A", f"{sum_by(STATUS, rate(EXECUTIONS))} * 60", "{{status}}")],
            "short",
        ),
        timeseries(
            "Success and failure rates",
            "Share of executions that completed and that failed, and share of tasks (task-tree nodes) that failed."
            " The task failure rate alerts above 20%.",
            [
                target(
                    "A",
                    ratio_or_zero(sum_by("", rate(sel(EXECUTIONS, done))), sum_by("", rate(EXECUTIONS))),
                    "executions completed",
                ),
                target(
                    "B",
                    ratio_or_zero(sum_by("", rate(sel(EXECUTIONS, failed))), sum_by("", rate(EXECUTIONS))),
                    "executions failed",
                ),
                target(
                    "C", ratio_or_zero(sum_by("", rate(sel(TASKS, failed))), sum_by("", rate(TASKS))), "tasks failed"
                ),
            ],
            "percentunit",
            ratio=True,
        ),
        timeseries(
            "Tasks per minute",
            "Task-tree nodes (ROMA tasks or roma_otel.task) finishing per minute, by status.",
            [target("A", f"{sum_by(STATUS, rate(TASKS))} * 60", "{{status}}")],
            "short",
        ),
        timeseries(
            "Cost per execution",
            "Mean and p95 LM cost of one execution, USD (execution_cost_usd histogram). Runs above $5 alert.",
            [
                target(
                    "A",
                    f"{sum_by('', rate(hist(EXEC_COST, 'sum')))} / {sum_by('', rate(hist(EXEC_COST, 'count')))}",
                    "mean",
                ),
                target("B", quantile(0.95, "", hist(EXEC_COST)), "p95"),
            ],
            "currencyUSD",
        ),
        timeseries(
            "LM cost by module (USD per minute)",
            "LM spend per minute by ROMA module (atomizer, planner, executor, aggregator, verifier, ...).",
            [target("A", f"{sum_by(MOD, rate(sel(LM_COST, mod)))} * 60", "{{module}}")],
            "currencyUSD",
        ),
        timeseries(
            "LM tokens by module (per minute)",
            "Tokens per minute by module and token type (input / output). Cache hits spend none.",
            [
                target(
                    "A",
                    f"{sum_by(f'{MOD}, {sc.L_TOKEN_TYPE}', rate(sel(LM_TOKENS, mod)))} * 60",
                    "{{module}} {{token_type}}",
                )
            ],
            "short",
        ),
        timeseries(
            "LM latency p50 / p95 by module",
            "LM call latency quantiles by module, from lm_latency_ms.",
            [
                target("A", quantile(0.5, MOD, sel(hist(LM_LATENCY), mod)), "p50 {{module}}"),
                target("B", quantile(0.95, MOD, sel(hist(LM_LATENCY), mod)), "p95 {{module}}"),
            ],
            "ms",
        ),
        timeseries(
            "LM calls per minute by module",
            "LM calls per minute by module, split by whether DSPy's cache answered (cache_hit).",
            [
                target(
                    "A",
                    f"{sum_by(f'{MOD}, {sc.L_CACHE_HIT}', rate(sel(LM_CALLS, mod)))} * 60",
                    "{{module}} cache_hit={{cache_hit}}",
                )
            ],
            "short",
        ),
        timeseries(
            "Execution duration p50 / p95",
            "Wall time of one execution, seconds (execution_duration_seconds). Runs slower than 300 s alert.",
            [
                target("A", quantile(0.5, "", hist(EXEC_SECONDS)), "p50"),
                target("B", quantile(0.95, "", hist(EXEC_SECONDS)), "p95"),
            ],
            "s",
        ),
        timeseries(
            "GenAI operation duration p95 by model",
            "p95 of the GenAI semantic-convention metric gen_ai.client.operation.duration, by requested model.",
            [target("A", quantile(0.95, "gen_ai_request_model", hist(GENAI_DURATION)), "{{gen_ai_request_model}}")],
            "s",
        ),
        timeseries(
            "GenAI tokens per call p95",
            "p95 tokens per LM call by token type, from the semconv metric gen_ai.client.token.usage.",
            [target("A", quantile(0.95, "gen_ai_token_type", hist(GENAI_TOKENS)), "{{gen_ai_token_type}}")],
            "short",
        ),
    ]
    return dashboard(
        "roma-otel-overview",
        "ROMA overview",
        "Executions, tasks, LM cost, tokens and latency recorded by roma-otel. Generated by scripts/gen_dashboards.py.",
        [query_variable("module", "Module", f"label_values({LM_CALLS}, {MOD})")],
        layout(stats, graphs),
    )


def tools_dashboard() -> dict[str, Any]:
    tk, tool = f'{TK}=~"$toolkit_class"', f'{TOOL}=~"$tool_name"'
    hits = sel(LIFECYCLE, f'{OP}="{HIT}"', tk)
    lookups = sel(LIFECYCLE, f'{OP}=~"{HIT}|{MISS}"', tk)
    stats = [
        stat("Tool calls", "Tool calls in the time range.", sum_by("", increase(sel(TOOL_CALLS, tk, tool))), "short"),
        stat(
            "Tool success rate",
            "Share of tool calls in the time range that returned. Below 95% alerts.",
            f"{sum_by('', increase(sel(TOOL_OK, tk, tool)))} / {sum_by('', increase(sel(TOOL_CALLS, tk, tool)))}",
            "percentunit",
            good_above=0.95,
        ),
        stat(
            "Tool errors",
            "Tool calls that raised, in the time range.",
            f"{sum_by('', increase(sel(TOOL_FAILED, tk, tool)))} or vector(0)",
            "short",
        ),
        stat(
            "Cache-hit rate",
            "cache_hit / (cache_hit + cache_miss) toolkit lifecycle events in the time range.",
            f"{sum_by('', increase(hits))} / {sum_by('', increase(lookups))}",
            "percentunit",
        ),
    ]
    graphs = [
        timeseries(
            "Tool calls per minute by toolkit and tool",
            "Calls per minute of every tool, by toolkit class and tool name.",
            [
                target(
                    "A",
                    f"{sum_by(f'{TK}, {TOOL}', rate(sel(TOOL_CALLS, tk, tool)))} * 60",
                    "{{toolkit_class}}.{{tool_name}}",
                )
            ],
            "short",
        ),
        timeseries(
            "Success rate by toolkit",
            "The seed's success-rate query: returned calls / all calls, by toolkit class. Below 95% alerts.",
            [
                target(
                    "A",
                    f"{sum_by(TK, rate(sel(TOOL_OK, tk, tool)))} / {sum_by(TK, rate(sel(TOOL_CALLS, tk, tool)))}",
                    "{{toolkit_class}}",
                )
            ],
            "percentunit",
            ratio=True,
        ),
        timeseries(
            "Success rate by tool",
            "Returned calls / all calls, by toolkit class and tool name.",
            [
                target(
                    "A",
                    f"{sum_by(f'{TK}, {TOOL}', rate(sel(TOOL_OK, tk, tool)))}"
                    f" / {sum_by(f'{TK}, {TOOL}', rate(sel(TOOL_CALLS, tk, tool)))}",
                    "{{toolkit_class}}.{{tool_name}}",
                )
            ],
            "percentunit",
            ratio=True,
        ),
        timeseries(
            "p95 tool duration by tool",
            "The seed's P95 latency query (tool_duration_ms), plus the median. A sharp p95 rise alerts.",
            [
                target("A", quantile(0.95, TOOL, sel(hist(TOOL_MS), tk, tool)), "p95 {{tool_name}}"),
                target("B", quantile(0.5, TOOL, sel(hist(TOOL_MS), tk, tool)), "p50 {{tool_name}}"),
            ],
            "ms",
        ),
        timeseries(
            "Errors per minute by error_type",
            "The seed's error-rate query: failed calls per minute by toolkit class and exception type.",
            [
                target(
                    "A",
                    f"{sum_by(f'{TK}, {ERR}', rate(sel(TOOL_FAILED, tk, tool)))} * 60",
                    "{{toolkit_class}} {{error_type}}",
                )
            ],
            "short",
        ),
        timeseries(
            "Error rate by tool",
            "Failed calls / all calls, by toolkit class and tool name (0 for a tool that never failed)."
            " A sudden spike alerts.",
            [
                target(
                    "A",
                    f"({sum_by(f'{TK}, {TOOL}', rate(sel(TOOL_FAILED, tk, tool)))}"
                    f" or 0 * {sum_by(f'{TK}, {TOOL}', rate(sel(TOOL_CALLS, tk, tool)))})"
                    f" / {sum_by(f'{TK}, {TOOL}', rate(sel(TOOL_CALLS, tk, tool)))}",
                    "{{toolkit_class}}.{{tool_name}}",
                )
            ],
            "percentunit",
            ratio=True,
        ),
        timeseries(
            "Mean tool duration by tool",
            "tool_duration_ms_sum / tool_duration_ms_count: the seed's average duration, by tool.",
            [
                target(
                    "A",
                    f"{sum_by(TOOL, rate(sel(hist(TOOL_MS, 'sum'), tk, tool)))}"
                    f" / {sum_by(TOOL, rate(sel(hist(TOOL_MS, 'count'), tk, tool)))}",
                    "{{tool_name}}",
                )
            ],
            "ms",
        ),
        timeseries(
            "Toolkit cache-hit rate",
            "cache_hit / (cache_hit + cache_miss) toolkit lifecycle events, by toolkit class. A drop alerts.",
            [target("A", f"{sum_by(TK, rate(hits))} / {sum_by(TK, rate(lookups))}", "{{toolkit_class}}")],
            "percentunit",
            ratio=True,
        ),
        timeseries(
            "Toolkit lifecycle events per minute",
            "create / cache_hit / cache_miss / cleanup events per minute, by toolkit class.",
            [target("A", f"{sum_by(f'{TK}, {OP}', rate(sel(LIFECYCLE, tk)))} * 60", "{{toolkit_class}} {{operation}}")],
            "short",
        ),
        timeseries(
            "Toolkit lifecycle duration p95 by operation",
            "p95 duration of toolkit lifecycle operations (toolkit_lifecycle_duration_ms), by operation.",
            [target("A", quantile(0.95, OP, sel(hist(LIFECYCLE_MS), tk)), "{{operation}}")],
            "ms",
        ),
    ]
    return dashboard(
        "roma-otel-tools",
        "ROMA tools",
        "Tool calls, success and error rates, latency and toolkit cache behaviour recorded by roma-otel."
        " Generated by scripts/gen_dashboards.py.",
        [
            query_variable("toolkit_class", "Toolkit", f"label_values({TOOL_CALLS}, {TK})"),
            query_variable("tool_name", "Tool", f'label_values({TOOL_CALLS}{{{TK}=~"$toolkit_class"}}, {TOOL})'),
        ],
        layout(stats, graphs),
    )


# --- Prometheus rules ------------------------------------------------------------------------------------
COST_LIMIT_USD = 5.0
DURATION_LIMIT_S = 300.0
TASK_FAILURE_LIMIT = 0.2
TOOL_SUCCESS_LIMIT = 0.95
LATENCY_RISE_FACTOR = 2
LATENCY_FLOOR_MS = 100
ERROR_SPIKE_FACTOR = 3
ERROR_SPIKE_FLOOR = 0.05
CACHE_DROP_FACTOR = 0.75

R_TOOL_CALLS = f"{TK}:{TOOL_CALLS.removesuffix('_total')}:rate5m"
R_TOOL_SUCCESS = f"{TK}:tool_success:ratio_rate5m"
R_TOOL_ERROR_5M = f"{TK}:tool_error:ratio_rate5m"
R_TOOL_ERROR_1H = f"{TK}:tool_error:ratio_rate1h"
R_TOOL_ERRORS_BY_TYPE = f"{TK}_{ERR}:{TOOL_FAILED.removesuffix('_total')}:rate5m"
R_TOOL_P95 = f"{TOOL}:{base_name(TOOL_MS)}:p95_5m"
R_CACHE_HIT_5M = f"{TK}:toolkit_cache_hit:ratio_rate5m"
R_CACHE_HIT_1H = f"{TK}:toolkit_cache_hit:ratio_rate1h"
R_TASK_FAILURE = "job:task_failure:ratio_rate5m"
R_RUNS_OVER_COST = "job:executions_cost_over_5usd:count"
R_RUNS_OVER_TIME = "job:executions_slower_than_300s:count"

DASH_TOOLS = "Grafana dashboard ROMA tools (/d/roma-otel-tools)"
DASH_OVERVIEW = "Grafana dashboard ROMA overview (/d/roma-otel-overview)"


def ratio(numerator: str, denominator: str, by: str, window: str) -> str:
    return f"{sum_by(by, rate(numerator, window))} / {sum_by(by, rate(denominator, window))}"


def over_limit_count(metric: tuple[str, str, str], bound: float, buckets: tuple[float, ...]) -> str:
    """Cumulative number of executions whose histogram value exceeded ``bound``: the +Inf bucket minus
    the bucket whose upper bound is ``bound``."""
    bucket = hist(metric)
    inf = sel(bucket, 'le="+Inf"')
    return f"{sum_by('job', inf)} - {sum_by('job', sel(bucket, le_matcher(bound, buckets)))}"


def new_runs_over_limit(record: str, window: str = "10m") -> str:
    """Runs counted in the last ``window``: the counter's increase, or, for a series younger than the window
    (a fresh process, whose first run rate() cannot see), its whole value."""
    return f"increase({record}[{window}]) > 0 or ({record} > 0 unless {record} offset {window})"


def recording_rules() -> list[dict[str, str]]:
    hits = sel(LIFECYCLE, f'{OP}="{HIT}"')
    lookups = sel(LIFECYCLE, f'{OP}=~"{HIT}|{MISS}"')
    return [
        {"record": R_TOOL_CALLS, "expr": sum_by(TK, rate(TOOL_CALLS, "5m"))},
        # The seed's three queries, recorded.
        {"record": R_TOOL_SUCCESS, "expr": ratio(TOOL_OK, TOOL_CALLS, TK, "5m")},
        {
            "record": R_TOOL_P95,
            # Only while the tool is called: an idle tool's NaN would poison the baseline average.
            "expr": f"{quantile(0.95, TOOL, hist(TOOL_MS), '5m')}"
            f" and {sum_by(TOOL, rate(hist(TOOL_MS, 'count'), '5m'))} > 0",
        },
        {"record": R_TOOL_ERRORS_BY_TYPE, "expr": sum_by(f"{TK}, {ERR}", rate(TOOL_FAILED, "5m"))},
        {"record": R_TOOL_ERROR_5M, "expr": ratio(TOOL_FAILED, TOOL_CALLS, TK, "5m")},
        {"record": R_TOOL_ERROR_1H, "expr": ratio(TOOL_FAILED, TOOL_CALLS, TK, "1h")},
        {"record": R_CACHE_HIT_5M, "expr": ratio(hits, lookups, TK, "5m")},
        {"record": R_CACHE_HIT_1H, "expr": ratio(hits, lookups, TK, "1h")},
        {"record": R_TASK_FAILURE, "expr": ratio(sel(TASKS, f'{STATUS}="{FAILED}"'), TASKS, "job", "5m")},
        {
            "record": R_RUNS_OVER_COST,
            "expr": over_limit_count(EXEC_COST, COST_LIMIT_USD, sc.EXECUTION_COST_USD_BUCKETS),
        },
        {
            "record": R_RUNS_OVER_TIME,
            "expr": over_limit_count(EXEC_SECONDS, DURATION_LIMIT_S, sc.EXECUTION_DURATION_SECONDS_BUCKETS),
        },
    ]


def alert(name: str, expr: str, duration: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }


def alerting_rules() -> list[dict[str, Any]]:
    return [
        alert(
            "RomaRunCostHigh",
            new_runs_over_limit(R_RUNS_OVER_COST),
            "0m",
            "warning",
            "A ROMA run in {{ $labels.job }} cost more than $5",
            "At least one execution in the last 10 minutes spent more than $5 on LM calls"
            ' (execution_cost_usd histogram). Look at the "LM cost by module (USD per minute)" panel of the '
            + DASH_OVERVIEW
            + " to see which module spent it, then at the roma.execution spans with roma.execution.total_cost > 5"
            " in the trace backend (MLflow) for the prompts and models involved.",
        ),
        alert(
            "RomaRunSlow",
            new_runs_over_limit(R_RUNS_OVER_TIME),
            "0m",
            "warning",
            "A ROMA run in {{ $labels.job }} took longer than 300 s",
            "At least one execution in the last 10 minutes ran longer than 300 seconds"
            ' (execution_duration_seconds histogram). Look at the "Execution duration p50 / p95" and'
            ' "LM latency p50 / p95 by module" panels of the '
            + DASH_OVERVIEW
            + " and at the slow roma.execution trace: which roma.task or execute_tool span"
            " took the time.",
        ),
        alert(
            "RomaTaskFailureRateHigh",
            f"{R_TASK_FAILURE} > {TASK_FAILURE_LIMIT}",
            "5m",
            "critical",
            "More than 20% of ROMA tasks are failing in {{ $labels.job }}",
            "{{ $value | humanizePercentage }} of task-tree nodes failed over the last 5 minutes (tasks_total)."
            ' Look at the "Success and failure rates" panel of the ' + DASH_OVERVIEW + " and at the roma.task"
            " spans with status ERROR: their exception and the module (planner, executor, ...) that raised it.",
        ),
        alert(
            "RomaToolSuccessRateLow",
            f"{R_TOOL_SUCCESS} < {TOOL_SUCCESS_LIMIT}",
            "5m",
            "warning",
            "{{ $labels.toolkit_class }} tool success rate below 95%",
            "Only {{ $value | humanizePercentage }} of {{ $labels.toolkit_class }} tool calls returned over the last"
            ' 5 minutes. Look at "Errors per minute by error_type" and "Success rate by tool" in the '
            + DASH_TOOLS
            + " to find the failing tool, then at its execute_tool spans (error.type, exception).",
        ),
        alert(
            "RomaToolLatencyP95Rising",
            f"{R_TOOL_P95} > {LATENCY_RISE_FACTOR} * avg_over_time({R_TOOL_P95}[1h] offset 5m)"
            f" and {R_TOOL_P95} > {LATENCY_FLOOR_MS}",
            "5m",
            "warning",
            "p95 latency of tool {{ $labels.tool_name }} more than doubled",
            "The 5-minute p95 of tool_duration_ms for {{ $labels.tool_name }} is {{ $value | humanize }} ms, more"
            ' than twice its average over the previous hour (and above 100 ms). Look at "p95 tool duration by tool"'
            " in the " + DASH_TOOLS + " and at the slowest execute_tool spans of that tool: input size,"
            " the remote service it calls.",
        ),
        alert(
            "RomaToolErrorRateSpike",
            f"{R_TOOL_ERROR_5M} > {ERROR_SPIKE_FLOOR} and {R_TOOL_ERROR_5M} > {ERROR_SPIKE_FACTOR} * {R_TOOL_ERROR_1H}",
            "2m",
            "critical",
            "Tool error rate of {{ $labels.toolkit_class }} spiked",
            "{{ $value | humanizePercentage }} of {{ $labels.toolkit_class }} tool calls failed over the last"
            ' 5 minutes, more than three times the rate of the last hour. Look at "Errors per minute by'
            ' error_type" in the ' + DASH_TOOLS + ": a new error_type usually names the cause (credentials,"
            " rate limits, a changed API).",
        ),
        alert(
            "RomaToolkitCacheHitRateDropping",
            f"{R_CACHE_HIT_5M} < {CACHE_DROP_FACTOR} * {R_CACHE_HIT_1H}",
            "10m",
            "warning",
            "Toolkit cache-hit rate of {{ $labels.toolkit_class }} dropped",
            "The {{ $labels.toolkit_class }} cache-hit rate is {{ $value | humanizePercentage }} over the last"
            ' 5 minutes, less than three quarters of its rate over the last hour. Look at "Toolkit lifecycle events'
            ' per minute" in the ' + DASH_TOOLS + ": more create / cache_miss events mean toolkits are being"
            " rebuilt (evicted cache, changed toolkit config, new executions not sharing the manager).",
        ),
    ]


def rules() -> dict[str, Any]:
    return {
        "groups": [
            {"name": "roma-otel.records", "rules": recording_rules()},
            {"name": "roma-otel.alerts", "rules": alerting_rules()},
        ]
    }


RULES_HEADER = """\
# roma-otel recording and alerting rules. GENERATED by scripts/gen_dashboards.py from roma_otel/semconv.py:
# edit the generator, not this file. Unit tests: promtool test rules prometheus/rules/roma-otel.rules.test.yml
#
# Recording rules follow level:metric:operations. The seed's three queries are recorded as
# toolkit_class:tool_success:ratio_rate5m, tool_name:tool_duration_ms:p95_5m and
# toolkit_class_error_type:tool_invocations_failed:rate5m.
# Bucket bounds are matched as "5.0" (roma-otel's exporter) or "5" (a Go exporter such as the collector's).
"""


def render() -> dict[Path, str]:
    """Every generated file, relative to the repository root, with its exact content."""
    rules_text = yaml.safe_dump(rules(), sort_keys=False, width=4096, allow_unicode=True, default_flow_style=False)
    return {
        OVERVIEW_PATH: json.dumps(overview_dashboard(), indent=2, ensure_ascii=False) + "\n",
        TOOLS_PATH: json.dumps(tools_dashboard(), indent=2, ensure_ascii=False) + "\n",
        RULES_PATH: RULES_HEADER + rules_text,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in render().items():
        path = ROOT / rel
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(rel)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    verb = "out of date" if args.check else "written"
    for rel in stale:
        print(f"{rel}: {verb}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
