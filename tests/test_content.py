"""Content capture: off by default; when on, secrets are masked and long values truncated."""

from __future__ import annotations

import json

import dspy

from roma_otel import semconv as sc
from roma_otel import toolkit
from roma_otel.config import default_config, load_config
from roma_otel.redaction import MASK, Redactor, redact, truncate
from tests.conftest import answer_lm

SECRET = "sk-abcdefghijklmnopqrstuvwxyz123456"


@toolkit
class Vault:
    def lookup(self, name: str, api_key: str) -> dict:
        return {"name": name, "password": "hunter2", "note": "Authorization: Bearer abcdefghijklmnop"}


def run_program() -> None:
    with dspy.context(lm=answer_lm(answer="done")):
        dspy.Predict("question -> answer")(question=f"use key {SECRET} please " + "x" * 1500)
    Vault().lookup("db", api_key=SECRET)


def test_nothing_is_captured_by_default(tel) -> None:
    run_program()
    for span in tel.spans():
        for key in (sc.GEN_AI_INPUT_MESSAGES, sc.GEN_AI_OUTPUT_MESSAGES, sc.GEN_AI_TOOL_CALL_ARGUMENTS,
                    sc.GEN_AI_TOOL_CALL_RESULT):  # fmt: skip
            assert key not in span.attributes
        assert SECRET not in repr(dict(span.attributes))


def test_capture_masks_secrets_and_truncates(make_tel) -> None:
    config = default_config()
    config.observability.content_capture.enabled = True
    config.observability.content_capture.max_length = 1000
    tel = make_tel(config)
    run_program()
    lm_attrs = tel.span("chat gpt-4o-mini").attributes
    messages = lm_attrs[sc.GEN_AI_INPUT_MESSAGES]
    # the prompt (system + a 1500-character question) is longer than the cap: cut inside the contents,
    # so the value stays JSON, in the GenAI messages shape, with both messages kept
    assert len(messages) <= 1000
    parsed = json.loads(messages)
    assert [m["role"] for m in parsed] == ["system", "user"]
    user_text = parsed[1]["parts"][0]["content"]
    assert parsed[1]["parts"][0]["type"] == "text" and "truncated" in user_text and user_text.endswith("chars]")
    assert SECRET not in messages and MASK in messages
    outputs = json.loads(lm_attrs[sc.GEN_AI_OUTPUT_MESSAGES])
    assert outputs[0]["role"] == "assistant" and "done" in outputs[0]["parts"][0]["content"]
    tool_attrs = tel.span(f"{sc.SPAN_TOOL_PREFIX} lookup").attributes
    args = tool_attrs[sc.GEN_AI_TOOL_CALL_ARGUMENTS]
    assert '"db"' in args and SECRET not in args and MASK in args
    result = tool_attrs[sc.GEN_AI_TOOL_CALL_RESULT]
    assert "hunter2" not in result and "abcdefghijklmnop" not in result


def test_env_switch_enables_capture() -> None:
    assert load_config(env={}).observability.content_capture.enabled is False
    env = {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
    assert load_config(env=env).observability.content_capture.enabled is True


def test_redaction_rules() -> None:
    cleaned = redact({"Authorization": "Bearer abc", "nested": [{"client_secret": "x", "ok": "fine"}]})
    assert cleaned == {"Authorization": MASK, "nested": [{"client_secret": MASK, "ok": "fine"}]}
    assert redact("token=abcd1234 and AKIAABCDEFGHIJKLMNOP") == f"{MASK} and {MASK}"
    assert truncate("a" * 50, 50) == "a" * 50
    cut = truncate("a" * 100, 40)
    assert len(cut) == 40 and cut.endswith("[truncated 60 chars]")
    assert Redactor(100).render({"password": "p", "q": "v"}) == f'{{"password": "{MASK}", "q": "v"}}'


def test_truncation_keeps_every_value_json() -> None:
    from roma_otel.redaction import dumps_within

    messages = [{"role": "system", "parts": [{"type": "text", "content": "s" * 5000}]}] + [
        {"role": "user", "parts": [{"type": "text", "content": f"turn {i} " + "u" * 300}]} for i in range(40)
    ]
    for limit in (16, 64, 300, 1000, 4096):
        text = dumps_within(messages, limit)
        assert len(text) <= limit, limit
        json.loads(text)  # raises if the cut broke the JSON
    text = dumps_within(messages, 4096)
    parsed = json.loads(text)
    # too many turns for the limit: the first and the latest are kept, the middle is left out
    assert parsed[0]["role"] == "system" and parsed[-1]["parts"][0]["content"].startswith("turn 39")
    # a value under the limit is the plain JSON
    assert dumps_within({"a": "b"}, 100) == '{"a": "b"}'
    # a quote or a backslash inside a cut string cannot break it either
    assert json.loads(dumps_within(['"\\\\' * 400], 200))


def test_lm_messages_take_the_genai_shape() -> None:
    from roma_otel.messages import input_messages, output_messages

    given = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "http://x/i.png"}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ]  # fmt: skip
    assert input_messages(given) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "look"},
                                   {"type": "uri", "modality": "image", "uri": "http://x/i.png"}]},
        {"role": "assistant", "parts": [{"type": "tool_call", "name": "add", "id": "c1", "arguments": {"a": 1}}]},
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "c1", "response": "2"}]},
    ]  # fmt: skip
    assert input_messages("a prompt") == [{"role": "user", "parts": [{"type": "text", "content": "a prompt"}]}]
    assert output_messages(["hi", {"text": "ok", "reasoning_content": "because"}], ["stop"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "hi"}], "finish_reason": "stop"},
        {"role": "assistant",
         "parts": [{"type": "reasoning", "content": "because"}, {"type": "text", "content": "ok"}]},
    ]
