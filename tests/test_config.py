"""Tests for roma_otel.config: defaults < YAML < environment, and validation error messages."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from roma_otel.config import (
    CONFIG_PATH_ENV,
    ENV_VARS,
    ConfigError,
    PostgresConfig,
    RomaOtelConfig,
    config_from_dict,
    default_config,
    load_config,
)

SEED_YAML = """\
observability:
  mlflow:
    enabled: true
    tracking_uri: "http://127.0.0.1:5000"
    experiment_name: "ROMA-DSPy"
    log_traces: true
    log_compiles: true
    log_evals: true
    log_traces_from_compile: false
  toolkit_metrics:
    enabled: true
    track_lifecycle: true
    track_invocations: true
    sample_rate: 1.0
    persist_to_db: true
    persist_to_mlflow: false
    batch_size: 100
    async_persist: true
storage:
  postgres:
    enabled: true
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def resolve(cfg: RomaOtelConfig, dotted: str) -> object:
    obj: object = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --- defaults ------------------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config(env={})
    assert cfg == default_config()
    assert cfg.config_version == "1"
    mlflow = cfg.observability.mlflow
    assert (mlflow.enabled, mlflow.tracking_uri, mlflow.experiment_name) == (False, None, "ROMA-DSPy")
    assert (mlflow.log_traces, mlflow.log_compiles, mlflow.log_evals) == (True, True, True)
    assert mlflow.log_traces_from_compile is False and mlflow.artifact_location is None
    tm = cfg.observability.toolkit_metrics
    assert tm.enabled and tm.track_lifecycle and tm.track_invocations
    assert tm.persist_to_db and tm.async_persist
    assert tm.persist_to_mlflow is False
    assert tm.sample_rate == 1.0 and tm.batch_size == 100
    assert tm.toolkit_base_classes == ("roma_dspy.tools.base.base.BaseToolkit",)
    prom = cfg.observability.prometheus
    assert (prom.enabled, prom.host, prom.port) == (False, "127.0.0.1", 9464)
    cc = cfg.observability.content_capture
    assert (cc.enabled, cc.max_length) == (False, 4096)
    pg = cfg.storage.postgres
    assert (pg.enabled, pg.connection_url, pg.pool_min_size, pg.pool_max_size) == (False, None, 1, 10)


def test_default_instances_are_independent() -> None:
    a, b = default_config(), default_config()
    a.observability.mlflow.enabled = True
    assert b.observability.mlflow.enabled is False


# --- YAML ----------------------------------------------------------------------------------------------


