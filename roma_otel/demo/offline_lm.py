"""An offline dspy.LM: no API key, no network, yet every call runs DSPy's and LiteLLM's real code path.

Only the provider round trip is replaced, by LiteLLM's own ``mock_response``; usage, cost and history
are computed by LiteLLM and DSPy exactly as for a real provider, so telemetry sees realistic figures.
"""

from __future__ import annotations

import os

# Must be set before litellm is first imported: otherwise it fetches its price map over the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import ast
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dspy

__all__ = [
    "ChatPrompt",
    "OfflineLM",
    "Responder",
    "count_tokens",
    "field_responder",
    "format_reply",
    "parse_chat_prompt",
    "parse_python_list",
    "placeholder_responder",
]

Responder = Callable[[list[dict[str, Any]]], str]

_MARKER_RE = re.compile(r"\[\[ ## (\w+) ## \]\]")
_FIELD_LINE_RE = re.compile(r"^\s*\d+\. `(\w+)` \((.+?)\):", re.MULTILINE)
# The closing instruction ChatAdapter appends after the last input field ("Respond with ...").
_RESPOND_RE = re.compile(r"\n+Respond with the corresponding output fields.*\Z", re.DOTALL)


@dataclass
class ChatPrompt:
    """What a DSPy adapter asked for, read back from the messages it rendered."""

    input_types: dict[str, str] = field(default_factory=dict)
    output_types: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    # Every [[ ## name ## ]] section of the last user message in order, including the ones nested
    # inside an input value (ReAct's trajectory is rendered as thought_0, tool_name_0, ...).
    sections: list[tuple[str, str]] = field(default_factory=list)
    system: str = ""
    chat_format: bool = True  # False when the adapter wants JSON (JSONAdapter) rather than markers


