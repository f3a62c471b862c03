"""The Grafana dashboards, their provisioning and the OpenTelemetry Collector config, checked by parsing.

No Grafana or collector binary can be installed here; what a real Prometheus says about the panel queries is in
tests/test_prometheus_e2e.py. These tests hold the committed files to the generator and to the metric contract.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from roma_otel import semconv as sc
from scripts import gen_dashboards as gen

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_FILES = {"overview": ROOT / gen.OVERVIEW_PATH, "tools": ROOT / gen.TOOLS_PATH}
DATASOURCE_PROVISIONING = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVISIONING = ROOT / "grafana" / "provisioning" / "dashboards" / "roma.yaml"
COLLECTOR = ROOT / "collector-config.yaml"

# The panels the issue asks for, by dashboard.
REQUIRED_PANELS = {
    "overview": {
        "Executions per minute",
        "Success and failure rates",
        "LM cost by module (USD per minute)",
        "LM tokens by module (per minute)",
        "LM latency p50 / p95 by module",
        "Cost per execution",
    },
    "tools": {
        "Tool calls per minute by toolkit and tool",
        "Success rate by toolkit",
        "Success rate by tool",
        "p95 tool duration by tool",
        "Errors per minute by error_type",
        "Toolkit cache-hit rate",
    },
}
GRAFANA_VARIABLES = {"$__rate_interval", "$__range"}


def load(name: str) -> dict[str, Any]:
    return json.loads(DASHBOARD_FILES[name].read_text(encoding="utf-8"))


def targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.fixture(scope="module")
def provisioned_datasource() -> dict[str, Any]:
    data = yaml.safe_load(DATASOURCE_PROVISIONING.read_text(encoding="utf-8"))
    assert data["apiVersion"] == 1
    (datasource,) = data["datasources"]
    return datasource


# --- generated, and committed as generated -----------------------------------------------------------------
def test_committed_dashboards_equal_the_generator_output() -> None:
    rendered = gen.render()
    for path in DASHBOARD_FILES.values():
        rel = path.relative_to(ROOT)
        assert path.read_text(encoding="utf-8") == rendered[rel], f"{rel} is out of date: run scripts/gen_dashboards.py"
    assert gen.main(["--check"]) == 0


# --- data source: a template variable defaulting to the provisioned uid --------------------------------------
@pytest.mark.parametrize("name", sorted(DASHBOARD_FILES))
def test_panels_use_the_datasource_variable_that_defaults_to_the_provisioned_uid(
    name: str, provisioned_datasource: dict[str, Any]
) -> None:
    dashboard = load(name)
    text = DASHBOARD_FILES[name].read_text(encoding="utf-8")
    # Import-flow placeholders are not resolved by file provisioning (ANCHORS §7).
    assert "DS_PROMETHEUS" not in text and "__inputs" not in dashboard
    assert provisioned_datasource["type"] == "prometheus"
    variable = dashboard["templating"]["list"][0]
    assert variable["name"] == "datasource" and variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    assert variable["current"]["value"] == provisioned_datasource["uid"] == gen.DATASOURCE_UID
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    for variable in dashboard["templating"]["list"][1:]:
        assert variable["datasource"] == expected, variable["name"]


@pytest.mark.parametrize("name", sorted(DASHBOARD_FILES))
def test_dashboard_has_the_issues_panels_and_a_sane_layout(name: str) -> None:
    dashboard = load(name)
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert REQUIRED_PANELS[name] <= set(titles), REQUIRED_PANELS[name] - set(titles)
    assert len(titles) == len(set(titles))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["description"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert all(target["expr"] and target["refId"] for target in panel["targets"]), panel["title"]
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    assert dashboard["id"] is None  # provisioning assigns it


def test_dashboard_uids_and_titles_are_distinct() -> None:
    dashboards = [load(name) for name in DASHBOARD_FILES]
    assert len({d["uid"] for d in dashboards}) == len({d["title"] for d in dashboards}) == len(dashboards)


# --- queries: contract series only, variables all defined ---------------------------------------------------
@pytest.mark.parametrize("name", sorted(DASHBOARD_FILES))
def test_panel_queries_read_only_contract_series(name: str) -> None:
    dashboard = load(name)
    allowed = gen.contract_series()
    for title, target in targets(dashboard):
        used = gen.referenced_series(target["expr"])
        assert used, (title, target["expr"])
        assert used <= allowed, (title, used - allowed)


@pytest.mark.parametrize("name", sorted(DASHBOARD_FILES))
def test_every_variable_a_query_uses_is_defined(name: str) -> None:
    dashboard = load(name)
    defined = {f"${v['name']}" for v in dashboard["templating"]["list"]} | GRAFANA_VARIABLES
    queries = [target["expr"] for _, target in targets(dashboard)]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for expr in queries:
        used = set(re.findall(r"\$\w+", expr))
        assert used <= defined, (expr, used - defined)
    # Label filters are multi-value regexes whose "All" matches everything.
    for variable in dashboard["templating"]["list"][1:]:
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*"
        assert re.fullmatch(r"label_values\(\w+(\{[^}]*\})?, \w+\)", variable["definition"])


def test_the_seed_queries_are_panels_of_the_tools_dashboard() -> None:
    """With the filters set to All, the tools dashboard plots the seed's three queries (per minute for rates)."""
    exprs: dict[str, str] = {}
    for title, target in targets(load("tools")):
        exprs.setdefault(title, target["expr"])  # the first target of a panel

    def unfiltered(expr: str) -> str:
        expr = re.sub(r'\w+=~"\$\w+"(, )?', "", expr).replace("{}", "")
        return re.sub(r"\s+", " ", expr.replace("$__rate_interval", "5m")).strip()

    assert unfiltered(exprs["Success rate by toolkit"]) == (
        "sum by (toolkit_class) (rate(tool_invocations_success_total[5m]))"
        " / sum by (toolkit_class) (rate(tool_invocations_total[5m]))"
    )
    assert unfiltered(exprs["p95 tool duration by tool"]) == (
        "histogram_quantile(0.95, sum by (le, tool_name) (rate(tool_duration_ms_bucket[5m])))"
    )
    assert unfiltered(exprs["Errors per minute by error_type"]) == (
        "sum by (toolkit_class, error_type) (rate(tool_invocations_failed_total[5m])) * 60"
    )


