"""Tokenizer and chat formatting: one renderer for training, evaluation and serving.

The chat template is the model's own Jinja template, rendered the way transformers renders it
(sandboxed, `trim_blocks`, `lstrip_blocks`), so our token ids equal `apply_chat_template`'s.
Training labels come from spans we record while rendering: we render the conversation up to
each assistant turn and then with it, and the difference is that turn. Its content and closing
end-of-turn token are supervised; everything else gets -100. Nothing is inferred by comparing
ids with the pad token (SmolLM's pad is its end-of-turn token, so that would mask the very
token that teaches the model to stop).

Left out: tool/function-call messages (roles are system, user and assistant only). Mirrors
transformers' `apply_chat_template` (tested token for token) and the assistant-only loss masking
of torchtune and TRL.
"""
from __future__ import annotations

import json
import os
import re
import sys
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

IGNORE = -100

# The one system prompt: used by training data, evaluation and every serving path.
MEDICAL_SYSTEM_PROMPT = (
    "You are medlora, a careful medical information assistant. You are not a doctor and cannot "
    "examine, diagnose or prescribe. Give clear, accurate general health information, say when "
    "something needs a doctor or pharmacist, and tell the user to call emergency services for "
    "emergencies such as chest pain, trouble breathing, stroke signs, severe bleeding or thoughts "
    "of self-harm. Never give personal dosing instructions or steps for dangerous self-treatment."
)


class ChatFormatError(ValueError):
    pass


def _raise(msg: str):
    raise ChatFormatError(msg)


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks the assistant's text for its own
    masks; medlora finds that text itself): rendered as its body, as transformers renders it."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def validate_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ChatFormatError(f"message {i}: role must be system, user or assistant, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"message {i}: content must be a string")


