"""Content capture: off by default; when on, secrets are masked and long values truncated."""

from __future__ import annotations

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
    # the prompt (system + a 500-character question) is longer than the cap
    assert len(messages) == 1000 and messages.endswith("chars]")
    assert SECRET not in messages and MASK in messages
    assert "done" in lm_attrs[sc.GEN_AI_OUTPUT_MESSAGES]
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
