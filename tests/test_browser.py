"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python
package through executable_path; no browser download): ask, watch the answer stream in, mark it
bad with a correction, and find the record in the feedback file."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from playwright.sync_api import sync_playwright

from test_server import reference, running_server, user

CHROMIUM = os.environ.get("MEDLORA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTION = "What is anemia?"
CORRECTION = "Anemia means too few healthy red blood cells. See a doctor if you feel tired or short of breath."


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get update && apt-get install -y chromium "
                    f"(or set MEDLORA_CHROMIUM to its path)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page_server(gguf_path, tmp_path_factory):
    with running_server(gguf_path, tmp_path_factory.mktemp("browser"), "--max-new-tokens", "12") as s:
        yield s


def test_chat_page_streams_and_sends_feedback(browser, page_server, ours):
    want = reference(ours, user(QUESTION), 12)[1].text
    page = browser.new_page()
    page.set_default_timeout(120_000)
    try:
        page.goto(page_server.url + "/")
        notice = page.text_content("#notice").lower()
        assert "not a doctor" in notice and "emergency number" in notice

        # Record every length the answer text takes, to see it grow piece by piece.
        page.evaluate("""() => {
            window.lengths = [];
            new MutationObserver(() => {
                const t = document.querySelector('.turn.assistant .text');
                if (t && t.textContent && !window.lengths.includes(t.textContent.length)) window.lengths.push(t.textContent.length);
            }).observe(document.getElementById('chat'), {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("#question", QUESTION)
        page.click("#send")
        page.wait_for_selector(".turn.assistant .bad-answer", state="visible")  # shown once the answer is done
        assert page.text_content(".turn.user") == QUESTION
        assert page.text_content(".turn.assistant .text") == want
        assert len(page.evaluate("window.lengths")) >= 3  # streamed, not dropped in at the end

        page.click(".bad-answer")
        page.fill(".correction", CORRECTION)
        page.click(".submit-feedback")
        page.wait_for_function("document.querySelector('.feedback-status').textContent.includes('saved')")
        assert page.is_disabled(".submit-feedback")
    finally:
        page.close()

    records = [json.loads(line) for line in page_server.feedback.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1
    rec = records[0]
    assert rec["messages"] == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": CORRECTION}]
    assert rec["rating"] == "bad" and rec["correction"] == CORRECTION and rec["original_answer"] == want


def test_stop_leaves_no_made_up_turn_in_the_conversation(browser, page_server):
    """Stop mid-answer: the next request carries only what the model wrote. Stopped before any text,
    the question is dropped (no "(stopped)" assistant turn sent back to the model or to feedback);
    stopped after some, the partial answer is kept without the " …" the page shows."""
    page = browser.new_page()
    page.set_default_timeout(120_000)
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    try:
        page.goto(page_server.url + "/")
        page.fill("#question", "Tell me about the heart.")
        page.click("#send")
        page.click("#stop")  # prefill takes far longer than a click: almost always before any text
        page.wait_for_function("document.getElementById('stop').hidden")
        first = page.text_content(".turn.assistant .text")
        page.fill("#question", QUESTION)
        page.click("#send")
        page.wait_for_selector(".turn.assistant:last-child .bad-answer", state="visible")
    finally:
        page.close()
    messages = sent[-1]["messages"]
    if first == "(stopped)":
        assert messages == [{"role": "user", "content": QUESTION}]
    else:
        assert first.endswith(" …") and messages[1] == {"role": "assistant", "content": first[:-2]}
    assert not any(m["content"] in ("(stopped)",) or m["content"].endswith("…") for m in messages)
