"""Chat messages in the GenAI semantic conventions' shape, built from what DSPy hands an LM and gets back.

``gen_ai.input.messages`` / ``gen_ai.output.messages`` hold ``[{"role", "parts": [...]}]``: text parts,
tool calls, tool call responses and media URIs (the conventions' JSON schema at
``semconv.GENAI_SEMCONV_TAG``). MLflow's trace UI renders this shape as a chat, and any GenAI-semconv
backend reads it as is. Nothing here redacts or truncates: ``redaction`` does that to the structures these
functions return.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["agent_input_messages", "agent_output_messages", "input_messages", "output_messages",
           "split_system_instructions"]  # fmt: skip


def _text(content: Any) -> dict[str, Any]:
    return {"type": "text", "content": content if isinstance(content, str) else _as_text(content)}


def _as_text(value: Any) -> str:
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except Exception:
        return str(value)


def _arguments(raw: Any) -> Any:
    """Tool-call arguments as a structure when they are a JSON object string (as providers send them)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _tool_call_part(call: Any) -> dict[str, Any]:
    function = _get(call, "function")
    name = _get(function, "name") if function is not None else _get(call, "name")
    arguments = _get(function, "arguments") if function is not None else _get(call, "arguments")
    part: dict[str, Any] = {"type": "tool_call", "name": str(name) if name is not None else ""}
    call_id = _get(call, "id")
    if call_id is not None:
        part["id"] = str(call_id)
    part["arguments"] = _arguments(arguments)
    return part


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content (a string or a list of typed parts) as GenAI parts."""
    if content is None:
        return []
    if not isinstance(content, list):
        return [_text(content)]
    parts: list[dict[str, Any]] = []
    for item in content:
        kind = _get(item, "type")
        if kind == "text":
            parts.append(_text(_get(item, "text")))
        elif kind == "image_url":
            image = _get(item, "image_url")
            uri = _get(image, "url") if image is not None else None
            parts.append({"type": "uri", "modality": "image", "uri": str(uri)})
        else:
            parts.append(_text(item))
    return parts


def input_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages (or a text-completion prompt) an LM call was given, as GenAI input messages."""
    if messages is None:
        return []
    if isinstance(messages, str):
        return [{"role": "user", "parts": [_text(messages)]}]
    out: list[dict[str, Any]] = []
    for message in messages if isinstance(messages, list | tuple) else [messages]:
        role = _get(message, "role") or "user"
        if role == "tool":
            part: dict[str, Any] = {"type": "tool_call_response"}
            call_id = _get(message, "tool_call_id")
            if call_id is not None:
                part["id"] = str(call_id)
            part["response"] = _get(message, "content")
            out.append({"role": "tool", "parts": [part]})
            continue
        parts = _content_parts(_get(message, "content"))
        for call in _get(message, "tool_calls") or ():
            parts.append(_tool_call_part(call))
        out.append({"role": str(role), "parts": parts})
    return out


def output_messages(outputs: Any, finish_reasons: list[str] | None = None) -> list[dict[str, Any]]:
    """What a DSPy LM call returned (a list of completions: text, or a dict with ``text``, ``tool_calls``,
    ``reasoning_content``) as GenAI output messages, one per completion.

    ``finish_reasons``: the provider's, per completion. Where DSPy hands on none, a message has no
    ``finish_reason`` rather than a guessed one.
    """
    if outputs is None:
        return []
    out: list[dict[str, Any]] = []
    reasons = finish_reasons or []
    for i, completion in enumerate(outputs if isinstance(outputs, list | tuple) else [outputs]):
        parts: list[dict[str, Any]] = []
        if isinstance(completion, dict):
            reasoning = completion.get("reasoning_content")
            if reasoning:
                parts.append({"type": "reasoning", "content": str(reasoning)})
            text = completion.get("text")
            if text is not None:
                parts.append(_text(text))
            for call in completion.get("tool_calls") or ():
                parts.append(_tool_call_part(call))
        else:
            parts.append(_text(completion))
        message: dict[str, Any] = {"role": "assistant", "parts": parts}
        if i < len(reasons):
            message["finish_reason"] = reasons[i]
        out.append(message)
    return out


def split_system_instructions(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(``gen_ai.system_instructions`` parts, the other messages): the latest conventions keep the
    system prompt apart from the chat history."""
    system = [part for m in messages if m.get("role") == "system" for part in m["parts"]]
    return system, [m for m in messages if m.get("role") != "system"]


def agent_input_messages(inputs: Any) -> list[dict[str, Any]]:
    """A module's or an execution's inputs as the one user message an agent span carries."""
    return [{"role": "user", "parts": [_text(inputs)]}]


def agent_output_messages(outputs: Any) -> list[dict[str, Any]]:
    """A module's or an execution's result as the one assistant message an agent span carries."""
    return [{"role": "assistant", "parts": [_text(outputs)]}]