def parse_chat_prompt(messages: list[dict[str, Any]]) -> ChatPrompt:
    """Parse the field names, types and input values out of ChatAdapter/JSONAdapter messages."""
    system = next((_text(m) for m in messages if m.get("role") in ("system", "developer")), "")
    user = next((_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    head, _, tail = system.partition("Your output fields are:")
    prompt = ChatPrompt(system=system, chat_format="[[ ## completed ## ]]" in system)
    prompt.input_types = dict(_FIELD_LINE_RE.findall(head))
    prompt.output_types = dict(_FIELD_LINE_RE.findall(tail.split("All interactions will be structured")[0]))

    parts = _MARKER_RE.split(_RESPOND_RE.sub("", user))
    current: str | None = None
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        prompt.sections.append((name, body.strip()))
        if name in prompt.input_types:
            current = name
            prompt.inputs[name] = body
        elif current is not None:  # a nested section belongs to the input value that contains it
            prompt.inputs[current] += f"[[ ## {name} ## ]]{body}"
    prompt.inputs = {k: v.strip() for k, v in prompt.inputs.items()}
    if not prompt.chat_format and not prompt.inputs:
        prompt.inputs = {"prompt": user}
    return prompt


def format_reply(values: dict[str, Any], prompt: ChatPrompt) -> str:
    """Render output values the way the adapter that built `prompt` parses them."""
    if not prompt.chat_format:
        return json.dumps(values, ensure_ascii=False)
    chunks = [f"[[ ## {name} ## ]]\n{_render(value)}" for name, value in values.items()]
    return "\n\n".join([*chunks, "[[ ## completed ## ]]"])


def field_responder(fn: Callable[[ChatPrompt], dict[str, Any]]) -> Responder:
    """Lift a function from a parsed prompt to output values into a messages -> reply-text responder."""

    def respond(messages: list[dict[str, Any]]) -> str:
        prompt = parse_chat_prompt(messages)
        values = fn(prompt)
        if not prompt.output_types:  # a plain lm("...") call, not a DSPy signature
            return _render(values.get("text", "offline reply"))
        # Fields the function left out still get a well-typed value, so the adapter can parse the reply.
        filled = {
            name: values.get(name, _placeholder(name, kind)) for name, kind in prompt.output_types.items()
        }
        return format_reply(filled, prompt)

    return respond


def _placeholder_values(prompt: ChatPrompt) -> dict[str, Any]:
    return {name: _placeholder(name, kind) for name, kind in prompt.output_types.items()}


placeholder_responder: Responder = field_responder(_placeholder_values)
placeholder_responder.__doc__ = "Answer any signature with a well-typed placeholder for each output field."


def parse_python_list(text: str) -> list[Any]:
    """Read back a list input as DSPy renders it: JSON, or numbered «...» items holding Python reprs."""
    text = text.strip()
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except ValueError:
        pass
    items = re.findall(r"^\[\d+\] «(.*?)»$", text, flags=re.MULTILINE | re.DOTALL)
    if not items:
        return [text]
    out: list[Any] = []
    for item in items:
        try:
            out.append(ast.literal_eval(item))
        except (ValueError, SyntaxError):
            out.append(item)
    return out


def count_tokens(model: str, *, messages: list[dict[str, Any]] | None = None, text: str | None = None) -> int:
    """Token count the way the provider would bill it; falls back to an estimate if no tokenizer is local."""
    try:
        import litellm

        if messages is not None:
            return int(litellm.token_counter(model=model, messages=messages))
        return int(litellm.token_counter(model=model, text=text or ""))
    except Exception:
        words = (
            sum(len(_text(m).split()) for m in messages)
            if messages is not None
            else len((text or "").split())
        )
        return max(1, round(words * 1.3))


class OfflineLM(dspy.LM):
    """A dspy.LM whose replies come from `responder(messages)` through LiteLLM's ``mock_response``.

    Construct it like a real LM: ``OfflineLM(model="openai/gpt-4o-mini", responder=...)``. The model
    name selects LiteLLM's price-table entry, so ``history[-1]["cost"]`` is what that model would cost.
    """

    def __init__(
        self,
        model: str = "openai/gpt-4o-mini",
        responder: Responder | None = None,
        *,
        cache: bool = False,
        engine: Any = "litellm",
        **kwargs: Any,
    ) -> None:
        # engine="litellm": DSPy 3.4's default "auto" engine prefers its native lm15 client, which
        # never sees mock_response (today it only falls back to LiteLLM because lm15 refuses the
        # unknown key). Pinning LiteLLM is the supported, explicit route.
        super().__init__(model=model, cache=cache, engine=engine, **kwargs)
        self.responder: Responder = responder or placeholder_responder

    def __call__(
        self, prompt: Any = None, *, messages: list[dict[str, Any]] | None = None, **kwargs: Any
    ) -> Any:
        kwargs = self._with_mock_response(prompt, messages, kwargs)
        # `messages` is passed on as the same object: DSPy only silences its deprecation warning for
        # the exact list an adapter rendered.
        return super().__call__(prompt, messages=messages, **kwargs)

    async def acall(
        self, prompt: Any = None, *, messages: list[dict[str, Any]] | None = None, **kwargs: Any
    ) -> Any:
        kwargs = self._with_mock_response(prompt, messages, kwargs)
        return await super().acall(prompt, messages=messages, **kwargs)

    def _with_mock_response(
        self, prompt: Any, messages: list[dict[str, Any]] | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if "mock_response" in kwargs:  # the caller chose the reply themselves
            return kwargs
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(
                "OfflineLM answers prompt/messages calls; an explicit dspy.lm15.Request cannot carry "
                "LiteLLM's mock_response"
            )
        rendered = messages if messages is not None else [{"role": "user", "content": prompt or ""}]
        reply = self.responder(rendered)
        n = kwargs.get("n", self.kwargs.get("n")) or 1
        return {**kwargs, "mock_response": self._response_body(rendered, reply, n)}

    def _response_body(self, messages: list[dict[str, Any]], reply: str, n: int) -> dict[str, Any]:
        # A dict mock_response becomes ModelResponse(**body) in litellm's mock_completion, so the usage
        # here is what DSPy records and what LiteLLM prices, exactly as a provider's reply would be.
        prompt_tokens = count_tokens(self.model, messages=messages)
        completion_tokens = count_tokens(self.model, text=reply) * n
        return {
            "id": f"chatcmpl-offline-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model.split("/", 1)[-1],  # providers answer with their own name, no prefix
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # multi-part content: keep the text parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _placeholder(name: str, kind: str) -> Any:
    kind = kind.strip()
    if kind == "bool":
        return True
    if kind in ("int", "float"):
        return 0
    if kind.startswith(("list", "tuple", "set")):
        return []
    if kind.startswith("dict"):
        return {}
    if kind.startswith("Literal["):
        try:
            return ast.literal_eval(kind[len("Literal") :])[0]
        except (ValueError, SyntaxError, IndexError, TypeError):
            return ""
    return f"(offline {name})"