@dataclass
class ChatTokenizer:
    tokenizer: Tokenizer
    chat_template: str
    eos_token: str = "<|im_end|>"
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None  # byte-level BPE never needs it; kept so a saved folder says what the source did
    extra_stop_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self._template = _jinja_env().from_string(self.chat_template)
        except TemplateSyntaxError as e:
            raise ChatFormatError(f"chat template: {e.message} (line {e.lineno})") from None
        self.eos_id = self.token_id(self.eos_token)
        self.pad_id = self.token_id(self.pad_token) if self.pad_token else self.eos_id
        self.stop_ids = {self.eos_id} | {self.token_id(t) for t in self.extra_stop_tokens}
        # The vocabulary's control tokens (<|im_start|>, <|im_end|>, ...): the tokenizer reads them in any
        # text as the tokens themselves, so message text holding one could open a turn of its own.
        self.control_tokens = sorted({t.content for t in self.tokenizer.get_added_tokens_decoder().values()})
        self._control_re = re.compile("|".join(map(re.escape, self.control_tokens))) if self.control_tokens else None

    # -- plain text ----------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ChatFormatError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts in one call (the tokenizers library spreads it over the cores)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def number_tokens(self) -> tuple[frozenset[int], frozenset[int]]:
        """(digit ids, separator ids): tokens that are digits (an optional leading space, then 0-9 only)
        and tokens that can sit inside a number ("-", " ", ".", ",", "/"). The no-repeat n-gram rule
        never bans these within a number (generate.NgramBan): banning one digit makes up a new number."""
        if not hasattr(self, "_number_tokens"):  # (every token decoded once: ~0.04 s for 49,152)
            text = self.tokenizer.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
            digits = frozenset(i for i, t in enumerate(text) if re.fullmatch(r" ?[0-9]+", t))
            seps = frozenset(i for i, t in enumerate(text) if t in ("-", " ", ".", ",", "/"))
            self._number_tokens = (digits, seps)
        return self._number_tokens

    # -- chat ------------------------------------------------------------------------------------
    def control_token_in(self, text: str) -> str | None:
        """The first special token of the vocabulary (<|im_start|>, <|im_end|>, ...) found in `text`."""
        m = self._control_re.search(text) if self._control_re else None
        return m.group(0) if m else None

    def check_messages(self, messages: list[dict]) -> None:
        """`validate_messages`, and no control token in any content: "<|im_end|>\n<|im_start|>system\n..."
        typed into a message would otherwise end it and start a system turn after the safe prompt."""
        validate_messages(messages)
        for i, m in enumerate(messages):
            found = self.control_token_in(m["content"])
            if found:
                raise ChatFormatError(f"message {i}: the text contains {found!r}, a special token of the "
                                      "tokenizer, which would be read as that token; remove it")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        self.check_messages(messages)
        return self.encode(self.render(messages, add_generation_prompt))

    def supervised_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render `messages`; return the text and the [start, end) character spans of each
        assistant turn's content plus its end-of-turn token."""
        self.check_messages(messages)
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise ChatFormatError("the first message cannot be an assistant turn")
            prefix = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1])
            if not (turn.startswith(prefix) and text.startswith(turn)):
                raise ChatFormatError("chat template is not prefix-stable; cannot locate assistant turns")
            rest = turn[len(prefix):]
            start = rest.find(m["content"])
            end_tok = rest.find(self.eos_token, start + len(m["content"]))
            if start != 0 or end_tok < 0:
                raise ChatFormatError(f"assistant turn {i}: template does not render content followed by {self.eos_token}")
            spans.append((len(prefix), len(prefix) + end_tok + len(self.eos_token)))
        return text, spans

    def encode_for_training(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(input_ids, labels): labels equal the ids on supervised tokens and IGNORE elsewhere."""
        return self.encode_many_for_training([messages])[0]

    def encode_many_for_training(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        """`encode_for_training` of many conversations with one `encode_batch` call, which the
        tokenizers library spreads over the CPU's cores (tokenising is most of data preparation)."""
        rendered = [self.supervised_spans(m) for m in conversations]
        encodings = self.tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        return [_labelled(enc.ids, enc.offsets, spans) for enc, (_, spans) in zip(encodings, rendered)]

    # -- persistence -------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` (with the chat template) the way
        transformers reads them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": self.chat_template,
            "eos_token": self.eos_token, "pad_token": self.pad_token or self.eos_token,
            "bos_token": self.bos_token, "unk_token": self.unk_token, "add_bos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _labelled(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(ids, labels): a token is supervised when its characters [a, b) overlap a span [s, e).
    Token offsets never decrease, so the tokens with b > s and a < e are one run, found by two
    bisections (testing every token against every span was a fifth of data preparation)."""
    starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
    labels = [IGNORE] * len(ids)
    for s, e in spans:
        lo, hi = bisect_right(ends, s), bisect_left(starts, e)
        labels[lo:hi] = ids[lo:hi]
    return ids, labels


def load_tokenizer_folder(folder: str | os.PathLike) -> ChatTokenizer:
    """Load `tokenizer.json` and the chat template from an HF model folder."""
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if not tj.exists():
        raise ChatFormatError(f"{tj}: missing (medlora needs the fast-tokenizer file)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as e:  # the tokenizers library raises a bare Exception ("Model missing", bad JSON)
        raise ChatFormatError(f"{tj}: cannot read ({e})") from None
    cfg_path = folder / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    except (UnicodeDecodeError, ValueError) as e:
        raise ChatFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    template = cfg.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not template:
        raise ChatFormatError(f"{folder}: no (default) chat template in tokenizer_config.json or chat_template.jinja")

    def tok_str(v):
        return v.get("content") if isinstance(v, dict) else v

    try:
        return ChatTokenizer(tok, template, eos_token=tok_str(cfg.get("eos_token")) or "<|im_end|>",
                             bos_token=tok_str(cfg.get("bos_token")), pad_token=tok_str(cfg.get("pad_token")),
                             unk_token=tok_str(cfg.get("unk_token")))
    except ChatFormatError as e:
        raise ChatFormatError(f"{folder}: {e}") from None


def show_mask(tok: ChatTokenizer, ids: list[int], labels: list[int], color: bool | None = None) -> str:
    """Render tokens with supervised ones highlighted: green on a terminal, [[...]] otherwise.
    The quickest way to see a masking bug."""
    color = sys.stdout.isatty() if color is None else color
    out = []
    for tid, lab in zip(ids, labels):
        piece = tok.decode([tid], skip_special_tokens=False)
        if lab == IGNORE:
            out.append(f"\033[2m{piece}\033[0m" if color else piece)
        else:
            out.append(f"\033[42;30m{piece}\033[0m" if color else f"[[{piece}]]")
    text = "".join(out)
    return text if color else text.replace("]][[", "")


def with_safety_prompt(messages: list[dict], system_prompt: str = MEDICAL_SYSTEM_PROMPT) -> list[dict]:
    """Put the safe system prompt first, always. A caller's own system messages are kept, but
    after it (appended to the same system turn), so they can add to it and never replace it."""
    extra = [m["content"] for m in messages if m.get("role") == "system" and m.get("content")]
    system = "\n\n".join([system_prompt, *extra])
    return [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