def test_generator_names_match_the_metric_contract() -> None:
    """The generator derives every series name from a semconv instrument; each must be a contract series."""
    instruments = [value for name, value in vars(sc).items() if name.startswith("M_")]
    names = {gen.base_name(m) for m in instruments}
    assert "gen_ai_client_operation_duration_seconds" in names  # unit "s" appended, as the exporter does
    assert "gen_ai_client_token_usage" in names  # "{token}" adds nothing
    assert "tool_duration_ms" in names  # no unit, no suffix
    for series in sc.PROMETHEUS_SERIES:
        assert re.sub(r"_(total|bucket|sum|count)$", "", series) in names, series


# --- provisioning ------------------------------------------------------------------------------------------
def test_dashboard_provider_loads_the_dashboard_files() -> None:
    data = yaml.safe_load(DASHBOARD_PROVISIONING.read_text(encoding="utf-8"))
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert provider["folder"]
    assert (ROOT / "grafana" / "dashboards").is_dir()
    assert sorted(p.name for p in (ROOT / "grafana" / "dashboards").glob("*.json")) == [
        "roma-overview.json",
        "roma-tools.json",
    ]


def test_provisioned_datasource_is_prometheus_with_a_fixed_uid(provisioned_datasource: dict[str, Any]) -> None:
    assert provisioned_datasource["uid"] == "roma-prometheus"
    assert provisioned_datasource["url"].startswith("http")
    assert provisioned_datasource["access"] == "proxy"
    # $__rate_interval is at least four scrape intervals: tell Grafana the sample config's interval.
    prometheus = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    assert provisioned_datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


# --- the collector config ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return yaml.safe_load(COLLECTOR.read_text(encoding="utf-8"))