def test_seed_yaml_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SEED_YAML), env={})
    assert cfg.observability.mlflow.enabled is True
    assert cfg.observability.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert cfg.observability.toolkit_metrics.batch_size == 100
    assert cfg.storage.postgres.enabled is True
    # Keys the seed leaves out keep their defaults.
    assert cfg.observability.prometheus.port == 9464


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        observability:
          toolkit_metrics:
            sample_rate: 0.5
            batch_size: 7
            toolkit_base_classes: [my.pkg.Toolkit, other.Base]
          prometheus:
            port: 0
          content_capture:
            enabled: yes
            max_length: 16
        storage:
          postgres:
            connection_url: postgresql://u@h/db
            pool_min_size: 20
            pool_max_size: 30
        """,
    )
    cfg = load_config(path, env={})
    tm = cfg.observability.toolkit_metrics
    assert tm.sample_rate == 0.5 and tm.batch_size == 7
    assert tm.toolkit_base_classes == ("my.pkg.Toolkit", "other.Base")
    assert cfg.observability.prometheus.port == 0
    assert cfg.observability.content_capture.enabled is True
    assert cfg.observability.content_capture.max_length == 16
    pg = cfg.storage.postgres
    assert (pg.connection_url, pg.pool_min_size, pg.pool_max_size) == ("postgresql://u@h/db", 20, 30)


def test_yaml_int_for_float_is_converted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "observability: {toolkit_metrics: {sample_rate: 0}}\n"), env={})
    rate = cfg.observability.toolkit_metrics.sample_rate
    assert rate == 0.0 and isinstance(rate, float)


def test_yaml_boolean_strings_accepted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'observability: {mlflow: {enabled: "ON", log_evals: "0"}}\n'), env={})
    assert cfg.observability.mlflow.enabled is True
    assert cfg.observability.mlflow.log_evals is False


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "", "empty.yaml"), env={}) == default_config()
    assert load_config(write(tmp_path, "observability:\nstorage:\n  postgres:\n"), env={}) == default_config()


# --- environment ---------------------------------------------------------------------------------------


def test_env_overrides_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, SEED_YAML)
    env = {
        "MLFLOW_ENABLED": "false",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_EXPERIMENT": "exp-2",
        "TOOLKIT_METRICS_ENABLED": "off",
        "TOOLKIT_TRACK_LIFECYCLE": "no",
        "TOOLKIT_TRACK_INVOCATIONS": "0",
        "TOOLKIT_SAMPLE_RATE": "0.25",
        "TOOLKIT_PERSIST_DB": "False",
        "ROMA_OTEL_PROMETHEUS_ENABLED": "1",
        "ROMA_OTEL_PROMETHEUS_HOST": "0.0.0.0",
        "ROMA_OTEL_PROMETHEUS_PORT": "9999",
        "DATABASE_URL": "postgresql://env/db",
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
    }
    cfg = load_config(path, env=env)
    assert cfg.observability.mlflow.enabled is False
    assert cfg.observability.mlflow.tracking_uri == "http://mlflow:5000"
    assert cfg.observability.mlflow.experiment_name == "exp-2"
    tm = cfg.observability.toolkit_metrics
    assert (tm.enabled, tm.track_lifecycle, tm.track_invocations, tm.persist_to_db) == (False,) * 4
    assert tm.sample_rate == 0.25
    prom = cfg.observability.prometheus
    assert (prom.enabled, prom.host, prom.port) == (True, "0.0.0.0", 9999)
    assert cfg.storage.postgres.connection_url == "postgresql://env/db"
    # DATABASE_URL sets the URL only; `enabled` still comes from the YAML.
    assert cfg.storage.postgres.enabled is True
    assert cfg.observability.content_capture.enabled is True


def test_every_env_var_is_applied() -> None:
    # Catches a table entry whose dotted key no longer resolves or is silently skipped.
    assert len(ENV_VARS) == 15
    samples = {"int": "1234", "float": "0.5"}
    for name, dotted in ENV_VARS.items():
        section_path, leaf = dotted.rsplit(".", 1)
        section = resolve(default_config(), section_path)
        spec = type(section).__dataclass_fields__[leaf].metadata["spec"]
        default = resolve(default_config(), dotted)
        # Booleans get the opposite of their default so the override is observable.
        raw = str(not default).lower() if spec.kind == "bool" else samples.get(spec.kind, "abc")
        cfg = load_config(env={name: raw})
        assert resolve(cfg, dotted) == spec.coerce(raw, name, from_env=True), name
        assert resolve(cfg, dotted) != resolve(default_config(), dotted), name


def test_empty_env_values_are_unset(tmp_path: Path) -> None:
    path = write(tmp_path, SEED_YAML)
    cfg = load_config(path, env={"MLFLOW_ENABLED": "", "TOOLKIT_SAMPLE_RATE": "", "DATABASE_URL": ""})
    assert cfg == load_config(path, env={})


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, SEED_YAML)
    cfg = load_config(env={CONFIG_PATH_ENV: str(path)})
    assert cfg.observability.mlflow.enabled is True


def test_explicit_path_beats_config_path_env(tmp_path: Path) -> None:
    seed = write(tmp_path, SEED_YAML)
    other = write(tmp_path, "observability: {mlflow: {experiment_name: other}}\n", "other.yaml")
    cfg = load_config(other, env={CONFIG_PATH_ENV: str(seed)})
    assert cfg.observability.mlflow.experiment_name == "other"
    assert cfg.observability.mlflow.enabled is False


@pytest.mark.parametrize(
    ("name", "raw", "allowed"),
    [
        ("TOOLKIT_TRACK_LIFECYCLE", "yes please", "must be a boolean (true/false/1/0/yes/no/on/off)"),
        ("TOOLKIT_SAMPLE_RATE", "1.5", "between 0.0 and 1.0"),
        ("TOOLKIT_SAMPLE_RATE", "half", "between 0.0 and 1.0"),
        ("TOOLKIT_SAMPLE_RATE", "nan", "between 0.0 and 1.0"),
        ("ROMA_OTEL_PROMETHEUS_PORT", "70000", "between 0 and 65535"),
        ("ROMA_OTEL_PROMETHEUS_PORT", "80.5", "integer"),
    ],
)
def test_env_errors_name_the_variable(name: str, raw: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={name: raw})
    msg = str(info.value)
    assert msg.startswith(f"{name}: ")
    assert repr(raw) in msg and allowed in msg


def test_env_error_message_exact() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"TOOLKIT_TRACK_LIFECYCLE": "yes please"})
    assert str(info.value) == (
        "TOOLKIT_TRACK_LIFECYCLE: must be a boolean (true/false/1/0/yes/no/on/off), got 'yes please'"
    )


# --- file errors ---------------------------------------------------------------------------------------


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing, env={})
    assert str(missing) in str(info.value)


def test_missing_file_from_config_path_env(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(env={CONFIG_PATH_ENV: str(missing)})
    assert CONFIG_PATH_ENV in str(info.value) and str(missing) in str(info.value)


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    path = write(tmp_path, "observability:\n  mlflow:\n    enabled: [true\n    other: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    msg = str(info.value)
    assert msg.startswith(f"{path}: malformed YAML at line ")
    line = int(msg.split("at line ", 1)[1].split(",", 1)[0])
    assert 3 <= line <= 5
    assert "column" in msg


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"top level: must be a mapping, got \['a', 'b'\]"):
        load_config(write(tmp_path, "- a\n- b\n"), env={})


# --- validation errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "bad", "allowed"),
    [
        (
            {"observability": {"toolkit_metrics": {"sample_rate": 1.5}}},
            "observability.toolkit_metrics.sample_rate",
            "1.5",
            "must be a number between 0.0 and 1.0",
        ),
        (
            {"observability": {"toolkit_metrics": {"batch_size": "100"}}},
            "observability.toolkit_metrics.batch_size",
            "'100'",
            "must be an integer >= 1",
        ),
        (
            {"observability": {"toolkit_metrics": {"batch_size": 0}}},
            "observability.toolkit_metrics.batch_size",
            "0",
            "must be an integer >= 1",
        ),
        (
            {"observability": {"toolkit_metrics": {"batch_size": 2.0}}},
            "observability.toolkit_metrics.batch_size",
            "2.0",
            "integer",
        ),
        (
            {"observability": {"prometheus": {"port": True}}},
            "observability.prometheus.port",
            "True",
            "integer between 0 and 65535",
        ),
        (
            {"observability": {"prometheus": {"port": 65536}}},
            "observability.prometheus.port",
            "65536",
            "integer between 0 and 65535",
        ),
        (
            {"observability": {"mlflow": {"enabled": 1}}},
            "observability.mlflow.enabled",
            "1",
            "must be a boolean",
        ),
        (
            {"observability": {"mlflow": {"enabled": "yes please"}}},
            "observability.mlflow.enabled",
            "'yes please'",
            "must be a boolean",
        ),
        (
            {"observability": {"mlflow": {"experiment_name": 5}}},
            "observability.mlflow.experiment_name",
            "5",
            "string",
        ),
        (
            {"observability": {"mlflow": {"tracking_uri": ["x"]}}},
            "observability.mlflow.tracking_uri",
            "['x']",
            "string or null",
        ),
        (
            {"observability": {"content_capture": {"max_length": 15}}},
            "observability.content_capture.max_length",
            "15",
            "integer >= 16",
        ),
        (
            {"observability": {"toolkit_metrics": {"sample_rate": False}}},
            "observability.toolkit_metrics.sample_rate",
            "False",
            "number",
        ),
        (
            {"observability": {"toolkit_metrics": {"toolkit_base_classes": "a.B"}}},
            "observability.toolkit_metrics.toolkit_base_classes",
            "'a.B'",
            "list of dotted",
        ),
        (
            {"observability": {"toolkit_metrics": {"toolkit_base_classes": ["a.B", "NoModule"]}}},
            "observability.toolkit_metrics.toolkit_base_classes[1]",
            "'NoModule'",
            "dotted 'module.Class'",
        ),
        (
            {"storage": {"postgres": {"pool_min_size": -1}}},
            "storage.postgres.pool_min_size",
            "-1",
            "integer >= 0",
        ),
        (
            {"storage": {"postgres": {"pool_min_size": 5, "pool_max_size": 2}}},
            "storage.postgres.pool_max_size",
            "pool_max_size=2",
            "pool_max_size must be >= pool_min_size",
        ),
        ({"config_version": 1}, "config_version", "1", "one of '1'"),
        ({"config_version": "2"}, "config_version", "'2'", "one of '1'"),
        ({"observability": {"mlflow": "on"}}, "observability.mlflow", "'on'", "must be a mapping"),
        ({"storage": [1, 2]}, "storage", "[1, 2]", "must be a mapping"),
    ],
)
def test_validation_errors(data: dict, key: str, bad: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source="cfg.yaml")
    msg = str(info.value)
    assert msg.startswith(f"cfg.yaml: {key}: "), msg
    assert allowed in msg and bad in msg, msg


def test_yaml_error_names_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "observability:\n  toolkit_metrics:\n    sample_rate: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}: observability.toolkit_metrics.sample_rate: must be a number between 0.0 and 1.0, got 1.5"
    )


@pytest.mark.parametrize(
    ("data", "key", "known"),
    [
        (
            {"observability": {"mlflow": {"experimnt_name": "x"}}},
            "observability.mlflow.experimnt_name",
            "enabled, tracking_uri, experiment_name",
        ),
        ({"observabilty": {}}, "observabilty", "config_version, observability, storage"),
        ({"storage": {"redis": {}}}, "storage.redis", "postgres"),
        ({"observability": {1: {}}}, "observability.1", "mlflow, toolkit_metrics"),
    ],
)
def test_unknown_keys(data: dict, key: str, known: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    msg = str(info.value)
    assert f"{key}: unknown key (known keys: " in msg and known in msg


def test_bad_yaml_value_reported_even_if_env_overrides_it(tmp_path: Path) -> None:
    # A bad YAML value is reported even when the env would override that same key.
    path = write(tmp_path, "observability: {toolkit_metrics: {sample_rate: 2}}\n")
    with pytest.raises(ConfigError, match=r"observability\.toolkit_metrics\.sample_rate"):
        load_config(path, env={"TOOLKIT_SAMPLE_RATE": "0.5"})


# --- assignment ----------------------------------------------------------------------------------------


def test_setattr_valid_assignment() -> None:
    cfg = default_config()
    cfg.observability.mlflow.enabled = True
    cfg.observability.toolkit_metrics.sample_rate = 0
    cfg.observability.toolkit_metrics.toolkit_base_classes = ["a.B"]  # type: ignore[assignment]
    assert cfg.observability.mlflow.enabled is True
    assert isinstance(cfg.observability.toolkit_metrics.sample_rate, float)
    assert cfg.observability.toolkit_metrics.toolkit_base_classes == ("a.B",)


@pytest.mark.parametrize(
    ("section", "name", "value", "key"),
    [
        ("observability.toolkit_metrics", "sample_rate", 1.5, "observability.toolkit_metrics.sample_rate"),
        ("observability.prometheus", "port", "9464", "observability.prometheus.port"),
        ("observability.mlflow", "enabled", "maybe", "observability.mlflow.enabled"),
        ("storage.postgres", "pool_min_size", 11, "storage.postgres.pool_min_size"),
        ("observability", "mlflow", {"enabled": True}, "observability.mlflow"),
    ],
)
def test_setattr_validation(section: str, name: str, value: object, key: str) -> None:
    cfg = default_config()
    target = resolve(cfg, section)
    before = dataclasses.asdict(cfg)  # type: ignore[call-overload]
    with pytest.raises(ConfigError) as info:
        setattr(target, name, value)
    assert str(info.value).startswith(f"{key}: ")
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    assert dataclasses.asdict(cfg) == before  # a rejected assignment leaves the object unchanged


def test_setattr_unknown_attribute_rejected() -> None:
    # A typo must not silently create a new attribute that nothing reads.
    mlflow = default_config().observability.mlflow
    with pytest.raises(
        ConfigError, match=r"observability\.mlflow\.enable: unknown key \(known keys: enabled, "
    ):
        mlflow.enable = True  # type: ignore[attr-defined]
    assert "enable" not in vars(mlflow)


def test_constructor_validates() -> None:
    with pytest.raises(ConfigError, match=r"storage\.postgres\.pool_max_size"):
        PostgresConfig(pool_min_size=5, pool_max_size=1)
    assert PostgresConfig(pool_min_size=20, pool_max_size=30).pool_max_size == 30


def test_replacing_a_whole_section_is_allowed() -> None:
    cfg = default_config()
    cfg.storage.postgres = PostgresConfig(enabled=True)
    assert cfg.storage.postgres.enabled is True


# --- to_dict -------------------------------------------------------------------------------------------


def test_to_dict_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, SEED_YAML), env={"TOOLKIT_SAMPLE_RATE": "0.3", "DATABASE_URL": "pg://x"}
    )
    cfg.observability.toolkit_metrics.toolkit_base_classes = ("a.B", "c.d.E")
    data = cfg.to_dict()
    assert data["observability"]["toolkit_metrics"]["toolkit_base_classes"] == ["a.B", "c.d.E"]
    assert data["storage"]["postgres"] == {
        "enabled": True,
        "connection_url": "pg://x",
        "pool_min_size": 1,
        "pool_max_size": 10,
        "writer_process": True,
    }
    assert config_from_dict(json.loads(json.dumps(data))) == cfg
