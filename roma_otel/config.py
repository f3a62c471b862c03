"""roma-otel's one typed configuration object, loaded from YAML and the environment.

Precedence is defaults < YAML file < environment variables. Every value is validated when it is loaded
and again whenever it is assigned, so a bad setting fails at start-up with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

__all__ = [
    "CONFIG_PATH_ENV",
    "ENV_VARS",
    "ConfigError",
    "ContentCaptureConfig",
    "MLflowConfig",
    "ObservabilityConfig",
    "PostgresConfig",
    "PrometheusConfig",
    "RomaOtelConfig",
    "StorageConfig",
    "ToolkitMetricsConfig",
    "config_from_dict",
    "default_config",
    "load_config",
]

# Names the YAML file when load_config() is given no path.
CONFIG_PATH_ENV = "ROMA_OTEL_CONFIG"

# The single source of truth for environment overrides: env var -> dotted key. The README lists this table.
ENV_VARS: dict[str, str] = {
    "MLFLOW_ENABLED": "observability.mlflow.enabled",
    "MLFLOW_TRACKING_URI": "observability.mlflow.tracking_uri",
    "MLFLOW_EXPERIMENT": "observability.mlflow.experiment_name",
    "ROMA_OTEL_MLFLOW_FLUSH_TIMEOUT": "observability.mlflow.flush_timeout",
    "TOOLKIT_METRICS_ENABLED": "observability.toolkit_metrics.enabled",
    "TOOLKIT_TRACK_LIFECYCLE": "observability.toolkit_metrics.track_lifecycle",
    "TOOLKIT_TRACK_INVOCATIONS": "observability.toolkit_metrics.track_invocations",
    "TOOLKIT_SAMPLE_RATE": "observability.toolkit_metrics.sample_rate",
    "TOOLKIT_PERSIST_DB": "observability.toolkit_metrics.persist_to_db",
    "ROMA_OTEL_PROMETHEUS_ENABLED": "observability.prometheus.enabled",
    "ROMA_OTEL_PROMETHEUS_HOST": "observability.prometheus.host",
    "ROMA_OTEL_PROMETHEUS_PORT": "observability.prometheus.port",
    "DATABASE_URL": "storage.postgres.connection_url",
    "ROMA_OTEL_POSTGRES_WRITER_PROCESS": "storage.postgres.writer_process",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "observability.content_capture.enabled",
}


class ConfigError(ValueError):
    """An invalid setting; the message names the key or env var, the bad value and what is allowed."""


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_DOTTED_CLASS = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


@dataclass(frozen=True)
class _Spec:
    """How one leaf field is validated: its kind plus optional inclusive bounds or allowed values."""

    kind: str  # "bool" | "int" | "float" | "str" | "optstr" | "paths" | "choice"
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "bool":
            return "a boolean (true/false/1/0/yes/no/on/off)"
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None and self.hi is not None:
                return f"{noun} between {self.lo} and {self.hi}"
            return f"{noun} >= {self.lo}" if self.lo is not None else noun
        if self.kind == "optstr":
            return "a non-empty string or null"
        if self.kind == "paths":
            return "a list of dotted 'module.Class' paths"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices) + " (a quoted string)"
        return "a non-empty string"

    def coerce(self, value: Any, where: str, *, from_env: bool = False) -> Any:
        """Return ``value`` in its canonical type, or raise ConfigError naming ``where``."""
        bad = ConfigError(f"{where}: must be {self.describe()}, got {value!r}")
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            # YAML and env share one vocabulary of boolean strings so docs only need to list it once.
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise bad
        if self.kind in ("int", "float"):
            if from_env and isinstance(value, str):
                try:
                    value = int(value.strip()) if self.kind == "int" else float(value.strip())
                except ValueError:
                    raise bad from None
            # bool is an int subclass; `enabled: true` landing in a port is a mistake, not 1.
            ok_types = (int,) if self.kind == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_types):
                raise bad
            if self.kind == "float":
                value = float(value)
                if math.isnan(value):
                    raise bad
            if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
                raise bad
            return value
        if self.kind == "optstr" and value is None:
            return None
        if self.kind in ("str", "optstr"):
            if not isinstance(value, str) or not value:
                raise bad
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise bad
            return value
        if self.kind == "paths":
            if not isinstance(value, list | tuple):
                raise bad
            for i, item in enumerate(value):
                if not isinstance(item, str) or not _DOTTED_CLASS.match(item):
                    raise ConfigError(f"{where}[{i}]: must be a dotted 'module.Class' path, got {item!r}")
            return tuple(value)
        raise AssertionError(f"unknown spec kind {self.kind!r}")


def _leaf(default: Any, kind: str, lo: float | None = None, hi: float | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"spec": _Spec(kind, lo, hi, **kw)})


def _sub(f: dataclasses.Field[Any]) -> type[_Section] | None:
    """The section class a field holds, or None for a leaf; sections are fields whose factory is one."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and issubclass(factory, _Section) else None