def test_collector_pipelines_reference_only_defined_components(collector: dict[str, Any]) -> None:
    pipelines = collector["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for name, pipeline in pipelines.items():
        for kind in used:
            ids = pipeline[kind]
            assert ids, (name, kind)
            assert len(ids) == len(set(ids)), (name, kind)
            missing = set(ids) - set(collector[kind])
            assert not missing, f"pipeline {name} uses undefined {kind}: {missing}"
            used[kind] |= set(ids)
        # memory_limiter first, so it refuses data before anything else holds it; batch after it.
        assert pipeline["processors"][0] == "memory_limiter", name
        assert "batch" in pipeline["processors"][1:], name
    for kind, ids in used.items():
        assert set(collector[kind]) == ids, f"{kind} defined but unused: {set(collector[kind]) - ids}"
    for component in (*collector["receivers"], *collector["processors"], *collector["exporters"]):
        assert re.fullmatch(r"[a-z_]+(/[\w-]+)?", component), component


def test_collector_receives_otlp_on_loopback_only(collector: dict[str, Any]) -> None:
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc", "http"}
    for protocol in protocols.values():
        host = protocol["endpoint"].rsplit(":", 1)[0]
        assert host in {"127.0.0.1", "localhost"}, protocol
    assert collector["exporters"]["prometheus"]["endpoint"].startswith("127.0.0.1:")


def test_collector_prometheus_exporter_keeps_the_contract_names(collector: dict[str, Any]) -> None:
    exporter = collector["exporters"]["prometheus"]
    assert "namespace" not in exporter  # a namespace prefixes every series
    # Suffixes must stay on: OTLP carries instrument names (tool_invocations) and the exporter's suffixing is
    # what turns a counter into tool_invocations_total; the contract metrics have no unit to append.
    assert exporter.get("add_metric_suffixes", True) is True
    assert exporter.get("translation_strategy", "UnderscoreEscapingWithSuffixes").endswith("WithSuffixes")
    assert exporter["resource_to_telemetry_conversion"]["enabled"] is False
    assert "const_labels" not in exporter


def collector_series_name(name: str, unit: str, counter: bool) -> str:
    """The collector's Prometheus name for an OTLP metric with suffixes on: normalizeName() of
    pkg/translator/prometheus/normalize_name.go (contrib), for the units roma-otel uses."""
    tokens = [t for t in re.split(r"[^a-zA-Z0-9]+", name) if t]
    main_unit = {"s": "seconds", "ms": "milliseconds", "1": ""}.get(unit, unit)
    if main_unit and "{" not in main_unit and main_unit not in tokens:
        tokens.append(main_unit)
    if counter:
        tokens = [t for t in tokens if t != "total"] + ["total"]
    return "_".join(tokens)


def test_collector_translation_of_the_instruments_gives_the_contract_series() -> None:
    counters = [
        sc.M_TOOL_INVOCATIONS, sc.M_TOOL_INVOCATIONS_SUCCESS, sc.M_TOOL_INVOCATIONS_FAILED, sc.M_LM_CALLS,
        sc.M_LM_TOKENS, sc.M_LM_COST_USD, sc.M_EXECUTIONS, sc.M_TASKS, sc.M_TOOLKIT_LIFECYCLE,
    ]  # fmt: skip
    histograms = [
        sc.M_TOOL_DURATION_MS, sc.M_LM_LATENCY_MS, sc.M_GENAI_TOKEN_USAGE, sc.M_GENAI_OPERATION_DURATION,
        sc.M_EXECUTION_DURATION_SECONDS, sc.M_EXECUTION_COST_USD, sc.M_TOOLKIT_LIFECYCLE_DURATION_MS,
    ]  # fmt: skip
    exported = {collector_series_name(n, u, True) for n, u, _ in counters}
    exported |= {f"{collector_series_name(n, u, False)}_bucket" for n, u, _ in histograms}
    exported |= {f"{collector_series_name(n, u, False)}_{part}" for n, u, _ in histograms for part in ("sum", "count")}
    assert set(sc.PROMETHEUS_SERIES) <= exported, set(sc.PROMETHEUS_SERIES) - exported
    # ...and the same as the generator's (roma-otel's own exporter's) names.
    assert {collector_series_name(n, u, True) for n, u, _ in counters} == {gen.total(m) for m in counters}


def test_collector_sends_traces_to_mlflow_with_the_experiment_header(collector: dict[str, Any]) -> None:
    exporter = collector["exporters"]["otlphttp/mlflow"]
    assert exporter["traces_endpoint"].endswith("/v1/traces")
    assert exporter["headers"]["x-mlflow-experiment-id"]
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlphttp/mlflow", "otlphttp/roma"]
    assert collector["service"]["pipelines"]["metrics"]["exporters"] == ["prometheus"]


def test_collector_sends_traces_to_roma_otel_serve_with_a_queue_and_retries(collector: dict[str, Any]) -> None:
    from roma_otel.api.app import TOKEN_ENV
    from roma_otel.api.otlp import TRACES_PATH
    from roma_otel.cli import build_parser

    exporter = collector["exporters"]["otlphttp/roma"]
    serve = build_parser().parse_args(["serve"])
    assert exporter["traces_endpoint"] == f"http://{serve.host}:{serve.port}{TRACES_PATH}"  # serve's defaults
    assert exporter["headers"]["Authorization"] == f"Bearer ${{env:{TOKEN_ENV}}}"
    assert exporter["encoding"] == "proto" and exporter["compression"] == "gzip"  # what the receiver decodes
    assert exporter["sending_queue"]["enabled"] and exporter["sending_queue"]["queue_size"] > 0
    retry = exporter["retry_on_failure"]
    assert retry["enabled"] and retry["max_elapsed_time"] == 0  # held until the database is back


def test_load_balancing_collector_keeps_each_trace_on_one_replica() -> None:
    """collector-loadbalancer.yaml, the fleet's first tier (README "A fleet of agents")."""
    config = yaml.safe_load((ROOT / "collector-loadbalancer.yaml").read_text(encoding="utf-8"))
    (pipeline,) = config["service"]["pipelines"].values()
    assert pipeline["processors"][0] == "memory_limiter"
    assert pipeline["exporters"] == ["loadbalancing"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) == set(config[kind]), kind
    balancer = config["exporters"]["loadbalancing"]
    assert balancer["routing_key"] == "traceID"  # every span of an execution to the same replica
    assert "otlp" in balancer["protocol"]  # the loadbalancing exporter speaks OTLP/gRPC only
    assert len(balancer["resolver"]["static"]["hostnames"]) >= 2


def test_collector_config_explains_each_part() -> None:
    text = COLLECTOR.read_text(encoding="utf-8")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for topic in ("memory_limiter", "namespace", "add_metric_suffixes", "x-mlflow", "scrape_configs", "Loopback"):
        assert topic.lower() in comments.lower() or topic in text, topic
    assert "honor_labels: true" in comments  # the sample scrape config
