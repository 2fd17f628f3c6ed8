"""Faults: SIGKILL at any moment (mid-checkpoint-write too), SIGINT/SIGTERM, non-finite losses,
a full disk or unwritable folder, failed checkpoint writes, and pickle-bearing checkpoint files.

The kill test runs a real training process: this file run as a script (see the bottom) trains the
tiny model on synthetic data with a checkpoint every step, and its checkpoint writes are slowed
(half the bytes, a pause, the rest) so that kills land inside a write.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shlex
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medlora import checkpoint as ckpt  # noqa: E402
from medlora import trainer  # noqa: E402
from medlora.config import LoRAConfig  # noqa: E402
from medlora.data import Dataset  # noqa: E402
from medlora.trainer import TrainConfig, train  # noqa: E402
from helpers import one_thread  # noqa: E402, F401 (autouse: every test here runs on one thread)

STEPS = 40


def tiny_run(run_dir: Path, steps: int = STEPS, resume: bool = False, on_step=None,
             **over) -> tuple[dict, torch.nn.Module]:
    from test_trainer import lora_model, synthetic

    cfg = TrainConfig(**{**dict(lr=5e-3, max_steps=steps, batch_size=4, grad_accum=2, warmup_steps=2, eval_every=10,
                                save_every=1, patience=0, seed=1), **over})
    model = lora_model()
    out = train(model, Dataset(synthetic(40), synthetic(6, seed=9)), cfg, LoRAConfig(rank=4, alpha=8), run_dir,
                pad_id=2, base_model_id="tiny", resume=resume, on_step=on_step, log=lambda *a: None)
    return out, model


def worker(run_dir: Path) -> None:
    """The process the kill test kills: resumes whenever a checkpoint exists, prints `saved N`
    once step N's checkpoint is on disk (on_step runs after the save), `done` at the end.
    FAULT_HANG_SAVE=k makes its k-th checkpoint write stop after FAULT_CUT of the bytes and wait
    (printing `hanging`), so the test can kill it with a half-written checkpoint file."""
    torch.set_num_threads(1)
    os.fsync = lambda fd: None  # fsync guards against power loss, not process death; a busy disk makes it slow
    hang_at, cut = int(os.environ.get("FAULT_HANG_SAVE", "0")), float(os.environ.get("FAULT_CUT", "0.5"))
    real_save, saves = torch.save, [0]

    def cut_short_save(obj, f, *a, **k):
        saves[0] += 1
        if saves[0] != hang_at:
            return real_save(obj, f, *a, **k)
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: int(cut * len(buf.getvalue()))])
        f.flush()
        print("hanging", flush=True)
        time.sleep(600)

    torch.save = cut_short_save
    tiny_run(run_dir, resume=(run_dir / "checkpoint.pt").exists(), eval_every=1000,
             on_step=lambda state: print(f"saved {state['step']}", flush=True))
    print("done", flush=True)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in recs]


def test_sigkill_at_random_moments_then_resume(tmp_path):
    """Kill -9 a real training run 8 times (seeded: during start-up, at a random moment after a
    random number of saved steps, and in the middle of checkpoint writes), resume each time; the
    result must be the uninterrupted run's, bit for bit."""
    # MKL's default kernels may round differently with the memory alignment of their inputs, which
    # differs between processes; its strict reproducible mode makes the comparison bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MKL_CBWR": "AUTO,STRICT"}
    r = subprocess.run([sys.executable, __file__, str(tmp_path / "ref")], capture_output=True, text=True, env=env,
                       timeout=120)  # the uninterrupted run
    assert r.returncode == 0 and r.stdout.rstrip().endswith("done"), r.stderr[-2000:]
    rng = random.Random(8)
    run = tmp_path / "killed"
    plans = ["startup", "mid-save", "after-save", "mid-save"]
    plans += [rng.choice(["mid-save", "after-save"]) for _ in range(4)]
    kills, cut_writes, last_saved = 0, 0, 0
    for plan in plans + ["finish"]:
        want, cut = rng.randint(2, 4), rng.uniform(0.05, 0.95)  # the 2nd+ save: every launch makes progress
        hang = {"FAULT_HANG_SAVE": str(want), "FAULT_CUT": str(cut)} if plan == "mid-save" else {}
        p = subprocess.Popen([sys.executable, __file__, str(run)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env={**env, **hang})
        if plan == "startup":  # anywhere in start-up: imports, step-0 evaluation, the first steps
            time.sleep(rng.uniform(0.5, 4.0))
        elif plan != "finish":
            seen = 0
            for line in p.stdout:
                if line.startswith("saved"):
                    last_saved, seen = int(line.split()[1]), seen + 1
                if plan == "mid-save" and line.strip() == "hanging":
                    break
                if plan == "after-save" and seen == want:
                    time.sleep(rng.uniform(0, 0.05))  # somewhere in the following step or save
                    break
        if plan == "finish":
            assert p.wait(timeout=120) == 0
            break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        kills += 1
        for line in p.stdout.read().splitlines():  # what it printed before dying, not yet read
            if line.startswith("saved"):
                last_saved = int(line.split()[1])
        if plan == "mid-save":  # the cut-short write is there, beside an intact checkpoint
            assert (run / "checkpoint.pt.tmp").exists()
            cut_writes += 1
        if (run / "checkpoint.pt").exists():  # the latest checkpoint always loads, and lost no saved step
            step = ckpt.load(run / "checkpoint.pt")["state"]["step"]
            assert last_saved <= step <= last_saved + 1, (plan, step, last_saved)
        else:
            assert last_saved == 0
    print(f"plans {plans}; survived {kills} SIGKILLs ({cut_writes} with a checkpoint write cut short)")
    assert kills == len(plans) == 8 and cut_writes >= 2
    assert not (run / "checkpoint.pt.tmp").exists()
    assert ckpt.load(run / "checkpoint.pt")["state"]["step"] == STEPS
    a, b = adapter(tmp_path / "ref"), adapter(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    la, lb = train_losses(run), train_losses(tmp_path / "ref")
    assert la == lb, [(x, y) for x, y in zip(la, lb) if x != y][:3] or (len(la), len(lb))  # reads like one run


# ---------------------------------------------------------------------------------------------
# SIGINT / SIGTERM through train.py: checkpoint, the exact resume command, exit status 130
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    from test_distributed import make_tiny_hf_folder

    return make_tiny_hf_folder(tmp_path_factory.mktemp("tiny") / "model")


CLI_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start_cli(model: Path, out: Path, steps: int) -> subprocess.Popen:
    from test_distributed import TINY_ARGS

    return subprocess.Popen([sys.executable, "train.py", "--model", str(model), *TINY_ARGS, "--max-steps", str(steps),
                             "--save-every", "5", "--eval-every", "1000", "--val-rows", "2", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV)


def wait_for(path: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_prints_resume_command_and_exits_130(tiny_model_folder, tmp_path, sig):
    out = tmp_path / "run"
    p = start_cli(tiny_model_folder, out, steps=40)
    wait_for(out / "checkpoint.pt", p)  # training is under way
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    step = ckpt.load(out / "checkpoint.pt")["state"]["step"]
    assert 5 <= step < 40 and f"interrupted at step {step} of 40" in stdout
    cmd = re.search(r"Resume with:\n  (.+)", stdout).group(1)
    assert cmd.startswith("python train.py ") and cmd.endswith(" --resume") and f"--out {out}" in cmd
    if sig == signal.SIGTERM:  # the printed command really continues the run to the end
        argv = shlex.split(cmd)[2:]
        r = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=CLI_ENV)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"resumed from {out / 'checkpoint.pt'} at step {step}" in r.stdout + r.stderr
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in x]
        assert steps == list(range(1, 41))


# ---------------------------------------------------------------------------------------------
# Non-finite loss: stop (default) keeping the last good checkpoint, or skip the batch
# ---------------------------------------------------------------------------------------------
def nan_at_step(monkeypatch, bad_step: int) -> None:
    """Make the loss of the first micro-batch of optimizer step `bad_step` NaN."""
    real, calls = trainer.batch_loss, {"n": 0}

    def poisoned(model, ids, labels, precision, share_prefix=True):
        loss, n = real(model, ids, labels, precision, share_prefix)
        if model.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2 * (bad_step - 1) + 1:  # grad_accum = 2 micro-batches per step
                loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(trainer, "batch_loss", poisoned)


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 4)
    with pytest.raises(FloatingPointError) as e:
        tiny_run(tmp_path / "run", steps=8)
    msg = str(e.value)
    assert "not finite at step 4" in msg and "--on-nan skip" in msg and "(step 3), is kept" in msg
    c = ckpt.load(tmp_path / "run" / "checkpoint.pt")
    assert c["state"]["step"] == 3 and all(torch.isfinite(t).all() for t in c["lora"].values())


def test_nan_skip_drops_the_batch_and_goes_on(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 4)
    out, model = tiny_run(tmp_path / "run", steps=8, nan_policy="skip")
    assert out["step"] == 8 and not out["interrupted"]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]  # step 0 and the last are validation records too
    assert recs[4]["skipped"] and recs[4]["loss"] is None  # the skipped batch is on record
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_skipped_last_step_still_evaluates_and_saves(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 8)
    out, _ = tiny_run(tmp_path / "run", steps=8, nan_policy="skip", eval_every=4, save_every=4)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "val"] == [0, 4, 8]
    assert ckpt.load(tmp_path / "run" / "checkpoint.pt")["state"]["step"] == 8 == out["step"]


