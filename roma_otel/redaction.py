"""Turn captured prompts, tool inputs and outputs into span-safe strings: secrets masked, length capped.

Content is only captured when the user enables it (config ``observability.content_capture`` or
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``); this module is the single place that decides
what a captured value looks like, so no wrapper contains privacy logic.
"""

from __future__ import annotations

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
    return value


def truncate(text: str, max_length: int) -> str:
    if len(text) <= max_length:
        return text
    marker = f"...[truncated {len(text) - max_length} chars]"
    return text[: max(0, max_length - len(marker))] + marker


class Redactor:
    """Renders values for span attributes: redacted, JSON for structures, capped at ``max_length``."""

    __slots__ = ("max_length",)

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def render(self, value: Any) -> str:
        cleaned = redact(value)
        text = cleaned if isinstance(cleaned, str) else json.dumps(cleaned, default=str, ensure_ascii=False)
        return truncate(text, self.max_length)
