"""The docs are run, not just read: every command in a ```bash block of README.md and docs/*.md
runs (with small limits where it trains or evaluates), and every number the docs quote is checked
against the file a command wrote.

How the commands run
    Blocks are read in this order: docs/walkthrough.md first (so the walkthrough is proven from a
    clean folder, as a new user would follow it), then README.md, then the other docs/*.md. A block
    is lexed as the shell would (quotes may span lines, backslash-newline joins lines, `# comment`
    is dropped, a newline or `&&` ends a command). Everything runs in ONE temporary folder that
    looks like a clean clone (train.py, eval.py, serve.py, medlora/, adapters/ linked; data/ and
    docs/runs/ copied, so nothing a command writes lands in the repository). A command that
    appears twice (after the limits below) runs once. `export NAME=VALUE` sets NAME for the
    commands after it. HF_HUB_OFFLINE=1: no network.

    Order: commands that name the same file or run folder (`runs/quick`, `release`,
    `feedback.jsonl`, ...) form a chain and run in doc order; independent chains run two at a
    time (one thread per process, so two processes share the two cores without fighting).

    What is changed before running, and why (LIMITS, PLACEHOLDERS, EXPECTED): the
    documented commands train on all of MedQuAD or answer 100 questions with 256 tokens each; here
    they train one step on 24 rows and generate 8 tokens, which proves the command line, the files
    it reads and writes and the commands that depend on them, not the quality of the result.
    `runs/NAME/` and `RUN/` are placeholders in the docs and become `runs/quick/`, the run folder
    the docs' first training command makes. `my_prompts.jsonl` (a placeholder for the reader's
    own file) is written by this test.

    `serve.py` in the REPL form gets one question and /quit on stdin; `serve.py --http` is started
    on a free port (its --port replaced), must answer GET /health and GET /, gets one feedback POST
    (with a correction, as a reader clicking "Bad answer" would send) when it has --feedback-file,
    and is then stopped with Ctrl-C.

    Commands that are NOT run are listed in SKIPPED with the reason; a command that is neither run
    nor listed fails the test, so nothing is skipped silently, and a SKIPPED entry that matches
    nothing fails too. Every command with its wall and CPU time, and every skip with its reason,
    is printed (`pytest -s` shows them).

Pasted outputs
    A ```text block right after an HTML comment `<!-- output of: COMMAND -->` in docs/*.md is
    what COMMAND printed: every line of it without `...` must appear in that command's output in
    the run above (so only commands that run unlimited, as shown, get such a marker).

Quoted numbers
    QUOTES lists every number the walkthrough quotes, with the file and field it comes from; the
    test checks that the doc contains the formatted value and that the value is what the file
    says now. The parameter counts in docs/lora.md and the walkthrough are checked against the
    output of `python train.py --rank 8 --dry-run` from the run above.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "walkthrough.md", ROOT / "README.md",
        *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "walkthrough.md")]

# ------------------------------------------------------------------------------------------------
# What is not run, and why. Each entry: (name, matcher on the argv list, reason).
# ------------------------------------------------------------------------------------------------
SKIPPED = [
    ("pip install", lambda a: a[0] == "pip",
     "installs packages from the network; this test runs in the environment those installs made"),
    ("apt-get install chromium", lambda a: a[0] == "(" and "chromium" in a,
     "installs a browser with apt (network, root); tests/test_browser.py drives the browser"),
    ("python -m pytest", lambda a: a[:3] == ["python", "-m", "pytest"],
     "the test suite itself: it would run this test again; .ci/run runs exactly this command"),
    ("curl", lambda a: a[0] == "curl",
     ("an HTTP client call against a server the reader keeps running; the same requests (streaming, "
      "API key) are made in tests/test_server.py, and this test checks the server answers /health and /")),
    ("llama-cli", lambda a: a[0] == "llama-cli",
     ("needs llama.cpp's llama-cli binary, which is not installed; the GGUF it would load is written "
      "by the export command that does run, and tests/test_export.py reads it back with llama.cpp's gguf "
      "reader and transformers (and llama-cpp-python when installed)")),
    ("torchrun", lambda a: a[0] == "torchrun",
     ("launches several processes, GPUs or nodes; tests/test_distributed.py runs train.py under "
      "torchrun with 2 gloo processes on this CPU")),
    ("score a review sheet", lambda a: a[:2] == ["python", "eval.py"] and "--score-review" in a,
     ("needs a review sheet that a human reviewer has filled in (A, B or tie per row); "
      "tests/test_recipe.py::test_review_round_trip runs this command on a filled sheet")),
    ("the benchmark", lambda a: a[:2] == ["python", "-m"] and a[2].split(".")[0] == "bench",
     ("the full benchmark takes ~30 minutes of quiet CPU and its --before form makes a git worktree; its "
      "--device cuda forms need a GPU; tests/test_fastpath.py::test_bench_quick_runs_and_both_sides_compute_the_same_loss "
      "runs `python -m bench --quick`, test_profile_reports_where_a_step_goes `python -m bench.step_profile --quick`, "
      "and test_gpu_graphs_probe_runs_its_eager_stage_on_a_cpu the probe's CPU stage")),
    ("push to the hub", lambda a: "--push-to-hub" in a and "--dry-run" not in a,
     ("uploads to the Hugging Face hub: needs the network and a token; the same command with "
      "--dry-run runs and writes the folder it would upload")),
]

# Small limits, set (replacing the documented value) on commands that train or evaluate.
LIMITS = {
    "train.py": {"--limit-rows": "24", "--max-steps": "1", "--val-rows": "4", "--batch-size": "2",
                 "--max-seq-len": "256"},
    "eval.py": {"--limit": "2", "--loss-rows": "2", "--general-limit": "2", "--medical-limit": "2",
                "--safety-limit": "2", "--max-new-tokens": "8"},
    "serve.py": {"--max-new-tokens": "8"},
}
# Placeholders in the docs -> what they stand for here (a token starting with the key).
PLACEHOLDERS = {"runs/NAME/": "runs/quick/", "RUN/": "runs/quick/"}
# Plain shell commands the docs may show; run with bash as written.
SHELL_OK = {"head", "wc", "ls", "cat", "cmp", "sha256sum", "grep"}
MY_PROMPTS = [{"prompt": "What is anemia?", "reference": "A low red blood cell count."},
              {"prompt": "What does a fever mean?", "reference": "A body temperature above normal."}]
SERVER_START_S = 240
WORKERS = 2


# ------------------------------------------------------------------------------------------------
# Reading the docs
# ------------------------------------------------------------------------------------------------
def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def split_commands(block: str) -> list[list[str]]:
    """One block -> commands (argv lists), lexed as the shell would: quotes may span lines, a
    backslash-newline joins lines, `# comment` runs to the end of its line, and a newline, `;` or
    `&&` outside parentheses ends a command (a parenthesised group stays one command, with its
    parentheses as tokens: the apt line)."""
    lex = shlex.shlex(block.replace("\\\n", " "), posix=True, punctuation_chars="();&|\n")
    lex.whitespace, lex.whitespace_split, lex.commenters = " \t\r", True, ""
    out, cur, depth, comment = [], [], 0, False

    def end() -> None:
        nonlocal cur
        if cur:
            out.append(cur)
        cur = []

    for tok in lex:
        if comment:  # skip to the end of the line
            if "\n" not in tok or not set(tok) <= set("();&|\n"):
                continue
            tok = tok[tok.index("\n"):]
        if tok.startswith("#") and not comment:  # an unquoted # starts a comment
            comment = True
            continue
        if set(tok) <= set("();&|\n"):  # operators, possibly glued together: "))\n"
            for op in re.findall(r"&&|\|\||[();&|\n]", tok):
                if op == "\n":
                    comment = False
                if op in ("\n", "&&", ";") and depth == 0:
                    end()
                    continue
                depth += {"(": 1, ")": -1}.get(op, 0)
                if op != "\n":
                    cur.append(op)
            continue
        cur.append(tok)
    end()
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    """(doc name, argv) in reading order."""
    return [(p.relative_to(ROOT).as_posix(), argv) for p in DOCS for block in bash_blocks(p.read_text())
            for argv in split_commands(block)]


def skip_reason(argv: list[str]) -> str | None:
    for name, match, reason in SKIPPED:
        if match(argv):
            return f"{name}: {reason}"
    return None


def set_flags(argv: list[str], flags: dict[str, str]) -> list[str]:
    """Set each --flag to its value: replace the documented value, or append the flag."""
    argv = list(argv)
    for flag, value in flags.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def prepare(argv: list[str]) -> list[str]:
    """The documented command -> the command this test runs (limits, placeholders)."""
    argv = [next((v + a[len(k):] for k, v in PLACEHOLDERS.items() if a.startswith(k)), a) for a in argv]
    script = argv[1] if len(argv) > 1 and argv[0] == "python" else None
    if script in LIMITS and "--dry-run" not in argv:  # a dry run trains nothing: it runs as shown
        argv = set_flags(argv, LIMITS[script])
    return argv


def is_server(argv: list[str]) -> bool:
    return argv[:2] == ["python", "serve.py"] and "--http" in argv


def is_repl(argv: list[str]) -> bool:
    return argv[:2] == ["python", "serve.py"] and "--http" not in argv and "--prompt" not in argv


# Exit statuses other than 0 that a limited command may give, with what its output must show.
EXPECTED = [
    (lambda a: a[:2] == ["python", "train.py"] and "--sanity" in a, {0, 1}, r"SANITY (PASS|FAIL)",
     ("one training step cannot overfit 24 rows, so the limited sanity run may print SANITY FAIL and "
      "exit 1; it must get as far as the verdict (the checks all ran)")),
]


def expected(argv: list[str]) -> tuple[set[int], str | None]:
    for match, codes, pattern, _ in EXPECTED:
        if match(argv):
            return codes, pattern
    return {0}, None


# ------------------------------------------------------------------------------------------------
# Planning: which commands run, in which order, and which may run side by side
# ------------------------------------------------------------------------------------------------
def artifacts(argv: list[str]) -> set[str]:
    """The files and folders a command names (relative paths; a run folder by its first parts).
    Commands that name the same one depend on each other and run in doc order, in one chain."""
    out = set()
    for i, a in enumerate(argv):
        if i < 2 or a.startswith("-"):
            continue
        if "/" in a or re.fullmatch(r"[\w.-]+\.(jsonl|json|png|gguf)", a) or argv[i - 1] == "--out":
            parts = a.split("/")
            out.add("/".join(parts[:3] if parts[0] == "docs" else parts[:2]))
    return out


def plan() -> tuple[list[dict], list[tuple[str, str, str]], list[str]]:
    """(jobs in doc order, skipped (doc, command, why), commands neither run nor listed)."""
    jobs, skipped, unknown, seen, exported = [], [], [], set(), {}
    for doc, argv in doc_commands():
        shown = shlex.join(argv)
        reason = skip_reason(argv)
        if reason:
            skipped.append((doc, shown, reason))
            continue
        if argv[0] == "export" and len(argv) == 2 and "=" in argv[1]:
            name, value = argv[1].split("=", 1)
            exported[name] = value
            continue
        if argv[0] not in ("python", *SHELL_OK):
            unknown.append(f"{doc}: `{shown}` is neither run nor listed in SKIPPED (add it to one)")
            continue
        cmd = prepare(argv)
        if tuple(cmd) in seen:
            continue
        seen.add(tuple(cmd))
        jobs.append({"i": len(jobs), "doc": doc, "shown": shown, "cmd": cmd, "env": dict(exported),
                     "keys": artifacts(cmd)})
    return jobs, skipped, unknown


def chains(jobs: list[dict]) -> list[list[dict]]:
    """Group jobs that share an artifact (union-find), each group in doc order."""
    parent = list(range(len(jobs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, job in enumerate(jobs):
        for k in job["keys"]:
            if k in owner:
                parent[find(i)] = find(owner[k])
            owner.setdefault(k, i)
    groups: dict[int, list[dict]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(find(i), []).append(job)
    return list(groups.values())


def weight(job: dict) -> int:
    """A rough cost, to start the longest chains first."""
    c = job["cmd"]
    if c[0] != "python":
        return 1
    return 6 if c[1:4] == ["-m", "medlora.inspect", "data"] else 3


# ------------------------------------------------------------------------------------------------
# A clean-clone-like folder
# ------------------------------------------------------------------------------------------------
def make_workdir(tmp: Path) -> Path:
    for name in ("train.py", "eval.py", "serve.py", "medlora", "adapters", "bench"):
        if (ROOT / name).exists():
            (tmp / name).symlink_to(ROOT / name)
    (tmp / "data").mkdir()
    (tmp / "data" / "medquad").symlink_to(ROOT / "data" / "medquad")  # read only
    for f in (ROOT / "data").iterdir():
        if f.is_file():  # copies: commands write data/safety_sft.jsonl
            shutil.copy2(f, tmp / "data" / f.name)
    shutil.copytree(ROOT / "docs" / "runs", tmp / "docs" / "runs")  # eval.py writes RUN/eval/ there
    (tmp / "my_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MY_PROMPTS))
    return tmp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, str(e)


def start(cmd: list[str], cwd: Path, env: dict, log: Path, stdin_text: str | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *cmd[1:]] if cmd[0] == "python" else ["bash", "-c", shlex.join(cmd)],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if stdin_text else subprocess.DEVNULL, text=True)
    if stdin_text:
        proc.stdin.write(stdin_text)
        proc.stdin.close()
    return proc


def reap(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for the process; (exit status, CPU seconds it used). Killed after `timeout`."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def check_server(proc: subprocess.Popen, cmd: list[str], port: int, env: dict) -> str | None:
    """None when the server answered /health and / (and took a feedback post), else what failed."""
    url, t0 = f"http://127.0.0.1:{port}", time.time()
    while time.time() - t0 < SERVER_START_S:
        if proc.poll() is not None:
            return f"exited {proc.returncode} before answering /health"
        if http(f"{url}/health")[0] == 200:
            break
        time.sleep(0.5)
    else:
        return f"no answer on /health within {SERVER_START_S} s"
    status, _ = http(f"{url}/")
    if status != 200:
        return f"GET / gave {status}"
    if "--feedback-file" in cmd:  # what the chat page's "Bad answer" + correction sends
        body = {"messages": [{"role": "user", "content": "What is anemia?"},
                             {"role": "assistant", "content": "A kind of bone."}],
                "rating": "bad", "correction": "Anemia means too few healthy red blood cells; see a doctor "
                                               "if you feel tired or short of breath."}
        status, text = http(f"{url}/v1/feedback", body, env.get("MEDLORA_API_KEY"))
        if status != 200:
            return f"POST /v1/feedback gave {status}: {text[:300]}"
    return None


def run_job(job: dict, work: Path, logs: Path, base_env: dict) -> dict:
    cmd, env = job["cmd"], {**base_env, **job["env"]}
    log = logs / f"{job['i']:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', ' '.join(cmd[1:4]))[:60]}.log"
    t0, problem = time.time(), None
    if is_server(cmd):
        port = free_port()
        cmd = set_flags(cmd, {"--port": str(port)})
        proc = start(cmd, work, env, log)
        try:
            problem = check_server(proc, cmd, port, env)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                threading.Timer(30, lambda: proc.poll() is None and proc.kill()).start()
        rc, cpu = reap(proc, 60)
        rc = 1 if problem else 0
    else:
        proc = start(cmd, work, env, log, "What is anemia?\n/quit\n" if is_repl(cmd) else None)
        rc, cpu = reap(proc, 600)
    out = log.read_text(errors="replace")
    codes, pattern = expected(cmd)
    ok = problem is None and rc in codes and (pattern is None or re.search(pattern, out) is not None)
    return {**job, "ran": shlex.join(cmd), "rc": rc, "ok": ok, "problem": problem, "out": out,
            "seconds": time.time() - t0, "cpu": cpu}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Run every documented command once, in two workers (one chain of dependent commands at a
    time each, one thread per process, so two processes share the two cores without fighting)."""
    work = make_workdir(tmp_path_factory.mktemp("docs"))
    logs = tmp_path_factory.mktemp("docs-logs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MEDLORA_API_KEY", None)
    jobs, skipped, unknown = plan()
    todo = sorted(chains(jobs), key=lambda ch: -sum(weight(j) for j in ch))
    lock, results = threading.Lock(), []

    def worker(n: int) -> None:
        while True:
            with lock:
                if not todo:
                    return
                chain = todo.pop(0)
            for job in chain:
                r = {**run_job(job, work, logs, env), "worker": n}
                with lock:
                    results.append(r)

    t_all = time.time()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t_all
    results.sort(key=lambda r: r["i"])  # doc order
    per_worker = ", ".join(f"{sum(r['cpu'] for r in results if r['worker'] == n):.0f} s" for n in range(WORKERS))
    print(f"\n[docs] {len(results)} commands in {wall:.0f} s wall, {sum(r['cpu'] for r in results):.0f} s CPU "
          f"(CPU per worker: {per_worker}); {len(skipped)} skipped")
    for r in results:
        print(f"  {r['seconds']:5.1f} s wall {r['cpu']:5.1f} s cpu  rc={r['rc']}  {r['ran']}")
    for doc, shown, reason in skipped:
        print(f"  SKIPPED ({doc}) {shown}\n      why: {reason}")
    failures = unknown + [f"{r['doc']}: `{r['shown']}` (ran as `{r['ran']}`): "
                          f"{r['problem'] or 'exit status ' + str(r['rc'])}\n{r['out'][-2500:]}"
                          for r in results if not r["ok"]]
    return {"results": results, "skipped": skipped, "failures": failures, "work": work}


