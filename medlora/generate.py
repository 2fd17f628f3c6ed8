"""Text generation: KV-cached decoding, sampling, stopping, streaming.

One loop serves everything: `generate_ids` yields the next token of every row at each step;
`generate` collects them; `stream_text` turns one row's tokens into text pieces that never
split a multi-byte character. Batches are left-padded so every row's next token sits in the
last column; rotary positions skip the padding so a padded row computes what it would alone.

Left out: beam search, speculative decoding and paged KV caches. Mirrors transformers'
`generate` (greedy output tested token for token; HF's repetition-penalty definition) and the
decode loop of gpt-fast and nanoGPT's `generate`, with a KV cache.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch

from .model import KVCache, Llama
from .tokenizer import ChatTokenizer


@dataclass
class GenConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; HF's definition
    no_repeat_ngram: int = 0  # n > 0: never emit a token that repeats an n-gram of the row (HF's no_repeat_ngram_size)
    # ... except inside numbers (NgramBan): the ban never changes a digit. False = transformers' rule exactly.
    no_repeat_keeps_numbers: bool = True
    seed: int | None = None
    stop_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:  # 0 keeps only the most likely token (as OpenAI's API allows)
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0 or self.no_repeat_ngram < 0:
            raise ValueError("top_k and no_repeat_ngram must be >= 0 and repetition_penalty > 0")


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenConfig,
                gen: torch.Generator | None, banned: list[list[int]] | None = None) -> torch.Tensor:
    """Pick the next token per row from float logits [B, V]; `seen` [B, S] holds ids to penalise,
    `banned[i]` the ids row i may not emit (no-repeat n-gram)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        prev = logits.gather(1, seen)
        logits = logits.scatter(1, seen, torch.where(prev > 0, prev / cfg.repetition_penalty, prev * cfg.repetition_penalty))
    if banned and any(banned):
        rows = torch.tensor([i for i, b in enumerate(banned) for _ in b], device=logits.device)
        cols = torch.tensor([t for b in banned for t in b], device=logits.device)
        logits = logits.index_put((rows, cols), torch.tensor(float("-inf"), device=logits.device))
    if cfg.temperature < torch.finfo(torch.float32).tiny:  # 0, or a temperature float32 rounds to 0: greedy
        return logits.argmax(-1)
    # Shift so the largest logit is 0 before dividing: a tiny temperature then gives -inf (a weight of 0)
    # instead of overflowing to +inf, which softmax would turn into NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(logits.device)


