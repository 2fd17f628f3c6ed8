"""Talk to the model: a streaming chat REPL, or one answer with --prompt.

    python serve.py                          # interactive; /reset, /system [TEXT], /quit
    python serve.py --prompt "What is anemia?"

Every conversation runs under medlora's safe medical system prompt (medlora/tokenizer.py);
/system TEXT adds instructions after it, never instead of it.
"""
from __future__ import annotations

import argparse
import sys

from medlora.cli import add_generation_flags, add_model_flags, pick_device, pick_dtype
from medlora.generate import GenConfig, stream_chat
from medlora.tokenizer import MEDICAL_SYSTEM_PROMPT, with_safety_prompt

HELP = "commands: /reset (new conversation), /system [TEXT] (show or add instructions), /quit"


def build(args):
    from medlora.weights import load_pretrained

    device = pick_device(args.device)
    model, tok, info = load_pretrained(args.model, args.revision, dtype=pick_dtype(args.dtype, device), device=device)
    if getattr(args, "adapter", None):
        from medlora.lora import load_adapter

        load_adapter(model, args.adapter, merge=True)
        print(f"[medlora] adapter: {args.adapter} (merged)", file=sys.stderr)
    return model, tok


def answer(model, tok, history: list[dict], gen: GenConfig, system_extra: str | None, out=sys.stdout) -> str:
    messages = with_safety_prompt(([{"role": "system", "content": system_extra}] if system_extra else []) + history)
    pieces = []
    for piece in stream_chat(model, tok, messages, gen):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces)


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
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            if text:
                extra = text
                print("(added to the system prompt)")
            else:
                print(MEDICAL_SYSTEM_PROMPT + (f"\n\n{extra}" if extra else ""))
            continue
        if line.startswith("/"):
            print(HELP)
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("medlora> ")
        reply = answer(model, tok, history, gen, extra)
        history.append({"role": "assistant", "content": reply})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_generation_flags(p)
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format) to apply")
    p.add_argument("--prompt", default=None, help="answer this one question and exit")
    args = p.parse_args(argv)
    model, tok = build(args)
    gen = GenConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.prompt is not None:
        if not args.prompt.strip():
            p.error("--prompt is empty")
        answer(model, tok, [{"role": "user", "content": args.prompt}], gen, None)
        return 0
    repl(model, tok, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
