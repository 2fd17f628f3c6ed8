// medlora chat page: streams answers from /v1/chat/completions (server-sent events) and sends
// "good/bad answer" feedback, with an optional correction, to /v1/feedback.
// The server adds the safety system prompt itself, so the page only keeps user/assistant turns.
// Model text goes into the page only through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = $("chat"), form = $("ask"), question = $("question"), announcer = $("announce");
const sendButton = $("send"), stopButton = $("stop"), keyForm = $("key-box"), keyInput = $("api-key");
const KEY = "medlora-api-key";
const NEAR_BOTTOM = 80; // px: this close to the end of the page, a streaming answer is followed

let history = [];      // [{role, content}] of this conversation; New chat starts a new array
let controller = null; // aborts the answer being streamed
let answers = 0;       // finished answers in this conversation, to name their feedback buttons

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// What to tell the user about a failed response (a 401 also opens the API-key box).
async function errorMessage(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch { /* not the server's JSON error */ }
  if (response.status === 401) {
    askForKey();
    return "this server needs an API key. Enter it in the box below, then send again.";
  }
  if (error.code === "context_length_exceeded") {
    return `${error.message}. The conversation is too long: start a New chat (or ask a shorter question).`;
  }
  return error.message || `${response.status} ${response.statusText}`;
}

function askForKey() {
  $("key-message").textContent = sessionStorage.getItem(KEY)
    ? "That API key was not accepted. Check it and enter it again."
    : "This server needs an API key. Enter it to continue.";
  keyForm.hidden = false;
  keyInput.focus();
}

// Yield the data of each SSE event ("data: ...") as it arrives.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function nearBottom() {
  const page = document.scrollingElement;
  return page.scrollHeight - page.scrollTop - page.clientHeight < NEAR_BOTTOM;
}

function scrollToEnd() {
  window.scrollTo(0, document.scrollingElement.scrollHeight);
}

function announce(text) { // once, through the hidden role="status" region
  announcer.textContent = text;
}

function addUserTurn(text) {
  const div = document.createElement("div");
  div.className = "turn user";
  div.textContent = text;
  chat.append(div);
}

function addAnswerTurn() {
  const node = $("answer-template").content.firstElementChild.cloneNode(true);
  node.setAttribute("aria-busy", "true");
  chat.append(node);
  scrollToEnd(); // the user just asked: show the question and where its answer comes
  return node;
}

// Send and Stop disable and hide themselves: keyboard focus on them would fall to <body>.
function busy(on) {
  const active = document.activeElement;
  const lost = !active || active === document.body || active === sendButton || active === stopButton;
  sendButton.disabled = on;
  stopButton.hidden = !on;
  if (lost) question.focus({ preventScroll: true });
}

function mark(out, text) { // shown only: the conversation keeps what the model wrote
  const span = document.createElement("span");
  span.className = "mark";
  span.textContent = text;
  out.append(span);
}

async function ask(text) {
  const conv = history; // New chat replaces `history`: this answer then belongs to no conversation
  conv.push({ role: "user", content: text });
  addUserTurn(text);
  const node = addAnswerTurn();
  const out = node.querySelector(".text");
  out.classList.add("pending");
  const mine = new AbortController();
  controller = mine;
  busy(true);
  let response = null, answer = "", finish = null, stopped = false, failure = null;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: mine.signal,
      body: JSON.stringify({ model: "medlora", messages: conv, stream: true }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") {
        finish = finish || "stop";
        break;
      }
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      const choice = msg.choices[0]; // none in the usage chunk
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (choice.delta && choice.delta.content) {
        const follow = nearBottom(); // someone re-reading further up is left there
        answer += choice.delta.content;
        out.textContent = answer;
        out.classList.remove("pending");
        if (follow) scrollToEnd();
      }
    }
    if (!finish) throw new TypeError("connection closed before the answer finished"); // no finish_reason, no [DONE]
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else if (err instanceof TypeError) { // network failure, or a stream cut off mid-answer
      failure = response ? "connection closed before the answer finished" : "could not reach the server";
    } else failure = err.message;
  }
  if (controller === mine) { // after New chat these belong to the next answer
    controller = null;
    busy(false);
  }
  if (history !== conv) return; // New chat: the answer is dropped, never kept, rated or sent back

  const follow = nearBottom();
  node.removeAttribute("aria-busy");
  out.classList.remove("pending");
  if (failure || (stopped && !answer)) { // the question got no answer: leave it out of the conversation
    conv.pop();
    if (failure) {
      out.classList.add("error");
      out.textContent = "Error: " + failure;
      if (!question.value.trim()) question.value = text; // to send again, not type again
      announce(out.textContent);
    } else {
      out.textContent = "(stopped)";
      announce("Stopped");
    }
  } else {
    out.textContent = answer;
    if (stopped) mark(out, " …");
    else if (finish === "length") mark(out, " … (cut off at the length limit)");
    conv.push({ role: "assistant", content: answer });
    enableFeedback(node, conv.slice(), ++answers);
    announce(stopped ? "Stopped" : out.textContent);
  }
  if (follow) scrollToEnd();
}

// Each answer remembers the conversation up to and including itself, for /v1/feedback.
function enableFeedback(node, conversation, n) {
  const box = node.querySelector(".feedback");
  const status = node.querySelector(".feedback-status");
  const correction = node.querySelector(".correction");
  node.querySelector(".good-answer").setAttribute("aria-label", `Good answer (answer ${n})`);
  node.querySelector(".bad-answer").setAttribute("aria-label", `Bad answer (answer ${n})`);
  node.querySelector(".submit-feedback").setAttribute("aria-label", `Send feedback (answer ${n})`);
  node.querySelector(".correction-label").textContent = `Correction for answer ${n} (optional)`;
  box.hidden = false;

  async function send(rating, text) {
    status.textContent = "Sending…";
    try {
      const response = await fetch("/v1/feedback", {
        method: "POST", headers: headers(),
        body: JSON.stringify({ messages: conversation, rating, correction: text || null }),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      status.textContent = "Thanks — feedback saved.";
      box.querySelectorAll("button, textarea").forEach((el) => (el.disabled = true));
      status.focus(); // the button that had focus is now disabled
    } catch (err) {
      status.textContent = "Could not save feedback: " + err.message;
    }
  }

  node.querySelector(".good-answer").addEventListener("click", () => send("good", null));
  node.querySelector(".bad-answer").addEventListener("click", () => {
    node.querySelector(".correction-box").hidden = false;
    correction.focus();
  });
  node.querySelector(".submit-feedback").addEventListener("click", () => send("bad", correction.value.trim()));
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = question.value.trim();
  if (!text || controller) return;
  question.value = "";
  ask(text);
});

question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => controller && controller.abort());

$("reset").addEventListener("click", () => {
  if (controller) controller.abort(); // its ask() sees that `history` changed and drops the answer
  controller = null;
  busy(false);
  history = [];
  answers = 0;
  chat.replaceChildren();
  announcer.textContent = "";
  question.focus();
});

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, keyInput.value.trim());
  keyForm.hidden = true;
  question.focus();
});