@torch.no_grad()
def generate_ids(model: Llama, prompts: list[list[int]], cfg: GenConfig, pad_id: int = 0,
                 number_tokens: tuple[frozenset[int], frozenset[int]] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each row (None once a row has stopped).

    number_tokens: the tokenizer's (digit ids, separator ids) (`ChatTokenizer.number_tokens`), which the
    no-repeat rule leaves alone under `cfg.no_repeat_keeps_numbers`; without them it cannot tell a digit
    and bans as transformers does. `generate`, `stream_chat` and the server pass them."""
    device = model.model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt")
    limit = model.config.max_position_embeddings
    if P + cfg.max_new_tokens > limit:
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the context of {limit}")
    pads = torch.tensor([P - len(p) for p in prompts], device=device)
    idx = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    slot = torch.arange(P, device=device)
    valid = slot[None, :] >= pads[:, None]  # [B, P]: real (non-pad) slots
    pos = (slot[None, :] - pads[:, None]).clamp(min=0)
    mask = None
    if bool((pads > 0).any()):
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # Pad rows may attend to themselves so no softmax row is empty (that would give NaN).
        mask = ((causal[None] & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device))[:, None]
    cache = KVCache(model.config, B, P + cfg.max_new_tokens, device, cache_dtype(model))
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    seen = torch.where(valid, idx, idx[:, -1:])  # the penalty's ids: a left-pad slot repeats a real one
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(cfg.stop_ids), device=device, dtype=torch.long)
    # Prefill: the head runs on the last position only (the [P, vocab] logits are never needed).
    logits = model.lm_head(model(idx, pos=pos, mask=mask, cache=cache, hidden_only=True)[:, -1])
    next_pos = pos[:, -1] + 1
    penalise = cfg.repetition_penalty != 1.0
    keep = number_tokens if cfg.no_repeat_keeps_numbers else None
    ngrams = NgramBan(cfg.no_repeat_ngram, prompts, keep) if cfg.no_repeat_ngram else None
    step_fn = decoder(model)
    if _COMPILED.get(model, (None, False))[1]:  # CUDA graphs replay one recorded step: every step at the same shapes
        cache.fix_shapes(valid)
    for step in range(cfg.max_new_tokens):
        tok = sample_next(logits, seen if penalise else None, cfg, gen, ngrams.banned() if ngrams else None)
        toks = tok.tolist()  # one device sync per step
        if ngrams:
            ngrams.push(toks)
        is_stop = torch.isin(tok, stop) if len(stop) else torch.zeros_like(done)
        yield [None if d else t for t, d in zip(toks, done.tolist())]
        done |= is_stop
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            return
        if penalise:
            seen = torch.cat([seen, tok[:, None]], 1)
        step_mask = None
        if cache.seen is not None:
            step_mask = cache.next_slot()  # every slot of the cache; the empty ones and left padding hidden
        elif mask is not None:  # left padding: keep hiding the pad slots from every new token
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
            step_mask = valid[:, None, None, :]
        logits = step_fn(tok[:, None], pos=next_pos[:, None], mask=step_mask, cache=cache)[:, -1]
        next_pos = next_pos + 1


def cache_dtype(model: Llama) -> torch.dtype:
    """The KV cache's (and so decode attention's) precision: the model's activation dtype, except
    fp32 on a CPU. PyTorch's CPU attention kernels are slow in bf16 for one query token: 5x (batch 1)
    to 7x (batch 16, 600 cached slots) the fp32 time, measured; 30 layers of that were a quarter of
    an int8 decode step. A bf16 cache converted per step costs nearly as much, so the cache is kept
    in fp32 (twice the bytes; 46 KB per slot and row for SmolLM-135M)."""
    w = model.model.embed_tokens.weight  # its dtype is the activation dtype (the head may be int8)
    return torch.float32 if w.device.type == "cpu" else w.dtype


# Models whose decode step is compiled -> (the compiled, unbound forward; replayed as CUDA graphs?). Kept
# beside the model, not on it: a copy of the model (deepcopy, quantize_int8 on a copy) must not run the
# original's weights.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compile_decoding(model: Llama, cuda_graphs: bool = False) -> Llama:
    """torch.compile the one-token decode step of `model` (prefill stays eager: one call per answer).

    At batch 1 on a CPU a decode step is ~30 layers x ~15 small ops, and the Python dispatch
    between them costs as much as the arithmetic once weights are int8; the compiled step fuses
    them (bench/results: the `+compile` rows). `dynamic=True`: the cache grows by one slot per
    step, so one compiled graph serves all lengths. The first call compiles (about a minute on
    2 cores; a left-padded batch compiles once more). `emulate_precision_casts`: inductor otherwise
    computes a fused chain of bf16 ops in fp32 without rounding in between, so an int8 model (bf16
    activations, fp32 attention) decoded other greedy tokens than eager from token 9 on (found by the bench).

    The other difference was the norms: inductor sums RMSNorm's squares in another order than eager's
    kernel, so compiled int8/int4 decoding left eager's greedy tokens at token 22 / 26 of the bench's 80
    (session 20); decode steps now sum them in fp64 (model.rms_norm's exact_mean), and compiled
    int8, int4, bf16 and fp32 decoding give eager's tokens over 200 (checked on the bench's prompt).

    `cuda_graphs`: on a GPU, also replay each step as one CUDA graph (inductor's cudagraph trees, what
    mode="reduce-overhead" turns on): at batch 1 an H100 decode step is bound by launching ~500 small
    kernels (bench/results/cuda.md). A graph needs the same shapes and tensor addresses at every step,
    so these steps attend over every slot of the cache under a mask (KVCache.fix_shapes), the cache
    length marked dynamic: one compiled graph per batch size, one recorded CUDA graph per batch size and
    cache length. Only with graphs: on 2 CPU cores fixed shapes decoded as fast, but an int4 model's
    compiled greedy tokens then left eager's at token 4 of 80 on the bench's prompt (the masked attention
    over the whole cache sums in another order). Off by default: not
    yet measured on a GPU (the GPU bench turns it on), and PyTorch's cudagraph trees do not support
    steps run from several threads (pytorch#123177), which serve.py's HTTP worker does.
    """
    # (With fixed shapes, automatic dynamic shapes: dynamic=True would make the cache's head count
    # symbolic too, and SDPA's enable_gqa flag cannot take a symbolic bool.)
    fn = torch.compile(type(model).forward, dynamic=None if cuda_graphs else True,  # the model is its first argument
                       options={"emulate_precision_casts": True, "triton.cudagraphs": cuda_graphs})
    _COMPILED[model] = (fn, cuda_graphs)
    return model


def decoder(model: Llama):
    """What runs one decode step: the compiled forward after compile_decoding(model), else the model."""
    fn, _ = _COMPILED.get(model, (None, False))
    return partial(fn, model) if fn is not None else model


class NgramBan:
    """No-repeat n-gram bookkeeping per row: which tokens would complete an n-gram the row has
    already produced (prompt included, padding not), as transformers' NoRepeatNGramLogitsProcessor.

    With `numbers` = (digit ids, separator ids), digits are not banned, nor a separator ("-", " ",
    ".", ",", "/") right after a digit, while the number being written (its digits and the separators
    between them, `_number_run`) is shorter than MAX_NUMBER_TOKENS tokens. Digits are
    single tokens here, so transformers' rule bans the second "call 911" at its last "1" (the 4-gram
    "call", " ", "9", "1" was seen), and the model writes another digit instead: the shipped adapter's
    made-up "call 221" and "call 112 ... crisis line" after an earlier "call 911" (README, *Safety*). A
    repeated number is not a loop; the words around it still are, and so is a run of digits and
    separators longer than any phone number ("1-1-1-1-...", which the exemption alone let through)."""

    MAX_NUMBER_TOKENS = 16  # "1-800-222-1222" is 14 tokens here

    def __init__(self, n: int, prompts: list[list[int]],
                 numbers: tuple[frozenset[int], frozenset[int]] | None = None):
        self.n = n
        self.digits, self.seps = numbers or (frozenset(), frozenset())
        self.number = self.digits | self.seps  # what a digit may be followed by without a ban
        self.hist: list[list[int]] = [[] for _ in prompts]
        self.seen: list[dict[tuple, set[int]]] = [{} for _ in prompts]
        for i, p in enumerate(prompts):
            for t in p:
                self._add(i, t)

    def _add(self, i: int, t: int) -> None:
        h = self.hist[i]
        h.append(t)
        if len(h) >= self.n:
            self.seen[i].setdefault(tuple(h[len(h) - self.n:-1]), set()).add(t)

    def banned(self) -> list[list[int]]:
        k = self.n - 1
        out = []
        for h, s in zip(self.hist, self.seen):
            ban = s.get(tuple(h[len(h) - k:]) if k else (), ()) if len(h) >= k else ()
            if ban and self.digits and self._number_run(h) < self.MAX_NUMBER_TOKENS:
                keep = self.number if h and h[-1] in self.digits else self.digits
                ban = [t for t in ban if t not in keep]
            out.append(sorted(ban))
        return out

    def _number_run(self, h: list[int]) -> int:
        """How many of the row's last tokens are the number being written: digits, and separators that
        follow a digit. The space before it, or the ", " between two numbers of a list, is not part of
        it ("call 988, 1-800-273-8255" is two numbers, not one run of 19 tokens)."""
        n = 0
        while n < len(h) and (h[-1 - n] in self.digits
                              or h[-1 - n] in self.seps and n + 1 < len(h) and h[-2 - n] in self.digits):
            n += 1
        return n

    def push(self, toks: list[int]) -> None:
        for i, t in enumerate(toks):
            self._add(i, t)


@dataclass
class Generation:
    ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-turn or stop token) or "length"


def generate(model: Llama, tok: ChatTokenizer, prompts: list[list[int]], cfg: GenConfig) -> list[Generation]:
    """Batched generation; returns each row's new tokens (stop token excluded) and text."""
    stop_ids = cfg.stop_ids or tok.stop_ids
    cfg = GenConfig(**{**cfg.__dict__, "stop_ids": stop_ids})
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for step in generate_ids(model, prompts, cfg, pad_id=tok.pad_id, number_tokens=tok.number_tokens()):
        for i, t in enumerate(step):
            if t is None:
                continue
            if t in stop_ids:
                stopped[i] = True
            else:
                out[i].append(t)
    return [Generation(ids, tok.decode(ids), "stop" if s else "length") for ids, s in zip(out, stopped)]


def stream_text(tok: ChatTokenizer, token_iter: Iterator[int], stop_ids: set[int]) -> Iterator[str]:
    """Turn a stream of token ids into text pieces; a piece is held back while it ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD), so multi-byte characters are never split."""
    ids: list[int] = []
    emitted = 0
    for t in token_iter:
        if t in stop_ids:
            break
        ids.append(t)
        text = tok.decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
    text = tok.decode(ids)
    if len(text) > emitted:
        yield text[emitted:]


def stream_chat(model: Llama, tok: ChatTokenizer, messages: list[dict], cfg: GenConfig) -> Iterator[str]:
    """Stream the assistant's reply to `messages` as text pieces."""
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    stop_ids = cfg.stop_ids or tok.stop_ids
    cfg = GenConfig(**{**cfg.__dict__, "stop_ids": stop_ids})
    tokens = (step[0] for step in generate_ids(model, [prompt], cfg, pad_id=tok.pad_id, number_tokens=tok.number_tokens()))
    yield from stream_text(tok, tokens, stop_ids)
