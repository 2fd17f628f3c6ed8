"""The REPL and --prompt mode, driven through a real process and stdin."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


def run(args, stdin=""):
    return subprocess.run([sys.executable, "serve.py", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_prompt_mode_answers_and_exits(gguf_path):
    r = run(["--model", gguf_path, "--prompt", "What is the capital of France?", "--max-new-tokens", "20"])
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "[medlora] model:" in r.stderr  # which model is used goes to stderr, the answer to stdout
    assert "medlora-r8 (merged)" in r.stderr  # the shipped adapter is the default (tests/test_recipe.py)


def test_repl_commands(gguf_path):
    r = run(["--model", gguf_path, "--max-new-tokens", "12"], "Hello\n/system Answer in one word.\n/system\n/reset\n/bogus\n/quit\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("medlora> ") == 1 and "(conversation cleared" in out and "Answer in one word." in out
    assert "You are medlora" in out and "commands:" in out


def feed(monkeypatch, lines: list[str]) -> None:
    """Answer the REPL's input() with these lines, then Ctrl-D."""
    it = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)


def record_sent(monkeypatch, answer: str) -> list[list[dict]]:
    """The conversations the REPL sends to the model, which answers `answer` (no decoding: fast)."""
    import serve

    sent = []
    monkeypatch.setattr(serve, "stream_chat", lambda model, tok, messages, gen: sent.append(messages) or iter([answer]))
    return sent


def test_a_question_past_the_context_is_not_sent_and_the_session_goes_on(ours, monkeypatch, capsys):
    """Generation refuses a prompt with no room for max-new-tokens; the REPL says so and drops that
    question instead of exiting with a traceback (the conversation was lost)."""
    import serve
    from medlora.generate import GenConfig

    model, tok = ours
    first = len(tok.encode_chat(serve.conversation(tok, [{"role": "user", "content": "Hi"}], None),
                                add_generation_prompt=True))
    limit = first + 4 + 30  # "Hi", its answer and a short follow-up fit; 20 sentences do not
    monkeypatch.setattr(model.config, "max_position_embeddings", limit)
    sent = record_sent(monkeypatch, answer="Hello.")
    feed(monkeypatch, ["Hi", "Tell me about the heart. " * 20, "Thanks", "/quit"])
    serve.repl(model, tok, GenConfig(max_new_tokens=4))
    out = capsys.readouterr().out
    assert "(not sent: the conversation is " in out
    assert f"over the model's context of {limit}; /reset to start over)" in out
    assert len(sent) == 2 and out.count("medlora> ") == 2
    asked = [m["content"] for m in sent[1] if m["role"] == "user"]
    assert asked == ["Hi", "Thanks"]  # the first turn kept, the one too long dropped


def test_prompt_past_the_context_is_an_error(ours, monkeypatch, capsys):
    import serve

    model, tok = ours
    monkeypatch.setattr(serve, "build", lambda args: (model, tok, {}))
    too_many = str(model.config.max_position_embeddings - 2)
    assert serve.main(["--prompt", "What is anemia?", "--max-new-tokens", too_many]) == 2
    err = capsys.readouterr().err
    assert "error: --prompt: the conversation is" in err and "Traceback" not in err


def test_repl_commands_say_what_they_do(ours, monkeypatch, capsys):
    """A second /system replaces the first and says so; /system clear; /reset keeps the /system text;
    /systemX and /usr/bin... are unknown commands (not sent, no help dump); //TEXT sends /TEXT."""
    import serve
    from medlora.generate import GenConfig

    model, tok = ours
    sent = record_sent(monkeypatch, answer="ok")
    question = "/usr/bin is where programs live, right?"
    feed(monkeypatch, ["/system Be brief.", "/system Be very brief.", "/systemX", question, "/" + question,
                       "/reset", "/reset now", "/system clear", "/system clear", "Hi", "/quit"])
    serve.repl(model, tok, GenConfig(max_new_tokens=4))
    out = capsys.readouterr().out.split(serve.HELP, 1)[1]  # after the banner
    assert [line for line in out.splitlines() if line.startswith("(")] == [
        "(added after the safety system prompt)", "(replaced the earlier /system text)",
        "(unknown command /systemX; /help lists them; start with // to send a line beginning with /)",
        "(unknown command /usr/bin; /help lists them; start with // to send a line beginning with /)",
        "(conversation cleared; the /system text stays: /system clear removes it)", "(/reset takes nothing after it)",
        "(the /system text is removed)", "(there is no /system text)"]
    assert "commands:" not in out and len(sent) == 2
    system = [m["content"] for m in sent[0] if m["role"] == "system"][0]
    assert system.endswith("\n\nBe very brief.") and "Be brief." not in system and sent[0][-1]["content"] == question
    assert [m["content"] for m in sent[1]][1:] == ["Hi"] and "brief" not in sent[1][0]["content"]


