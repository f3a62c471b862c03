"""Turn captured prompts, tool inputs and outputs into span-safe strings: secrets masked, length capped.

Content is only captured when the user enables it (config ``observability.content_capture`` or
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``); this module is the single place that decides
what a captured value looks like, so no wrapper contains privacy logic.

A structure (messages, tool arguments, module inputs) is rendered as JSON and capped by cutting the
strings *inside* it, never the JSON text, so every captured value a backend reads back still parses.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

MASK = "[REDACTED]"

# Keys whose values are secrets wherever they appear in a mapping.
_SECRET_KEY = re.compile(
    r"(api[_-]?key|apikey|authorization|auth[_-]?token|access[_-]?token|refresh[_-]?token|secret|password|passwd|"
    r"private[_-]?key|client[_-]?secret|x-api-key|cookie)",
    re.IGNORECASE,
)
# Secrets that show up inside free text.
_SECRET_TEXT = (
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]{8,}=*"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),  # OpenAI/Anthropic-style keys
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),  # GitHub tokens
    re.compile(
        r"(?i)\b(api[_-]?key|password|passwd|secret|token|authorization)\s*[:=]\s*['\"]?[^\s'\",;]{4,}"
    ),
)


def redact_text(text: str) -> str:
    for pattern in _SECRET_TEXT:
        text = pattern.sub(MASK, text)
    return text


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with secret-looking keys and strings masked."""
    if _depth > 20:
        return "..."
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v, _depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, _depth + 1) for v in value]
    if value is None or isinstance(value, int | float):
        return value
    # Any other object is rendered as what it holds, so its secrets are masked like a mapping's.
    as_dict = fields_of(value)
    if as_dict is not None:
        return redact(as_dict, _depth + 1)
    return redact_text(str(value))


def fields_of(value: Any) -> dict[str, Any] | None:
    """The fields of a mapping, a DSPy ``Prediction``/``Example``, a pydantic model or a dataclass, else None."""
    if isinstance(value, dict):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    for method in ("toDict", "model_dump"):
        fn = getattr(value, method, None)
        if callable(fn):
            try:
                out = fn()
            except Exception:
                return None
            return out if isinstance(out, dict) else None
    return None


def truncate(text: str, max_length: int) -> str:
    if len(text) <= max_length:
        return text
    marker = f"...[truncated {len(text) - max_length} chars]"
    return text[: max(0, max_length - len(marker))] + marker


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    """``value`` with every leaf JSON can hold as it is, and anything else as its ``str``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _longest(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return max((_longest(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max((_longest(v) for v in value), default=0)
    return 0


def _cap_strings(value: Any, cap: int) -> Any:
    if isinstance(value, str):
        return truncate(value, cap) if len(value) > cap else value
    if isinstance(value, dict):
        return {k: _cap_strings(v, cap) for k, v in value.items()}
    if isinstance(value, list):
        return [_cap_strings(v, cap) for v in value]
    return value


_MIN_CAP = 24  # shorter than a truncation marker: a string this short is dropped whole instead


def dumps_within(value: Any, max_length: int) -> str:
    """``value`` as JSON of at most ``max_length`` characters that still parses.

    Strings inside are cut (each keeps its head and says how much it lost) to the longest common cap
    that fits. When the structure alone is too long (hundreds of messages), whole items are left out of
    the middle of the outermost list, its first and last kept; as a last resort a JSON object saying
    what was cut is returned.
    """
    value = _jsonable(value)
    best = _fit_strings(value, max_length)
    if best is not None:
        return best
    if isinstance(value, list) and len(value) > 2:
        lo, hi, found = 1, len(value) - 2, None  # items kept from the end, besides the first
        while lo <= hi:
            keep = (lo + hi) // 2
            trimmed = [value[0], *value[-keep:]]
            fitted = _fit_strings(trimmed, max_length)
            if fitted is not None:
                found, lo = fitted, keep + 1
            else:
                hi = keep - 1
        if found is not None:
            return found
    fallback = _dumps({"truncated_chars": len(_dumps(value))})
    return fallback if len(fallback) <= max_length else "{}"


def _fit_strings(value: Any, max_length: int) -> str | None:
    """The JSON of ``value`` with its strings cut to the largest cap that fits, or None if none does."""
    text = _dumps(value)
    if len(text) <= max_length:
        return text
    lo, hi, found = _MIN_CAP, _longest(value) - 1, None
    while lo <= hi:
        cap = (lo + hi) // 2
        text = _dumps(_cap_strings(value, cap))
        if len(text) <= max_length:
            found, lo = text, cap + 1
        else:
            hi = cap - 1
    return found


class Redactor:
    """Renders values for span attributes: redacted, JSON for structures, capped at ``max_length``.

    A plain string stays plain text (cut at the end); anything else becomes JSON that parses
    (see :func:`dumps_within`).
    """

    __slots__ = ("max_length",)

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def render(self, value: Any) -> str:
        cleaned = redact(value)
        if isinstance(cleaned, str):
            return truncate(cleaned, self.max_length)
        return dumps_within(cleaned, self.max_length)

    def render_json(self, value: Any) -> str:
        """``value`` as JSON, also when it is a plain string (a backend that parses the value gets a str)."""
        return dumps_within(redact(value), self.max_length)