class _Section:
    """Base for every config section: validates each assignment, including the ones __init__ makes."""

    _PATH: ClassVar[str] = ""

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls._PATH}.{name}" if cls._PATH else name

    @classmethod
    def _unknown(cls, name: object) -> ConfigError:
        known = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        return ConfigError(f"{cls._key(str(name))}: unknown key (known keys: {known})")

    def __setattr__(self, name: str, value: Any) -> None:
        f = self.__dataclass_fields__.get(name)  # type: ignore[attr-defined]
        if f is None:
            # Without this a typo such as `mlflow.enable = True` would silently do nothing.
            raise self._unknown(name)
        sub = _sub(f)
        if sub is not None:
            if not isinstance(value, sub):
                raise ConfigError(f"{self._key(name)}: must be a {sub.__name__}, got {value!r}")
        else:
            value = f.metadata["spec"].coerce(value, self._key(name))
            self._check_related(name, value)
        object.__setattr__(self, name, value)

    def _check_related(self, name: str, value: Any) -> None:
        """Hook for rules spanning several fields; checked before the assignment lands."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dicts (tuples become lists) that config_from_dict accepts back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass
class MLflowConfig(_Section):
    _PATH: ClassVar[str] = "observability.mlflow"
    enabled: bool = _leaf(False, "bool")
    tracking_uri: str | None = _leaf(None, "optstr")
    experiment_name: str = _leaf("ROMA-DSPy", "str")
    log_traces: bool = _leaf(True, "bool")
    log_compiles: bool = _leaf(True, "bool")
    log_evals: bool = _leaf(True, "bool")
    log_traces_from_compile: bool = _leaf(False, "bool")
    artifact_location: str | None = _leaf(None, "optstr")
    flush_timeout: float = _leaf(10.0, "float", 0.0, 3600.0)  # seconds an exit/uninstrument flush may take


@dataclass
class ToolkitMetricsConfig(_Section):
    _PATH: ClassVar[str] = "observability.toolkit_metrics"
    enabled: bool = _leaf(True, "bool")
    track_lifecycle: bool = _leaf(True, "bool")
    track_invocations: bool = _leaf(True, "bool")
    sample_rate: float = _leaf(1.0, "float", 0.0, 1.0)
    persist_to_db: bool = _leaf(True, "bool")
    persist_to_mlflow: bool = _leaf(False, "bool")
    batch_size: int = _leaf(100, "int", 1)
    async_persist: bool = _leaf(True, "bool")
    toolkit_base_classes: tuple[str, ...] = _leaf(("roma_dspy.tools.base.base.BaseToolkit",), "paths")


@dataclass
class PrometheusConfig(_Section):
    _PATH: ClassVar[str] = "observability.prometheus"
    enabled: bool = _leaf(False, "bool")
    host: str = _leaf("127.0.0.1", "str")
    port: int = _leaf(9464, "int", 0, 65535)  # 0 asks the OS for a free port (tests, parallel runs)


@dataclass
class ContentCaptureConfig(_Section):
    _PATH: ClassVar[str] = "observability.content_capture"
    enabled: bool = _leaf(False, "bool")  # off by default: prompts and outputs may hold personal data
    max_length: int = _leaf(4096, "int", 16)
    # Where captured LM content goes: span attributes, the GenAI inference event (a log record), or both.
    destination: str = _leaf("span", "choice", choices=("span", "event", "span_and_event"))

    @property
    def on_spans(self) -> bool:
        return self.enabled and self.destination != "event"

    @property
    def on_events(self) -> bool:
        return self.enabled and self.destination != "span"


@dataclass
class PostgresConfig(_Section):
    _PATH: ClassVar[str] = "storage.postgres"
    enabled: bool = _leaf(False, "bool")
    connection_url: str | None = _leaf(None, "optstr")
    pool_min_size: int = _leaf(1, "int", 0)
    pool_max_size: int = _leaf(10, "int", 0)
    # Translate and write rows in a child process (no GIL shared with the application) instead of on a
    # thread of the application's process. On by default: a thread writer needs the application's GIL for
    # every system call of every transaction, so it falls behind a busy application and costs it more CPU
    # per call (BENCHMARKS.md, the Postgres writer); it ingests a bulk load faster.
    writer_process: bool = _leaf(True, "bool")

    def _check_related(self, name: str, value: Any) -> None:
        # Read __dict__, not getattr: during __init__ getattr would see the class-level default of a bound
        # not yet assigned, and the later assignment does the check. On an existing object, raising both
        # bounds therefore means setting pool_max_size first.
        lo = value if name == "pool_min_size" else self.__dict__.get("pool_min_size")
        hi = value if name == "pool_max_size" else self.__dict__.get("pool_max_size")
        if lo is not None and hi is not None and hi < lo:
            raise ConfigError(
                f"{self._key(name)}: pool_max_size must be >= pool_min_size, "
                f"got pool_min_size={lo!r}, pool_max_size={hi!r}"
            )


@dataclass
class ObservabilityConfig(_Section):
    _PATH: ClassVar[str] = "observability"
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    toolkit_metrics: ToolkitMetricsConfig = field(default_factory=ToolkitMetricsConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    content_capture: ContentCaptureConfig = field(default_factory=ContentCaptureConfig)


@dataclass
class StorageConfig(_Section):
    _PATH: ClassVar[str] = "storage"
    postgres: PostgresConfig = field(default_factory=PostgresConfig)


@dataclass
class RomaOtelConfig(_Section):
    """The whole configuration. Unknown top-level keys are errors: give roma-otel its own file/section."""

    config_version: str = _leaf("1", "choice", choices=("1",))
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def default_config() -> RomaOtelConfig:
    return RomaOtelConfig()


def _build(cls: type[_Section], data: Any, path: str) -> _Section:
    # A YAML section with everything commented out (`mlflow:`) parses as None; treat it as empty.
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'top level'}: must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = fields.get(key) if isinstance(key, str) else None
        if f is None:
            raise cls._unknown(key)
        sub = _sub(f)
        kwargs[key] = _build(sub, value, cls._key(key)) if sub is not None else value
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], *, source: str = "<dict>") -> RomaOtelConfig:
    """Validate a nested mapping (e.g. parsed YAML) over the defaults; errors are prefixed with ``source``."""
    try:
        return _build(RomaOtelConfig, data, "")  # type: ignore[return-value]
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_yaml(path: Path, label: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: config file not found: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read config file {str(path)!r}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None


CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# The GenAI instrumentations' content modes (opentelemetry-util-genai's ContentCapturingMode, any case) ->
# (content_capture.enabled, content_capture.destination); a boolean keeps its older meaning (on: spans).
CAPTURE_MODES: dict[str, tuple[bool, str | None]] = {
    "NO_CONTENT": (False, None),
    "SPAN_ONLY": (True, "span"),
    "EVENT_ONLY": (True, "event"),
    "SPAN_AND_EVENT": (True, "span_and_event"),
}


def _apply_capture_env(cfg: RomaOtelConfig, raw: str) -> None:
    cc = cfg.observability.content_capture
    mode = CAPTURE_MODES.get(raw.strip().upper())
    if mode is not None:
        cc.enabled = mode[0]
        if mode[1] is not None:
            cc.destination = mode[1]
        return
    value = raw.strip().lower()
    if value not in _TRUE | _FALSE:
        raise ConfigError(
            f"{CAPTURE_ENV}: must be one of {', '.join(CAPTURE_MODES)} (any case) or a boolean "
            f"(true/false/1/0/yes/no/on/off), got {raw!r}"
        )
    cc.enabled = value in _TRUE


def _apply_env(cfg: RomaOtelConfig, environ: Mapping[str, str]) -> None:
    for name, dotted in ENV_VARS.items():
        raw = environ.get(name)
        if not raw:  # `export VAR=` is how people unset things in compose files and CI
            continue
        if name == CAPTURE_ENV:
            _apply_capture_env(cfg, raw)
            continue
        *parents, leaf = dotted.split(".")
        section: Any = cfg
        for part in parents:
            section = getattr(section, part)
        spec: _Spec = section.__dataclass_fields__[leaf].metadata["spec"]
        # Parse and range-check here so the error names the env var rather than the key.
        setattr(section, leaf, spec.coerce(raw, name, from_env=True))


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> RomaOtelConfig:
    """Load defaults < YAML file < environment. ``env`` defaults to ``os.environ``.

    With no ``path``, the file named by ``$ROMA_OTEL_CONFIG`` is used if set, else no file. A named file that
    does not exist is an error either way.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    label = "config path"
    if path is None and environ.get(CONFIG_PATH_ENV):
        path, label = environ[CONFIG_PATH_ENV], CONFIG_PATH_ENV
    if path is None:
        cfg = default_config()
    else:
        data = _read_yaml(Path(path), label)
        cfg = config_from_dict({} if data is None else data, source=os.fspath(path))
    _apply_env(cfg, environ)
    return cfg
