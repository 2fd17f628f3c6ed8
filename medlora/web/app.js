// medlora chat page: streams answers from /v1/chat/completions (server-sent events) and sends
// "good/bad answer" feedback, with an optional correction, to /v1/feedback.
// The server adds the safety system prompt itself, so the page only keeps user/assistant turns.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = $("chat"), form = $("ask"), question = $("question");
const sendButton = $("send"), stopButton = $("stop");
const KEY = "medlora-api-key";

let history = [];      // [{role, content}] of this conversation
let controller = null; // aborts the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  if (response.status === 401) $("key-box").hidden = false;
  try {
    const body = await response.json();
    return body.error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
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

function addUserTurn(text) {
  const div = document.createElement("div");
  div.className = "turn user";
  div.textContent = text;
  chat.append(div);
}

function addAnswerTurn() {
  const node = $("answer-template").content.firstElementChild.cloneNode(true);
  chat.append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function busy(on) {
  sendButton.disabled = on;
  stopButton.hidden = !on;
}

async function ask(text) {
  history.push({ role: "user", content: text });
  addUserTurn(text);
  const node = addAnswerTurn();
  const out = node.querySelector(".text");
  out.classList.add("pending");
  let answer = "", stopped = false;
  controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: "medlora", messages: history, stream: true }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(msg.error.message);
      const delta = msg.choices.length ? msg.choices[0].delta : {};
      if (delta.content) {
        answer += delta.content;
        out.textContent = answer;
        out.classList.remove("pending");
        node.scrollIntoView({ block: "end" });
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      history.pop(); // the question got no answer; leave it out of the conversation
      out.classList.remove("pending");
      out.classList.add("error");
      out.textContent = "Error: " + err.message;
      return;
    }
    if (!answer) { // stopped before any text: no answer to keep, rate or send back to the model
      history.pop();
      out.classList.remove("pending");
      out.textContent = "(stopped)";
      return;
    }
    stopped = true;
  } finally {
    busy(false);
    controller = null;
  }
  out.classList.remove("pending");
  out.textContent = stopped ? answer + " …" : answer; // the mark is shown only: the history keeps what the model wrote
  history.push({ role: "assistant", content: answer });
  enableFeedback(node, history.slice());
}

// Each answer remembers the conversation up to and including itself, for /v1/feedback.
function enableFeedback(node, conversation) {
  const box = node.querySelector(".feedback");
  const status = node.querySelector(".feedback-status");
  const correction = node.querySelector(".correction");
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
  if (controller) controller.abort();
  history = [];
  chat.replaceChildren();
  question.focus();
});

$("save-key").addEventListener("click", () => {
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("key-box").hidden = true;
});
