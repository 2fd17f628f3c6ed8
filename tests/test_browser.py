"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python
package through executable_path; no browser download): ask, watch the answer stream in, mark it
bad with a correction, and find the record in the feedback file. The tests after the first two play
the chat endpoint themselves (FAKE_CHAT, or Playwright's route), to time a stream exactly or to
answer what the real server does not (a 401, a cut connection); feedback still goes to the server."""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager

import pytest
from playwright.sync_api import sync_playwright

from test_server import reference, running_server, user

CHROMIUM = os.environ.get("MEDLORA_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTION = "What is anemia?"
CUT_OFF = " … (cut off at the length limit)"
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
    ref = reference(ours, user(QUESTION), 12)[1]
    want = ref.text
    assert ref.finish_reason == "length"  # 12 tokens: the page must show that the answer was cut off
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
        # The mark is shown only; the feedback record below holds what the model wrote.
        assert page.text_content(".turn.assistant .text") == want + CUT_OFF
        assert len(page.evaluate("window.lengths")) >= 3  # streamed, not dropped in at the end

        page.click(".bad-answer")
        page.fill(".correction", CORRECTION)
        page.click(".submit-feedback")
        page.wait_for_function("document.querySelector('.feedback-status').textContent.includes('saved')")
        assert page.is_disabled(".submit-feedback")
    finally:
        page.close()

    records = [r for r in feedback_records(page_server) if r["correction"] == CORRECTION]
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


# ---------------------------------------------------------------------------------------------
# The chat endpoint played by the test
# ---------------------------------------------------------------------------------------------
# In the page, before app.js: fetch of /v1/chat/completions answers 200 at once with a stream the test
# feeds (window.streams[i].send(text), .close()); aborting the request errors it with an AbortError, as
# the browser's own fetch does. Every other request (feedback) goes to the real server.
FAKE_CHAT = """(() => {
  window.streams = [];
  const realFetch = window.fetch, encoder = new TextEncoder();
  window.fetch = (url, init) => {
    if (!String(url).endsWith('/v1/chat/completions')) return realFetch(url, init);
    let feed;
    const body = new ReadableStream({ start(c) { feed = c; } });
    window.streams.push({ request: JSON.parse(init.body), send: (t) => feed.enqueue(encoder.encode(t)),
                          close: () => feed.close() });
    init.signal.addEventListener('abort', () => {
      try { feed.error(new DOMException('The user aborted a request.', 'AbortError')); } catch {}
    });
    return Promise.resolve(new Response(body, { status: 200, headers: { 'Content-Type': 'text/event-stream' } }));
  };
})();"""
DONE = "data: [DONE]\\n\\n"


def sse(content: str | None = None, finish: str | None = None, role: bool = False) -> str:
    """One chat.completion.chunk event, in the server's shape."""
    delta = {"role": "assistant", "content": ""} if role else {"content": content} if content else {}
    body = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "medlora",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def answer(*pieces: str, finish: str = "stop") -> str:
    """A whole answer's event stream, as the server sends it."""
    return sse(role=True) + "".join(sse(p) for p in pieces) + sse(finish=finish) + DONE


def feed(page, i: int, text: str, close: bool = False) -> None:
    page.wait_for_function("n => window.streams.length > n", arg=i)
    page.evaluate("([i, t, close]) => { window.streams[i].send(t); if (close) window.streams[i].close(); }",
                  [i, text, close])


def error_body(message: str, code: str, type: str = "invalid_request_error") -> str:
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})


def feedback_records(server) -> list[dict]:
    if not server.feedback.exists():
        return []
    return [json.loads(line) for line in server.feedback.read_text(encoding="utf-8").splitlines()]


def focused(page) -> str:
    return page.evaluate("(document.activeElement.id || document.activeElement.className || "
                         "document.activeElement.tagName.toLowerCase())")