def test_serve_and_eval_default_to_no_repeat_4gram():
    """serve.py's decoding default is the measured pick (docs/recipe/gen_settings.md), and eval.py
    measures that same decoding (what users get); `--no-repeat-ngram 0` is plain greedy in both."""
    import eval as eval_cli
    import serve

    assert serve.build_parser().parse_args([]).no_repeat_ngram == 4
    assert serve.build_parser().parse_args(["--no-repeat-ngram", "0"]).no_repeat_ngram == 0
    assert eval_cli.parse_args(["--adapter", str(ROOT / "adapters" / "medlora-r8")]).no_repeat_ngram == 4
    assert eval_cli.parse_args(["--adapter", str(ROOT / "adapters" / "medlora-r8"),
                                "--no-repeat-ngram", "0"]).no_repeat_ngram == 0
    # Numbers are kept whole by default (generate.NgramBan); --no-repeat-digits is transformers' rule.
    assert not serve.build_parser().parse_args([]).no_repeat_digits
    assert serve.build_parser().parse_args(["--no-repeat-digits"]).no_repeat_digits


def test_bad_flags_fail_before_loading():
    r = run(["--max-new-tokens", "0", "--prompt", "x"])
    assert r.returncode == 2 and "max-new-tokens" in r.stderr
    r = run(["--model", "/no/such/model.gguf", "--base-only", "--prompt", "x"])  # bad input: 2, as for a bad flag
    assert r.returncode == 2 and "error: --model '/no/such/model.gguf': no such file" in r.stderr, r.stderr
    r = run(["--port", "9000", "--max-batch", "4", "--prompt", "x"])  # HTTP settings without --http did nothing
    assert r.returncode == 2 and "--port, --max-batch only apply with --http" in r.stderr, r.stderr


def test_flags_that_would_do_nothing_are_refused_or_flagged(capsys, tmp_path):
    """eval.py and serve.py say so when a flag given would change nothing, instead of ignoring it."""
    import torch

    import eval as eval_cli
    from medlora.cli import precision_name

    adapter = str(ROOT / "adapters" / "medlora-r8")
    with pytest.raises(SystemExit) as e:
        eval_cli.parse_args(["--adapter", adapter, "--base-model", "bundled", "--model", "x/y"])
    assert e.value.code == 2 and "--model is not used" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"  # (eval.py reads a --prompts file when parsing: a bad one fails early)
    prompts.write_text('{"prompt": "What is anemia?"}\n')
    eval_cli.parse_args(["--adapter", adapter, "--prompts", str(prompts), "--limit", "5"])
    assert "warning: --prompts replaces the built-in parts: --limit do nothing" in capsys.readouterr().err
    eval_cli.parse_args(["--adapter", adapter, "--top-k", "5", "--top-p", "0.5", "--seed", "1"])
    assert "--top-k, --top-p: no effect, decoding is greedy" in capsys.readouterr().err  # (eval's seed picks rows)
    eval_cli.parse_args(["--adapter", adapter, "--no-repeat-ngram", "0", "--no-repeat-digits"])
    assert "--no-repeat-digits: no effect, --no-repeat-ngram is 0" in capsys.readouterr().err
    eval_cli.parse_args(["--adapter", adapter, "--no-repeat-digits"])
    assert "no effect" not in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (it was a traceback after --out had been made)
        eval_cli.parse_args(["--adapter", adapter, "--temperature", "0.7", "--top-p", "1.5"])
    assert "--top-p: must be in [0, 1], got 1.5" in capsys.readouterr().err
    # --revision pins hub weights: an error when every model named is local, fine for a hub --model.
    with pytest.raises(SystemExit):
        eval_cli.parse_args(["--adapter", adapter, "--model", "bundled", "--revision", "v1"])
    assert "only a hub id has revisions" in capsys.readouterr().err
    eval_cli.parse_args(["--base-model", "bundled", "--model", "org/tuned", "--revision", "v1"])
    r = run(["--revision", "v1", "--prompt", "x"])  # serve.py's default: the shipped adapter's local base
    assert r.returncode == 2 and "only a hub id has revisions" in r.stderr, r.stderr
    eval_cli.parse_args(["--adapter", adapter, "--top-k", "5", "--temperature", "0.7"])
    assert "warning" not in capsys.readouterr().err
    # The base-answer cache and the report tell float16 from float32 (both were "fp32").
    assert [precision_name(d) for d in (torch.float32, torch.float16, torch.bfloat16)] == ["fp32", "fp16", "bf16"]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantised_prompt_mode(gguf_path, kind):
    """--int8 / --int4 quantise after merging the default adapter and still answer (tests/test_fastpath.py
    checks how close each stays to full precision); the two flags exclude each other."""
    r = run(["--model", gguf_path, f"--{kind}", "--prompt", "What is the capital of France?", "--max-new-tokens", "20"])
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and f"{kind} weights" in r.stderr
    if kind == "int4":
        r = run(["--int8", "--int4", "--prompt", "x"])
        assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_ctrl_c_stops_an_answer_not_the_repl(gguf_path):
    """Ctrl-C mid-answer ends that answer (what was written stays the reply) and the REPL asks for the
    next question; at the prompt it quits as before."""
    import os
    import signal
    import threading
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # SIGINT as a terminal gives it: a test run started in the background by a shell inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler in the child at all.
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", gguf_path, "--base-only", "--max-new-tokens", "400",
                             "--no-repeat-ngram", "0"], cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("Tell me everything about the human heart.\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 240
        while len("".join(out).partition("medlora> ")[2]) < 20:  # some of the answer has streamed
            assert time.monotonic() < deadline and proc.poll() is None, "".join(out)
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        while "(stopped)" not in "".join(out):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(out)
            time.sleep(0.1)
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    text = "".join(out)
    assert " …(stopped)\n" in text and "Traceback" not in text and text.rstrip().endswith("you>")
