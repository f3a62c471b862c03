"""What roma-otel could not instrument on the installed versions: one warning each, and a count.

A hook whose target has a shape roma-otel does not recognise is skipped, never raised into the
program: ``report(package, what, err)`` logs one warning naming the package, its installed version and
what is degraded, and ``roma_otel_instrumentation_errors_total{where="compat.<package>"}`` counts it
once the instruments exist.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from typing import Any

logger = logging.getLogger("roma_otel")

_LOCK = threading.Lock()
_REPORTED: dict[tuple[str, str], str] = {}  # (package, what) -> the reason, for degradations()
_UNCOUNTED: list[str] = []  # packages reported while no Telemetry was active, counted by take_uncounted()


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def report(package: str, what: str, err: BaseException | str) -> None:
    """Record that ``what`` is degraded because ``package`` has an unknown shape; never raises."""
    try:
        from roma_otel import telemetry


        reason = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
        with _LOCK:
            first = (package, what) not in _REPORTED
            _REPORTED[(package, what)] = reason
        if first:
            logger.warning(
                "roma-otel: %s %s has a shape roma-otel does not recognise (%s); degraded: %s",
                package, package_version(package), reason, what,
            )  # fmt: skip
        tel = telemetry.ACTIVE
        if tel is not None:
            tel.internal_errors.add(1, {"where": f"compat.{package}"})
        else:
            with _LOCK:
                _UNCOUNTED.append(package)
    except Exception:  # pragma: no cover - logging itself failed
        pass


def take_uncounted(tel: Any) -> None:
    """Count, on ``tel``, what was reported before any Telemetry was active (during ``instrument()``)."""
    with _LOCK:
        packages = list(_UNCOUNTED)
        _UNCOUNTED.clear()
    for package in packages:
        tel.internal_errors.add(1, {"where": f"compat.{package}"})


def degradations() -> dict[tuple[str, str], str]:
    """Everything reported so far in this process: (package, what) -> reason."""
    with _LOCK:
        return dict(_REPORTED)


def clear() -> None:
    with _LOCK:
        _REPORTED.clear()
        _UNCOUNTED.clear()