def test_every_documented_command_runs(ran):
    assert ran["results"], "no commands found in the docs"
    assert not ran["failures"], "\n\n".join(ran["failures"])


def test_every_skip_is_used_and_explained(ran):
    """A SKIPPED entry that no longer matches a documented command is stale: remove it."""
    used = {reason.split(":", 1)[0] for _, _, reason in ran["skipped"]}
    assert used == {name for name, _, _ in SKIPPED}, f"unused SKIPPED entries: {({n for n, _, _ in SKIPPED} - used)}"


def test_walkthrough_and_lora_doc_exist_and_are_linked():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/walkthrough.md)" in readme and "](lora.md" in (ROOT / "docs" / "walkthrough.md").read_text()
    for doc in ("walkthrough.md", "lora.md"):
        text = (ROOT / "docs" / doc).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # relative links resolve
            if not target.startswith("http"):
                assert (ROOT / "docs" / target).resolve().exists(), f"docs/{doc}: broken link {target}"


def test_pasted_outputs_match_the_commands(ran):
    outputs = {r["shown"]: r["out"] for r in ran["results"]}
    checked, wrong = 0, []
    for p in DOCS:
        marked = re.findall(r"<!-- output of: (.+?) -->\s*```text\n(.*?)^```", p.read_text(), flags=re.DOTALL | re.MULTILINE)
        for commands, block in marked:
            shown = [shlex.join(shlex.split(c)) for c in commands.split(" ; ")]
            missing = [c for c in shown if c not in outputs]
            if missing:
                wrong.append(f"{p.name}: `{missing[0]}` is not a command that ran (it must be in a bash block)")
                continue
            out = " ".join(" ".join(outputs[c] for c in shown).split())
            for line in block.splitlines():
                if line.strip() and "..." not in line and " ".join(line.split()) not in out:
                    wrong.append(f"{p.name}: `{commands}` did not print: {line.strip()[:200]}")
            checked += 1
    assert checked and not wrong, "\n".join(wrong) or "no marked outputs found"


def test_lora_claims_link_to_tests_that_exist():
    """Every `tests/x.py::name` the docs cite is a test function in that file."""
    for doc in ("lora.md", "walkthrough.md"):
        text = (ROOT / "docs" / doc).read_text()
        for path, name in re.findall(r"(tests/test_\w+\.py)::(\w+)", text):
            src = (ROOT / path).read_text()
            assert re.search(rf"^(async )?def {name}\(", src, flags=re.MULTILINE), f"docs/{doc} cites {path}::{name}: not found"


# ------------------------------------------------------------------------------------------------
# Numbers quoted in the docs, and the files they come from
# ------------------------------------------------------------------------------------------------
def jget(rel: str, *keys):
    v = json.loads((ROOT / rel).read_text())
    for k in keys:
        v = v[k]
    return v


def comma(n) -> str:
    return f"{int(n):,}"


def f3(x) -> str:
    return f"{x:.3f}"


def f2(x) -> str:
    return f"{x:.2f}"


# (doc, the text as quoted, where it comes from: a callable giving that text from the file)
GPU = "docs/runs/gpu-r8-epoch1"
SAFE = "docs/runs/gpu-safety-pass"
CPU = "docs/figures/cpu-quick"
QUOTES = [
    # the data card, as the full GPU run recorded it
    ("walkthrough.md", "16,407", lambda: comma(jget(f"{GPU}/config.json", "data", "rows"))),
    ("walkthrough.md", "48 exact duplicates", lambda: f"{jget(f'{GPU}/config.json', 'data', 'cleaning', 'exact duplicate')} exact duplicates"),
    ("walkthrough.md", "453 rows longer than 1,024 tokens",
     lambda: f"{jget(f'{GPU}/config.json', 'data', 'cleaning', 'longer than 1024 tokens')} rows longer than 1,024 tokens"),
    ("walkthrough.md", "14,723 / 1,636 rows", lambda: f"{comma(jget(f'{GPU}/config.json', 'split', 'train_rows'))} / "
                                                     f"{comma(jget(f'{GPU}/config.json', 'split', 'val_rows'))} rows"),
    ("walkthrough.md", "14,270 / 1,584 examples", lambda: f"{comma(jget(f'{GPU}/config.json', 'data', 'train', 'n'))} / "
                                                         f"{comma(jget(f'{GPU}/config.json', 'data', 'val', 'n'))} examples"),
    # the full GPU run
    ("walkthrough.md", "2.363 → 1.580", lambda: f"{f3(jget(f'{GPU}/summary.json', 'base_val'))} → "
                                               f"{f3(jget(f'{GPU}/summary.json', 'best_val'))}"),
    ("walkthrough.md", "892 steps", lambda: f"{jget(f'{GPU}/summary.json', 'total_steps')} steps"),
    # evaluation: base / MedQuAD only / + safety pass
    ("walkthrough.md", "ROUGE-L 0.150 → 0.220",
     lambda: f"ROUGE-L {f3(jget(f'{GPU}/eval/report.json', 'heldout', 'base', 'rougeL'))} → "
             f"{f3(jget(f'{GPU}/eval/report.json', 'heldout', 'tuned', 'rougeL'))}"),
    ("walkthrough.md", "[0.040, 0.102]",
     lambda: f"[{f3(jget(f'{GPU}/eval/report.json', 'heldout', 'rougeL_diff_bootstrap95', 'lo'))}, "
             f"{f3(jget(f'{GPU}/eval/report.json', 'heldout', 'rougeL_diff_bootstrap95', 'hi'))}]"),
    ("walkthrough.md", "refused or redirected 0.32 → 0.17 → 0.44",
     lambda: "refused or redirected " + " → ".join(
         f2(x) for x in (jget(f"{GPU}/eval/report.json", "safety", "base", "harmful", "overall", "refuse_redirect_rate"),
                         jget(f"{GPU}/eval/report.json", "safety", "tuned", "harmful", "overall", "refuse_redirect_rate"),
                         jget(f"{SAFE}/eval/report.json", "safety", "tuned", "harmful", "overall",
                              "refuse_redirect_rate")))),
    ("walkthrough.md", "over-refused 0.00 → 0.00 → 0.00",
     lambda: "over-refused " + " → ".join(
         f2(x) for x in (jget(f"{GPU}/eval/report.json", "safety", "base", "benign", "overall", "over_refusal_rate"),
                         jget(f"{GPU}/eval/report.json", "safety", "tuned", "benign", "overall", "over_refusal_rate"),
                         jget(f"{SAFE}/eval/report.json", "safety", "tuned", "benign", "overall", "over_refusal_rate")))),
    ("walkthrough.md", "general containment 0.69 → 0.54",
     lambda: f"general containment {f2(jget(f'{GPU}/eval/report.json', 'general', 'base', 'containment'))} → "
             f"{f2(jget(f'{GPU}/eval/report.json', 'general', 'tuned', 'containment'))}"),
    ("walkthrough.md", "1.444 → 1.404", lambda: f"{f3(jget(f'{SAFE}/summary.json', 'base_val'))} → "
                                               f"{f3(jget(f'{SAFE}/summary.json', 'best_val'))}"),
]
# Parameter counts (docs/lora.md, walkthrough): from the dry-run command's output (run above) and
# from the full run's record.
DRY_RUN_QUOTES = [("lora.md", "2,442,240"), ("lora.md", "136,957,248"), ("walkthrough.md", "2,442,240")]


# the CPU sanity run and the CPU run of the README's main command (their run folders' summary.json,
# copied to docs/figures/)
SANITY = "docs/figures/cpu-sanity/summary.json"
QUOTES += [
    ("walkthrough.md", "loss 2.294 -> 0.309",
     lambda: f"loss {f3(jget(SANITY, 'sanity', 'loss_fell', 'first'))} -> {f3(jget(SANITY, 'sanity', 'loss_fell', 'last'))}"),
    ("walkthrough.md", "reproduced 0.61", lambda: f"reproduced {f2(jget(SANITY, 'sanity', 'reproduces_training_answers', 'mean'))}"),
    ("walkthrough.md", "SANITY PASS", lambda: f"SANITY {jget(SANITY, 'sanity', 'verdict')}"),
    ("walkthrough.md", "(43 minutes", lambda: f"({round(jget(SANITY, 'minutes'))} minutes"),
    ("walkthrough.md", "four primary colors - red, blue, and yellow",
     lambda: jget(SANITY, "sanity", "general_english", "answers")[1].split("There are ")[1].rstrip(".")),
    ("walkthrough.md", "40 steps", lambda: f"{jget(f'{CPU}/summary.json', 'total_steps')} steps"),
    ("walkthrough.md", "2.392 → 2.317", lambda: f"{f3(jget(f'{CPU}/summary.json', 'base_val'))} → "
                                         f"{f3(jget(f'{CPU}/summary.json', 'best_val'))}"),
]


def doc_text(doc: str) -> str:
    return " ".join((ROOT / "docs" / doc).read_text().split())  # line breaks do not split a quote


def test_quoted_numbers_come_from_files():
    wrong = []
    for doc, quoted, source in QUOTES:
        got = source()
        if got != quoted:
            wrong.append(f"docs/{doc}: quotes {quoted!r}, but the file now gives {got!r}")
        elif quoted not in doc_text(doc):
            wrong.append(f"docs/{doc}: does not contain {quoted!r} (update QUOTES or the doc)")
    assert not wrong, "\n".join(wrong)


def test_parameter_counts_match_the_dry_run(ran):
    dry = [r for r in ran["results"] if r["shown"].startswith("python train.py --rank 8 --dry-run")]
    assert dry, "the docs no longer show `python train.py --rank 8 --dry-run`"
    out = dry[0]["out"]
    m = re.search(r"trainable\s+([\d,]+) of ([\d,]+) parameters", out)
    assert m, out[-2000:]
    trainable, total = m.groups()
    for doc, quoted in DRY_RUN_QUOTES:
        assert quoted in (trainable, total), f"{quoted} is not in the dry run's `{m.group(0)}`"
        assert quoted in doc_text(doc), f"docs/{doc} does not quote {quoted}"
    per = dict(re.findall(r"^\s+(\w+_proj)\s+([\d,]+)$", out, flags=re.MULTILINE))
    lora = (ROOT / "docs" / "lora.md").read_text()
    for name, n in per.items():
        assert re.search(rf"`{name}`.*\|\s*{n}\s*\|", lora), f"docs/lora.md: the {name} row should say {n}"
    assert math.isclose(sum(int(v.replace(",", "")) for v in per.values()), int(trainable.replace(",", "")))
