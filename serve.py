"""Talk to the model: a streaming chat REPL, one answer with --prompt, or an HTTP server with --http.

    python serve.py                          # interactive; /reset, /system [TEXT|clear], /help, /quit
    python serve.py --prompt "What is anemia?"
    python serve.py --http --port 8000       # OpenAI-compatible API + chat page on http://127.0.0.1:8000
    python serve.py --base-only              # the plain base model, no adapter

By default the shipped adapter (adapters/medlora-r8, medlora/shipped.py) is merged into the base
weights it was trained on, found by sha256; --adapter DIR uses another adapter, --base-only none.
Every conversation runs under medlora's safe medical system prompt (medlora/tokenizer.py);
/system TEXT adds instructions after it (replacing earlier /system text), never instead of it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from medlora.cli import (DEFAULT_NO_REPEAT_NGRAM, add_generation_flags, add_model_flags, fail, given_flags, pick_device,
                         pick_dtype, positive_int, revision_unused, sampling_ignored)
from medlora.generate import GenConfig, stream_chat
from medlora.tokenizer import MEDICAL_SYSTEM_PROMPT, ChatFormatError, with_safety_prompt

HELP = ("commands: /reset (new conversation; the /system text stays), /system [TEXT] (show, or set the "
        "instructions added after the safety prompt), /system clear, /help, /quit; //TEXT sends a line starting "
        "with /; Ctrl-C stops an answer, Ctrl-D or Ctrl-C at the prompt quits")


class ContextError(ValueError):
    """The conversation plus the answer it may get does not fit the model's context."""


def build(args):
    """Load the base and merge the adapter: --adapter DIR, none with --base-only, else the shipped
    default adapter on the base it records (the default adapter refuses any other base)."""
    from medlora import shipped
    from medlora.weights import WeightsError, load_pretrained

    device = pick_device(args.device)
    adapter = None if getattr(args, "base_only", False) else (args.adapter or str(shipped.DEFAULT_ADAPTER))
    default = shipped.is_default(adapter)
    spec = args.model
    if default and spec is None:
        try:
            spec = shipped.base_spec(adapter)
        except shipped.ShippedAdapterError as e:
            fail(str(e))
    from medlora.lora import AdapterError, adapter_base_mismatch, load_adapter, read_adapter

    if adapter:
        try:
            read_adapter(adapter)  # one medlora cannot apply fails before the model loads
        except AdapterError as e:
            fail(f"--adapter: {e}")
    try:
        model, tok, info = load_pretrained(spec, args.revision, dtype=pick_dtype(args.dtype, device), device=device)
    except WeightsError as e:
        fail(str(e))
    if adapter:
        try:
            problem = shipped.base_problem(adapter, info) if default else adapter_base_mismatch(adapter, info)
            if problem:
                fail(problem)
            load_adapter(model, adapter, merge=True)
        except AdapterError as e:
            fail(str(e))
        note = "; the shipped default, --base-only for the plain model" if default else ""
        print(f"[medlora] adapter: {adapter} (merged){note}", file=sys.stderr)
    else:
        print("[medlora] no adapter: the plain base model (--base-only)", file=sys.stderr)
    kind = "int4" if getattr(args, "int4", False) else "int8" if getattr(args, "int8", False) else None
    if kind:
        from medlora.quant import quantize_int4, quantize_int8

        try:  # after merging: the adapter is inside the quantised weights
            (quantize_int4 if kind == "int4" else quantize_int8)(model)
        except RuntimeError as e:
            fail(f"--{kind}: {e}")
        print(f"[medlora] {kind} weights (faster CPU decoding; answers may differ slightly from full precision)",
              file=sys.stderr)
    if getattr(args, "compile", False):
        from medlora.generate import compile_decoding, generate_ids

        print("[medlora] compiling the decode step (torch.compile; about a minute, once)...", file=sys.stderr)
        compile_decoding(model)
        warm = [[tok.encode("Hello")]]  # compile now, not during the first answer
        if getattr(args, "http", False) and getattr(args, "max_batch", 1) > 1:
            warm.append([tok.encode("Hello"), tok.encode("Hello there, how are you")])  # the left-padded batch path
        for prompts in warm:
            list(generate_ids(model, prompts, GenConfig(max_new_tokens=3), tok.pad_id))
    args.adapter = adapter
    return model, tok, info


def conversation(tok, history: list[dict], system_extra: str | None) -> list[dict]:
    """What the model is asked: the safe system prompt (+ /system's text) and the turns so far.
    Raises ChatFormatError when a message holds a control token of the chat format."""
    messages = with_safety_prompt(([{"role": "system", "content": system_extra}] if system_extra else []) + history)
    tok.check_messages(messages)
    return messages