@pytest.mark.parametrize("target", ["metrics.jsonl", "best_adapter"])
def test_a_failed_write_outside_the_checkpoint_is_a_checkpoint_error(tmp_path, target):
    """A full disk while writing metrics or the best adapter: the same clear error (train.py: exit 4) as a
    failed checkpoint write, naming the path and the checkpoint that is kept, not a traceback."""
    def break_target(state):
        if state["step"] == 2:
            path = tmp_path / "run" / target
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            path.mkdir() if target == "metrics.jsonl" else path.write_text("in the way")

    with pytest.raises(ckpt.CheckpointError, match=rf"cannot write .*{target}: .*\(step 2\), is kept"):
        tiny_run(tmp_path / "run", steps=6, eval_every=1, on_step=break_target)


def test_a_rerun_never_replaces_a_run_silently(tmp_path, capsys):
    import train as train_cli

    run = tmp_path / "run"
    (run / "best_adapter").mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"step 6")
    (run / "config.json").write_text("{}")
    (run / "notes.txt").write_text("the user's own file")
    assert train_cli.main(["--out", str(run)]) == 2
    assert "already holds a run (checkpoint.pt, config.json, best_adapter)" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == b"step 6"
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--out", str(run), "--resume", "--overwrite"])
    assert "choose one" in capsys.readouterr().err
    train_cli.clear_run(run)  # what --overwrite does first: the run's own files only
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# Storage: a full disk or unwritable folder is reported before training; a failed checkpoint
# write never replaces the good one and leaves no .tmp
# ---------------------------------------------------------------------------------------------
def test_not_enough_free_space_is_an_error_before_training(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(ckpt.CheckpointError, match="only 1.0 MiB free"):
        tiny_run(tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unwritable_out_folder_is_a_clear_error(tmp_path, capsys):
    import train as train_cli

    (tmp_path / "file").write_text("not a folder")
    assert train_cli.main(["--out", str(tmp_path / "file" / "run")]) == 2
    assert "not writable" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="cannot create the run folder"):
        tiny_run(tmp_path / "file" / "run")


def _fail_at(stage: str, monkeypatch) -> None:
    real_save = torch.save

    def half_then_enospc(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def boom(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    if stage == "write":
        monkeypatch.setattr(torch, "save", half_then_enospc)
    else:
        monkeypatch.setattr(ckpt.os, {"fsync": "fsync", "rename": "replace"}[stage], boom)


@pytest.mark.parametrize("stage", ["write", "fsync", "rename"])
def test_failed_checkpoint_write_keeps_the_good_one(tmp_path, monkeypatch, stage):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    _fail_at(stage, monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match="the previous checkpoint, if any, is unchanged"):
        ckpt.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good and ckpt.load(path)["step"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"]  # no stray .tmp


def test_failed_write_during_training_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch):
    def fail_from_step_3(state):
        if state["step"] == 2:
            _fail_at("write", monkeypatch)

    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        tiny_run(tmp_path / "run", steps=6, on_step=fail_from_step_3)
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "run" / "checkpoint.pt")["state"]["step"] == 2
    assert not (tmp_path / "run" / "checkpoint.pt.tmp").exists()


# ---------------------------------------------------------------------------------------------
# Loading never runs pickled code
# ---------------------------------------------------------------------------------------------
class _Payload:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_pickle_bearing_checkpoint_is_refused(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    evil = tmp_path / "checkpoint.pt"
    torch.save({"state": {"step": 1}, "x": _Payload()}, evil)
    with pytest.raises(RuntimeError, match="refused: it holds pickled Python objects"):
        ckpt.load(evil)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# Every numeric flag of train.py is checked before any work: nan, inf, negatives, wrong types
# ---------------------------------------------------------------------------------------------
POSITIVE_INTS = ["--rank", "--max-seq-len", "--limit-rows", "--max-steps", "--batch-size", "--grad-accum",
                 "--eval-every", "--val-rows", "--save-every"]
NONNEG_INTS = ["--warmup-steps", "--patience", "--seed"]
POSITIVE_FLOATS = ["--alpha", "--extra-weight", "--safety-weight", "--lr", "--epochs", "--clip"]
FRACTIONS = ["--dropout", "--val-fraction"]
BAD = ([(f, v) for f in POSITIVE_INTS for v in ("0", "-3", "1.5", "nan", "inf")]
       + [(f, v) for f in NONNEG_INTS for v in ("-1", "1.5", "nan")]
       + [(f, v) for f in POSITIVE_FLOATS for v in ("0", "-1e-4", "nan", "inf", "-inf", "x")]
       + [(f, v) for f in FRACTIONS for v in ("-0.1", "1", "nan", "inf")]
       + [("--weight-decay", v) for v in ("-0.01", "nan", "inf")] + [("--seed", str(2**63))])


@pytest.mark.parametrize("flag,value", BAD)
def test_every_numeric_flag_rejects_bad_values(flag, value, capsys):
    import train as train_cli

    with pytest.raises(SystemExit) as e:
        train_cli.parse_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_numeric_flags_accept_good_values():
    import train as train_cli

    a = train_cli.parse_args(["--lr", "1e-3", "--epochs", "0.5", "--weight-decay", "0", "--dropout", "0.1",
                              "--seed", "0", "--warmup-steps", "0", "--patience", "0"])
    assert (a.lr, a.epochs, a.weight_decay, a.dropout, a.seed) == (1e-3, 0.5, 0.0, 0.1, 0)


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", float("inf")), ("epochs", float("inf")),
                                         ("clip", float("inf")), ("weight_decay", -0.1),
                                         ("weight_decay", float("nan")), ("weight_decay", float("inf")),
                                         ("min_lr_ratio", float("nan")), ("batch_size", 0)])
def test_train_config_rejects_non_finite_and_negative_values(field, value):
    from medlora.config import ConfigError

    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}: invalid value"):
        TrainConfig(**{field: value})


if __name__ == "__main__":  # the training process the kill test kills: test_faults.py RUN_DIR
    sys.path.insert(0, str(Path(__file__).parent))
    worker(Path(sys.argv[1]))