@contextmanager
def chat_page(browser, server, fake_chat: bool = False, **options):
    page = browser.new_page(**options)
    page.set_default_timeout(20_000)  # nothing here waits on the model: fail fast
    if fake_chat:
        page.add_init_script(FAKE_CHAT)
    try:
        page.goto(server.url + "/")
        yield page
    finally:
        page.close()


def test_new_chat_mid_answer_drops_the_old_answer(browser, page_server):
    """New chat while an answer streams: the unfinished answer goes nowhere: not into the next request,
    not onto the page, not into the feedback log (the training data)."""
    partial, fresh = "The heart is a mus", "Anemia is a shortage of red blood cells."
    with chat_page(browser, page_server, fake_chat=True) as page:
        page.fill("#question", "Tell me about the heart.")
        page.click("#send")
        feed(page, 0, sse(role=True) + sse(partial))
        page.wait_for_function("t => document.querySelector('.turn.assistant .text').textContent === t", arg=partial)
        page.click("#reset")
        page.evaluate("new Promise((done) => setTimeout(done, 100))")  # let the aborted answer wind up
        left = page.evaluate("[...document.querySelectorAll('.turn, [role=status]')].map((e) => e.textContent).join('')")
        page.fill("#question", QUESTION)
        page.click("#send")
        feed(page, 1, answer(fresh), close=True)
        page.wait_for_selector(".turn.assistant .good-answer", state="visible")
        page.click(".good-answer")
        page.wait_for_function("document.querySelector('.feedback-status').textContent.includes('saved')")
        assert page.evaluate("window.streams[1].request.messages") == [{"role": "user", "content": QUESTION}]
        assert page.locator(".turn").all_text_contents() == [QUESTION, page.text_content(".turn.assistant")]
        assert page.text_content(".turn.assistant .text") == fresh
        assert page.is_enabled("#send") and page.is_hidden("#stop")
        assert left == ""  # nothing of the old answer, not even "Stopped" read out, after New chat
    records = feedback_records(page_server)
    assert [r["messages"] for r in records if r["original_answer"] == fresh] == [
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": fresh}]]
    assert not any(partial in json.dumps(r) for r in records)


def test_cut_off_and_broken_answers_are_marked(browser, page_server):
    """finish_reason "length" shows a mark (not sent back to the model); a stream that ends with neither
    a finish_reason nor [DONE] is an error, not an answer."""
    bodies = [answer("Anemia is a lack of", finish="length"),
              sse(role=True) + sse("Iron helps")]  # the connection closes mid-answer
    sent = []

    def chat(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, content_type="text/event-stream", body=bodies[len(sent) - 1])

    with chat_page(browser, page_server) as page:
        page.route("**/v1/chat/completions", chat)
        page.fill("#question", QUESTION)
        page.click("#send")
        page.wait_for_selector(".turn.assistant .bad-answer", state="visible")
        assert page.text_content(".turn.assistant .text") == "Anemia is a lack of" + CUT_OFF
        page.fill("#question", "Does iron help?")
        page.click("#send")
        page.wait_for_function("document.getElementById('send').disabled === false && "
                               "document.querySelectorAll('.turn.assistant').length === 2")
        last = page.locator(".turn.assistant").last
        assert "connection closed before the answer finished" in last.locator(".text").text_content()
        assert last.locator(".text.error").count() == 1 and last.locator(".feedback").is_hidden()
        assert page.input_value("#question") == "Does iron help?"
    assert sent[1]["messages"] == [{"role": "user", "content": QUESTION},
                                   {"role": "assistant", "content": "Anemia is a lack of"},
                                   {"role": "user", "content": "Does iron help?"}]


def test_failed_request_keeps_the_question(browser, page_server):
    """The server's own 400 for a too-long prompt, and a 429: the question is back in the box, and the
    context-length error says what to do."""
    long = "Please explain " + "anemia " * 2500  # over --max-prompt-tokens (2048)
    with chat_page(browser, page_server) as page:
        page.fill("#question", long)
        page.click("#send")
        page.wait_for_selector(".turn.assistant .text.error")
        error = page.text_content(".turn.assistant .text.error")
        assert "2048" in error and "start a New chat" in error
        assert page.input_value("#question") == long.strip()

        page.route("**/v1/chat/completions", lambda route: route.fulfill(status=429, content_type="application/json", body=error_body(
            "the server is busy (64 requests waiting or running); retry later", "rate_limit_exceeded", "requests")))
        page.fill("#question", QUESTION)
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.text.error').length === 2")
        assert "busy" in page.locator(".text.error").last.text_content()
        assert page.input_value("#question") == QUESTION
        assert focused(page) == "question"


def test_api_key_box(browser, page_server):
    """A 401: the key box opens with its input focused and a message for people, not for developers; the
    question stays; Enter in the box saves the key and goes back to the question; the next request sends it."""
    auth = []

    def chat(route):
        auth.append(route.request.headers.get("authorization"))
        if auth[-1]:
            route.fulfill(status=200, content_type="text/event-stream", body=answer("Anemia is a shortage."))
        else:  # what the server says to a request without a key
            route.fulfill(status=401, content_type="application/json", headers={"WWW-Authenticate": "Bearer"},
                          body=error_body("missing API key: send 'Authorization: Bearer KEY'", "invalid_api_key"))

    with chat_page(browser, page_server) as page:
        page.route("**/v1/chat/completions", chat)
        page.fill("#question", QUESTION)
        page.press("#question", "Enter")
        page.wait_for_selector("#api-key", state="visible")
        assert focused(page) == "api-key"
        shown = page.text_content(".turn.assistant .text") + page.text_content("#key-box")
        assert "API key" in shown and "Authorization" not in shown and "Bearer" not in shown
        assert page.input_value("#question") == QUESTION
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Enter")
        assert page.is_hidden("#key-box") and focused(page) == "question"
        page.press("#question", "Enter")
        page.wait_for_selector(".turn.assistant:last-child .good-answer", state="visible")
    assert auth == [None, "Bearer sesame"]


def contrast(rgb: str) -> float:
    """WCAG contrast ratio of a CSS rgb() colour against white."""
    def linear(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (int(v) for v in re.findall(r"\d+", rgb)[:3])
    lum = 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)
    return 1.05 / (lum + 0.05)


def test_screen_reader_and_keyboard(browser, page_server):
    """No live region re-reading the growing answer: it is aria-busy while it streams and announced once
    through a status region; focus never falls to <body> (Send, Stop, feedback); the correction box has a
    label; each answer's buttons have their own names; input edges have 3:1 contrast."""
    announced = "[role=status]:not(.feedback-status)"
    with chat_page(browser, page_server, fake_chat=True) as page:
        assert page.get_attribute("#chat", "aria-live") is None
        assert contrast(page.eval_on_selector("#question", "e => getComputedStyle(e).borderTopColor")) >= 3

        page.fill("#question", "What is iron?")
        page.click("#send")
        assert focused(page) == "question"  # Send disabled itself
        feed(page, 0, sse(role=True) + sse("Iron is a mineral"))
        page.wait_for_function("document.querySelector('.turn.assistant .text').textContent.includes('mineral')")
        assert page.get_attribute(".turn.assistant", "aria-busy") == "true"
        assert page.text_content(announced) == ""
        feed(page, 0, sse(" the body needs.") + sse(finish="stop") + DONE, close=True)
        page.wait_for_selector(".turn.assistant .good-answer", state="visible")
        assert page.get_attribute(".turn.assistant", "aria-busy") in (None, "false")
        assert page.text_content(announced) == "Iron is a mineral the body needs."

        page.fill("#question", "What is zinc?")
        page.press("#question", "Enter")
        feed(page, 1, sse(role=True) + sse("Zinc is"))
        page.wait_for_function("document.querySelectorAll('.turn.assistant')[1].textContent.includes('Zinc')")
        page.click("#stop")
        page.wait_for_function("document.getElementById('stop').hidden")
        assert focused(page) == "question"  # Stop hid itself
        assert page.text_content(announced) == "Stopped"

        buttons = re.findall(r'button "([^"]*)"', page.locator("#chat").aria_snapshot())
        assert len(buttons) == 4 and len(set(buttons)) == 4, buttons
        second = page.locator(".turn.assistant").nth(1)
        second.locator(".bad-answer").click()
        box = second.locator(".correction")
        assert box.evaluate("e => e.labels.length && e.labels[0].textContent.trim().length > 0")
        name = re.search(r'textbox "([^"]+)"', page.locator("#chat").aria_snapshot()).group(1)
        assert page.get_by_role("textbox", name=name, exact=True).count() == 1
        box.fill("Zinc is a trace mineral.")
        second.locator(".submit-feedback").click()
        page.wait_for_function("document.querySelectorAll('.feedback-status')[1].textContent.includes('saved')")
        assert focused(page) == "feedback-status"
        assert page.evaluate("document.activeElement === document.querySelectorAll('.feedback-status')[1]")


def test_streaming_leaves_a_reader_where_they_are(browser, page_server):
    """The page follows a streaming answer only while the reader is at the bottom."""
    at_bottom = "(() => { const e = document.scrollingElement; return e.scrollHeight - e.scrollTop - e.clientHeight < 5; })()"
    with chat_page(browser, page_server, fake_chat=True, viewport={"width": 800, "height": 600}) as page:
        page.fill("#question", "Tell me about the heart.")
        page.click("#send")
        feed(page, 0, sse(role=True) + sse("\n".join(f"Line {i}" for i in range(60))))
        page.wait_for_function("document.querySelector('.turn.assistant .text').textContent.includes('Line 59')")
        assert page.evaluate(at_bottom)
        page.evaluate("window.scrollTo(0, 0)")
        feed(page, 0, sse("\nLine 60"))
        page.wait_for_function("document.querySelector('.turn.assistant .text').textContent.includes('Line 60')")
        assert page.evaluate("window.scrollY") == 0
        page.evaluate("window.scrollTo(0, document.scrollingElement.scrollHeight)")
        feed(page, 0, sse("\nLine 61\nLine 62\nLine 63"))
        page.wait_for_function("document.querySelector('.turn.assistant .text').textContent.includes('Line 63')")
        assert page.evaluate(at_bottom)


def test_safety_notice_stays_in_view_on_a_phone(browser, page_server):
    """On a phone-sized screen with a long chat, "not a doctor" is on screen (and not covered) wherever the
    reader has scrolled."""
    shown = """() => [...document.querySelectorAll('p, strong')].some((e) => {
        if (!/not a doctor/i.test(e.textContent)) return false;
        const r = e.getBoundingClientRect(), top = Math.max(r.top, 0), bottom = Math.min(r.bottom, innerHeight);
        if (r.width === 0 || bottom - top < 8) return false;
        const hit = document.elementFromPoint(r.left + Math.min(r.width / 2, 20), (top + bottom) / 2);
        return hit !== null && e.contains(hit);
    })"""
    with chat_page(browser, page_server, fake_chat=True, viewport={"width": 360, "height": 640},
                   is_mobile=True, has_touch=True) as page:
        page.fill("#question", "Tell me about the heart.")
        page.click("#send")
        feed(page, 0, answer("\n".join(f"Line {i} of a long answer" for i in range(80))), close=True)
        page.wait_for_selector(".turn.assistant .good-answer", state="visible")
        height = page.evaluate("document.scrollingElement.scrollHeight")
        assert height > 3 * 640
        for y in (0, height // 2, height):
            page.evaluate("y => window.scrollTo(0, y)", y)
            assert page.evaluate(shown), f"no 'not a doctor' notice in view at scrollY={y}"
