"""The worker that owns the model: one thread, a queue of requests, text pieces back.

Only this thread runs the model. By default it decodes one request at a time, so an answer is
exactly what the request would get alone. With max_batch > 1, greedy requests waiting at the
same time are decoded together as one left-padded `generate_ids` batch: more throughput under
load, but a padded batch's logits match one-by-one decoding only to about 1e-4, so in a rare
near-tie a greedy answer can differ. A sampled request always runs alone (one RNG per batch, so
its seed alone decides its output). Each batch has its own KV cache; nothing is shared between
requests. Events go back to the caller's asyncio loop; a request is cancelled by setting its
`cancelled` flag, which the worker checks between tokens.

Left out: continuous batching and paged KV caches (vLLM, TGI), and more than one model. Mirrors
llama.cpp's server design of one model owner that requests queue for.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

from .generate import GenConfig, generate_ids
from .tokenizer import ChatTokenizer


# ---------------------------------------------------------------------------------------------
# Detokenizing one answer: no split characters, stop strings trimmed
# ---------------------------------------------------------------------------------------------
class AnswerText:
    """Turns an answer's token ids into text pieces. Like `stream_text`, a piece ending in an
    incomplete UTF-8 sequence is held back; so is any tail that could be the start of a stop
    string, since a stop string must never reach the client."""

    def __init__(self, tok: ChatTokenizer, stop: list[str]) -> None:
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.sent = 0  # characters already given out
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one token; return the text that is now safe to send (maybe "")."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        hits = [i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold)

    def flush(self) -> str:
        """The rest of the text, at the end of the answer (a held-back tail was no stop string)."""
        self.text = self.tok.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


# ---------------------------------------------------------------------------------------------
# The worker that owns the model
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One request as the worker sees it; events go back to the request's event loop."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    started: bool = False  # taken into a batch by the worker (set under Engine.stats_lock)
    text: AnswerText | None = None

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share a batch; sampled jobs never do (one RNG per batch)."""
        return None if self.temperature > 0 else ("greedy", self.ignore_eos)

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody to tell
            pass

    def finish(self, reason: str) -> None:
        if reason in ("stop", "length"):
            rest = self.text.flush() if not self.text.stopped else ""
            if rest:
                self.send("text", rest)
        self.finished = True
        self.send("done", reason, len(self.prompt), len(self.text.ids))


class Engine:
    """A queue in front of one worker thread; only that thread runs the model."""

    def __init__(self, model, tok: ChatTokenizer, max_batch: int = 1, top_k: int = 0,
                 repetition_penalty: float = 1.0, no_repeat_ngram: int = 0, no_repeat_keeps_numbers: bool = True) -> None:
        self.model, self.tok, self.max_batch = model, tok, max_batch
        self.top_k, self.repetition_penalty, self.no_repeat_ngram = top_k, repetition_penalty, no_repeat_ngram
        self.no_repeat_keeps_numbers = no_repeat_keeps_numbers
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"requests": 0, "cancelled": 0, "active": 0, "batches": 0, "largest_batch": 0, "errors": 0}
        self.stats_lock = threading.Lock()  # the HTTP thread and the worker both count
        self.thread = threading.Thread(target=self._loop, name="medlora-model", daemon=True)
        self.thread.start()

    def reserve(self, limit: int) -> bool:
        """Take one of `limit` places (requests waiting or running) before a request is read, or
        return False. Checked and taken under one lock: requests whose bodies arrive slowly cannot
        all pass the check before any of them is counted."""
        with self.stats_lock:
            if self.stats["active"] >= limit:
                return False
            self.stats["active"] += 1
            return True

    def release(self) -> None:
        """Give back a reserved place that never became a job (a bad request)."""
        self._count(active=-1)

    def submit(self, job: Job, reserved: bool = False) -> None:
        job.text = AnswerText(self.tok, job.stop)
        self._count(requests=1, active=0 if reserved else 1)
        self.inbox.put(job)

    def cancel(self, job: Job) -> None:
        """The client has gone: stop the job. One still waiting in the queue gives its place back
        now (the worker would only see it when it next takes a batch, maybe a long answer later)."""
        job.cancelled.set()
        with self.stats_lock:
            if job.started or job.finished:
                return  # running: the worker stops it between tokens; finished: nothing to do
            job.finished = True
            self.stats["active"] -= 1
            self.stats["cancelled"] += 1

    def snapshot(self) -> dict:
        with self.stats_lock:
            return {**self.stats, "queued": self.inbox.qsize()}

    def _count(self, **deltas: int) -> None:
        with self.stats_lock:
            for k, v in deltas.items():
                self.stats[k] += v

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        pending: deque[Job] = deque()
        while True:
            if not pending:
                job = self.inbox.get()
                if job is None:
                    return
                pending.append(job)
            while True:  # everything waiting now is a candidate for this batch
                try:
                    job = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    return
                pending.append(job)
            batch = self._take_batch(pending)
            if batch:
                self._run(batch)  # never raises: a failing batch fails its own requests only

    def _take_batch(self, pending: deque[Job]) -> list[Job]:
        first = pending.popleft()
        batch = [first]
        key = first.batch_key()
        if key is not None:
            for job in list(pending):
                if len(batch) >= self.max_batch:
                    break
                if job.batch_key() == key:
                    pending.remove(job)
                    batch.append(job)
        with self.stats_lock:  # (Engine.cancel ends a waiting job under this lock too)
            for job in batch:
                if not job.finished:
                    job.started = True
        for job in [j for j in batch if j.cancelled.is_set()]:  # gone before it started
            self._end(job, "cancelled")
        return [j for j in batch if not j.finished]

    def _end(self, job: Job, reason: str, message: str = "") -> None:
        if job.finished:
            return
        if reason == "error":
            job.finished = True
            job.send("error", message)
        else:
            job.finish(reason)
        self._count(active=-1, cancelled=int(reason == "cancelled"), errors=int(reason == "error"))

    def _run(self, batch: list[Job]) -> None:
        with self.stats_lock:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        first, steps = batch[0], None
        stop_ids = set() if first.ignore_eos else set(self.tok.stop_ids)
        try:
            cfg = GenConfig(max_new_tokens=max(j.max_tokens for j in batch), temperature=first.temperature,
                            top_p=first.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                            no_repeat_ngram=self.no_repeat_ngram, no_repeat_keeps_numbers=self.no_repeat_keeps_numbers,
                            seed=first.seed, stop_ids=stop_ids)
            steps = generate_ids(self.model, [j.prompt for j in batch], cfg, pad_id=self.tok.pad_id,
                                 number_tokens=self.tok.number_tokens())
            for step in steps:
                for job, token in zip(batch, step):
                    if not job.finished:
                        self._take_token(job, token, stop_ids)
                if all(j.finished for j in batch):
                    break
        except Exception as e:  # a bug or out of memory: fail these requests, keep serving
            for job in batch:
                self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")
        finally:
            if steps is not None:
                steps.close()  # frees this batch's KV cache
            for job in batch:
                self._end(job, "length")  # only reached if generation ended without a verdict

    def _take_token(self, job: Job, token: int | None, stop_ids: set[int]) -> None:
        if job.cancelled.is_set():
            self._end(job, "cancelled")
        elif token is None or token in stop_ids:
            self._end(job, "stop")
        else:
            piece = job.text.add(token)
            if piece:
                job.send("text", piece)
            if job.text.stopped:
                self._end(job, "stop")
            elif len(job.text.ids) >= job.max_tokens:
                self._end(job, "length")