def fitting_conversation(model, tok, history: list[dict], gen: GenConfig, system_extra: str | None) -> list[dict]:
    """`conversation`, checked to leave room for a whole answer: generation refuses a prompt that does
    not (a traceback that would end the REPL). Raises ChatFormatError or ContextError."""
    messages = conversation(tok, history, system_extra)
    n, limit = len(tok.encode_chat(messages, add_generation_prompt=True)), model.config.max_position_embeddings
    if n + gen.max_new_tokens > limit:
        raise ContextError(f"the conversation is {n} tokens; with max-new-tokens {gen.max_new_tokens} that is over "
                           f"the model's context of {limit}")
    return messages


def answer(model, tok, messages: list[dict], gen: GenConfig, out: TextIO | None = None,
           interruptible: bool = False) -> str | None:
    """Stream the reply to `out` (default: sys.stdout at call time) and return it; with `interruptible`
    (the REPL), Ctrl-C stops the answer, not the program: what was written so far is the reply, None if
    nothing was."""
    out = out or sys.stdout
    pieces = []
    try:
        for piece in stream_chat(model, tok, messages, gen):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        if not interruptible:
            raise
        out.write(" …(stopped)\n" if pieces else "(stopped)\n")
        out.flush()
        return "".join(pieces) or None
    out.write("\n")
    out.flush()
    return "".join(pieces)


def ask(model, tok, gen: GenConfig, history: list[dict], extra: str | None, question: str) -> None:
    """One REPL turn. A question that cannot be sent (a control token, past the context) leaves the
    conversation as it was, so the session goes on."""
    history.append({"role": "user", "content": question})
    try:
        messages = fitting_conversation(model, tok, history, gen, extra)
    except (ChatFormatError, ContextError) as e:
        history.pop()
        hint = ("" if isinstance(e, ChatFormatError) else
                "; /reset to start over" if history else "; ask something shorter")
        print(f"(not sent: {e}{hint})")
        return
    sys.stdout.write("medlora> ")
    reply = answer(model, tok, messages, gen, interruptible=True)
    if reply is None:  # stopped before any text: the question leaves the conversation too
        history.pop()
    else:
        history.append({"role": "assistant", "content": reply})


def set_system(model, tok, gen: GenConfig, history: list[dict], old: str | None, text: str) -> str | None:
    """/system TEXT: the new instructions replace any earlier ones (the safety prompt always stays);
    returns the text now in force."""
    try:
        fitting_conversation(model, tok, history, gen, text)
    except (ChatFormatError, ContextError) as e:
        print(f"(not set: {e})")
        return old
    print("(replaced the earlier /system text)" if old else "(added after the safety system prompt)")
    return text


def command(model, tok, gen: GenConfig, line: str, history: list[dict], extra: str | None) -> str | None:
    """Run a REPL command other than /quit; returns the /system text it leaves. /reset keeps that text."""
    if line == "/reset":
        history.clear()
        print("(conversation cleared" + ("; the /system text stays: /system clear removes it)" if extra else ")"))
    elif line == "/help":
        print(HELP)
    elif line == "/system":
        print(MEDICAL_SYSTEM_PROMPT + (f"\n\n{extra}" if extra else ""))
    elif line == "/system clear":
        print("(the /system text is removed)" if extra else "(there is no /system text)")
        return None
    elif line.startswith("/system "):
        return set_system(model, tok, gen, history, extra, line[len("/system "):].strip())
    else:
        word = line.split()[0]
        known = word in ("/reset", "/help", "/quit", "/exit")  # e.g. "/reset now"
        print(f"({word} takes nothing after it)" if known else
              f"(unknown command {word}; /help lists them; start with // to send a line beginning with /)")
    return extra


def repl(model, tok, gen: GenConfig) -> None:
    print(f"medlora chat — not a doctor; for emergencies call your local emergency number.\n{HELP}")
    history: list[dict] = []
    extra: str | None = None
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/") and not line.startswith("//"):
            extra = command(model, tok, gen, line, history, extra)
        elif line:
            ask(model, tok, gen, history, extra, line[1:] if line.startswith("//") else line)


HTTP_GROUP = "HTTP server (--http)"  # its flags other than --http are refused without it (main)


def add_http_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(HTTP_GROUP)
    g.add_argument("--http", action="store_true", help="serve the OpenAI-compatible API and the chat page")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("MEDLORA_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $MEDLORA_API_KEY)")
    g.add_argument("--feedback-file", default="feedback.jsonl", help="where POST /v1/feedback appends records")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=2048, help="longest prompt accepted, in tokens")
    g.add_argument("--max-tokens-limit", type=positive_int, default=1024, help="largest max_tokens a request may ask for")
    g.add_argument("--max-body-bytes", type=positive_int, default=1_000_000, help="largest request body accepted")
    g.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; bound to loopback only "
                        "127.0.0.1, localhost and ::1 are, against DNS rebinding; e.g. behind a proxy that passes "
                        "the original Host)")
    g.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting or running at once; more are answered 429, retry later (default %(default)s)")
    g.add_argument("--max-batch", type=positive_int, default=1,
                   help="decode up to N waiting greedy requests together (default 1: one by one, so answers are "
                        "exactly reproducible; >1 is faster under load, see README)")


def http(model, tok, info: dict, args) -> int:
    from medlora.server import LOOPBACK, Settings, serve

    # Bound to loopback, only this machine's names (and --allowed-host) are answered; bound elsewhere the
    # names are the network's, checked only when --allowed-host lists them.
    loopback = args.host in LOOPBACK
    allowed = (LOOPBACK if loopback else frozenset()) | frozenset(args.allowed_host)

    settings = Settings(
        model_id="medlora", base_model=info["id"], adapter=args.adapter, api_key=args.api_key,
        feedback_file=args.feedback_file, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.max_new_tokens,
        max_body_bytes=args.max_body_bytes, max_batch=args.max_batch, max_queue=args.max_queue, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram=args.no_repeat_ngram, no_repeat_keeps_numbers=not args.no_repeat_digits, seed=args.seed,
        allowed_hosts=allowed if loopback or args.allowed_host else None)
    serve(model, tok, settings, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_generation_flags(p, no_repeat_ngram=DEFAULT_NO_REPEAT_NGRAM)  # what eval.py measures too
    model_flag = next(a for a in p._actions if a.dest == "model")
    model_flag.default = None  # None: the default adapter's own base, or the default model without it
    model_flag.help = ("hub id, HF folder, .gguf file, or 'bundled' (default: the base weights the default adapter "
                       "was trained on; with --adapter or --base-only: HuggingFaceTB/SmolLM-135M-Instruct, "
                       "offline the bundled SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format) to apply "
                                                   "(default: the shipped adapters/medlora-r8)")
    p.add_argument("--base-only", action="store_true", help="the plain base model, without the default adapter")
    p.add_argument("--prompt", default=None, help="answer this one question and exit")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--int8", action="store_true", help="int8 weight-only decoding: ~2x faster on a CPU at batch 1 "
                                                           "(bench/results), answers may differ slightly")
    quant.add_argument("--int4", action="store_true", help="int4 layers (groups of 32, as llama.cpp's Q4_1) and an "
                                                           "int8 head: faster again on a CPU at batch 1 (bench/results); "
                                                           "CPU only, answers may differ slightly")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step at startup (about a "
                                                          "minute): faster answers, same tokens (bench/results)")
    add_http_flags(p)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    given = given_flags(p, argv)
    if args.base_only and args.adapter:
        p.error("--base-only and --adapter contradict each other")
    http_only = [f"--{a.dest.replace('_', '-')}" for g in p._action_groups if g.title == HTTP_GROUP
                 for a in g._group_actions if a.dest != "http" and a.dest in given]
    if http_only and not args.http:
        p.error(f"{', '.join(http_only)} only apply with --http")
    problem = revision_unused(args.revision, args.model)  # (no --model: the default adapter's local base)
    if problem:
        p.error(problem)
    warning = sampling_ignored(args, given)
    if warning and not args.http:  # (over HTTP a request may still ask for a temperature)
        print(f"warning: {warning}", file=sys.stderr)
    try:  # check the settings before the slow model load
        gen = GenConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                        no_repeat_ngram=args.no_repeat_ngram, no_repeat_keeps_numbers=not args.no_repeat_digits)
    except ValueError as e:
        p.error(str(e))
    if args.http:
        if args.prompt is not None:
            p.error("--prompt and --http do not go together")
        if args.max_new_tokens > args.max_tokens_limit:
            p.error("--max-new-tokens (the default max_tokens of a request) is above --max-tokens-limit")
        try:
            import fastapi, uvicorn  # noqa: F401  (fail before the slow model load)
        except ImportError as e:
            p.error(f"--http needs fastapi and uvicorn ({e}): pip install -r requirements.txt")
        from medlora.server import feedback_problem

        problem = feedback_problem(args.feedback_file)
        if problem:
            p.error(f"--feedback-file {args.feedback_file}: {problem}")
    model, tok, info = build(args)
    if args.http:
        return http(model, tok, info, args)
    if args.prompt is not None:
        if not args.prompt.strip():
            p.error("--prompt is empty")
        try:
            messages = fitting_conversation(model, tok, [{"role": "user", "content": args.prompt}], gen, None)
        except (ChatFormatError, ContextError) as e:
            print(f"error: --prompt: {e}", file=sys.stderr)
            return 2
        answer(model, tok, messages, gen)
        return 0
    repl(model, tok, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
