"""The training loop: accumulation normalisation, exact resume, and the CLI end to end on real data."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import replace
import sys

import pytest
import torch
from conftest import ROOT
from helpers import DEVICES, tiny_model

from medlora.config import LoRAConfig
from medlora.data import Dataset, Example, collate
from medlora.lora import inject_lora, lora_parameters, read_adapter
from medlora.tokenizer import IGNORE
from medlora.trainer import TrainConfig, accumulate_gradients, train
from medlora.weights import sha256_file


def synthetic(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(3, 97, (L,), generator=g).tolist()
        cut = int(torch.randint(1, L - 2, (1,), generator=g))
        out.append(Example(ids, [IGNORE] * cut + ids[cut:]))
    return out


def lora_model(seed=0, dropout=0.0):
    m = tiny_model(seed=seed)
    torch.manual_seed(seed)
    inject_lora(m, LoRAConfig(rank=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        for p in lora_parameters(m):
            p.add_(torch.randn_like(p) * 0.02)
    return m.train()


@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_equals_one_big_batch(device):
    """On CUDA the batches travel through pinned memory (trainer.to_device) and the step's loss is
    summed on the device; the numbers are the same."""
    exs = synthetic(8)  # uneven lengths and uneven supervised counts
    big = lora_model().to(device)
    loss_big, n_big = accumulate_gradients(big, [collate(exs, 2)], "fp32", device)
    small = lora_model().to(device)
    loss_small, n_small = accumulate_gradients(small, [collate(exs[i:i + 2], 2) for i in range(0, 8, 2)], "fp32", device)
    assert isinstance(loss_small, float) and n_big == n_small and abs(loss_big - loss_small) < 1e-5
    for a, b in zip(lora_parameters(big), lora_parameters(small)):
        assert (a.grad - b.grad).abs().max() <= 1e-6 + 1e-4 * a.grad.abs().max()
    # Averaging per micro-batch instead (the common bug) gives a different gradient here.
    naive = lora_model()
    from medlora.trainer import batch_loss
    naive.to(device)
    for i in range(0, 8, 2):
        loss, n = batch_loss(naive, *(t.to(device) for t in collate(exs[i:i + 2], 2)), "fp32")
        (loss / n / 4).backward()
    assert any((a.grad - b.grad).abs().max() > 1e-4 for a, b in zip(lora_parameters(big), lora_parameters(naive)))


def run_tiny(tmp_path, name, max_steps=8, stop_at=None, resume=False, patience=0, dropout=0.0):
    ds = Dataset(synthetic(40), synthetic(6, seed=9))
    cfg = TrainConfig(lr=5e-3, max_steps=max_steps, batch_size=4, grad_accum=2, warmup_steps=2, eval_every=2,
                      save_every=3, patience=patience, seed=1)
    model = lora_model(dropout=dropout)

    def on_step(state):
        if stop_at and state["step"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: checkpoint, then a clean exit

    return train(model, ds, cfg, LoRAConfig(rank=4, alpha=8, dropout=dropout), tmp_path / name, pad_id=2, base_model_id="tiny",
                 resume=resume, on_step=on_step, log=lambda *a: None), model


def losses(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_gives_the_same_run(tmp_path, dropout):
    """Stopped at step 5 and resumed: the same losses and weights as the run never stopped; with LoRA
    dropout too (the checkpoint's RNG state gives the same masks; the mask SharedDropout holds is never
    given to the next step's new input)."""
    full, full_model = run_tiny(tmp_path, "full", dropout=dropout)
    part, _ = run_tiny(tmp_path, "split", stop_at=5, dropout=dropout)
    assert part["interrupted"] and part["step"] == 5
    resumed, resumed_model = run_tiny(tmp_path, "split", resume=True, dropout=dropout)
    assert resumed["step"] == full["step"] == 8
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for x, y in zip(a, b):
        assert abs(x.get("loss", x.get("val_loss")) - y.get("loss", y.get("val_loss"))) < 1e-6
    for p, q in zip(lora_parameters(full_model), lora_parameters(resumed_model)):
        assert torch.equal(p, q)
    assert (tmp_path / "full" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "full" / "best_adapter" / "adapter_model.safetensors").exists()


def test_early_stopping(tmp_path):
    ds = Dataset(synthetic(40), synthetic(6, seed=9))
    cfg = TrainConfig(lr=3.0, max_steps=40, batch_size=4, warmup_steps=0, eval_every=1, patience=2, seed=1,
                      schedule="constant", nan_policy="skip")  # absurd lr: validation gets worse
    out = train(lora_model(), ds, cfg, LoRAConfig(rank=4, alpha=8), tmp_path / "es", 2, "tiny", log=lambda *a: None)
    assert out["stopped_early"] and out["step"] < 40 and out["best_step"] < out["step"]
    # Resuming a run that stopped early does not train on (it trained one more interval before) ...
    lines = (tmp_path / "es" / "metrics.jsonl").read_text()
    again = train(lora_model(), ds, cfg, LoRAConfig(rank=4, alpha=8), tmp_path / "es", 2, "tiny", resume=True,
                  log=lambda *a: None)
    assert again["step"] == out["step"] and again["stopped_early"]
    assert (tmp_path / "es" / "metrics.jsonl").read_text() == lines
    # ... unless --patience is raised
    more = train(lora_model(), ds, replace(cfg, patience=4), LoRAConfig(rank=4, alpha=8), tmp_path / "es", 2, "tiny",
                 resume=True, log=lambda *a: None)
    assert more["step"] > out["step"]


def cli(*args, timeout=900):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_train_cli_end_to_end_on_real_weights_and_data(tmp_path, gguf_path):
    out = tmp_path / "run"
    r = cli("--rank", "8", "--limit-rows", "64", "--max-steps", "10", "--batch-size", "2", "--max-seq-len", "384",
            "--eval-every", "5", "--val-rows", "4", "--save-every", "5", "--out", str(out), "--model", gguf_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("config.json", "split.json", "metrics.jsonl", "loss.png", "checkpoint.pt", "summary.json",
              "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "best_adapter/adapter_config.json"):
        assert (out / f).exists(), f
    rec = json.loads((out / "config.json").read_text())
    assert rec["data"]["sha256"]["medquad.parquet"].startswith("4064909f")
    assert len(rec["model"]["sha256"]) == 64 and rec["lora"]["rank"] == 8 and rec["train"]["max_steps"] == 10
    assert rec["git"]["commit"] is None or len(rec["git"]["commit"]) == 40
    assert rec["versions"]["torch"].startswith("2.")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "train"] == list(range(1, 11))
    assert [s["step"] for s in steps if s["kind"] == "val"] == [0, 5, 10]  # step 0 = the base model
    cfg, raw, tensors = read_adapter(out / "adapter")
    assert cfg.rank == 8 and len(tensors) == 30 * 7 * 2
    # PEFT is pointed at the model these weights are (the bundled GGUF's), not at an id that was asked for
    assert raw["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert raw["medlora"]["base_sha256"] == rec["model"]["sha256"] and raw["revision"] is None
    assert "== summary ==" in r.stdout and "best val loss" in r.stdout
    split = json.loads((out / "split.json").read_text())
    assert split["val_rows"] == 6 and len(split["val_index"]) == 6


@pytest.mark.parametrize("args,msg", [
    (["--rank", "0"], "--rank"), (["--lr", "-1"], "--lr"), (["--targets", "q_proj,foo"], "unknown module"),
    (["--batch-size", "0"], "--batch-size"), (["--resume"], "--resume needs --out"),
    (["--compile", "--grad-checkpoint"], "--compile and --grad-checkpoint"),
    (["--init-adapter", "adapters/medlora-r8", "--rank", "16", "--rslora"], "--rank 16 (the adapter has 8); --rslora"),
    (["--init-adapter", "adapters/medlora-r8", "--targets", "attention"], "--targets attention (the adapter has down_proj,"),
    (["--init-adapter", "no/such/adapter"], "--init-adapter: no/such/adapter: expected adapter_config.json"),
    (["--model", "README.md", "--revision", "main"], "--revision main: only a hub id has revisions"),
    (["--split-from", "no/such/run"], "--split-from no/such/run: no such folder"),
    (["--split-from", "adapters/medlora-r8"], "--split-from adapters/medlora-r8: no split.json there"),
    (["--split-from", "docs/runs/cpu-stage2", "--val-fraction", "0.2"], "--val-fraction cannot also set them"),
])
def test_bad_flags_fail_fast(args, msg):
    r = cli(*args, timeout=120)
    assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_init_adapter_continues_from_its_weights_with_this_runs_dropout(tmp_path, gguf_path):
    """The safety/feedback passes' path: training starts from the shipped adapter's weights, keeps its
    structure, and uses this run's --dropout (it used to take the adapter's own lora_dropout silently)."""
    init = ROOT / "adapters" / "medlora-r8"
    out = tmp_path / "cont"
    r = cli("--init-adapter", str(init), "--dropout", "0.1", "--lr", "1e-5", "--limit-rows", "24", "--max-steps", "2",
            "--batch-size", "2", "--max-seq-len", "256", "--eval-every", "2", "--val-rows", "2", "--out", str(out),
            "--model", gguf_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((out / "config.json").read_text())
    assert rec["lora"]["dropout"] == 0.1 and rec["lora"]["rank"] == 8 and rec["lora"]["alpha"] == 16
    assert rec["init_adapter_sha256"] == sha256_file(init / "adapter_model.safetensors")
    cfg, raw, tensors = read_adapter(out / "adapter")
    assert raw["lora_dropout"] == 0.1 and cfg.targets == read_adapter(init)[0].targets
    _, _, start = read_adapter(init)
    # Two small steps move the adapter a little: far from zero-initialised B, close to where it started.
    for k, v in start.items():
        assert (tensors[k] - v).norm() < 0.05 * v.norm(), k


def test_init_adapter_from_a_run_with_another_split_warns(tmp_path):
    """Continuing a run's adapter with a split it did not hold out: its validation rows may be that run's
    training rows. The warning names how many and the flag that keeps the run's split."""
    import argparse

    import train as train_cli

    run = tmp_path / "stage1"
    (run / "best_adapter").mkdir(parents=True)
    (run / "split.json").write_text(json.dumps({"val_index": [1, 2, 3]}))
    args = argparse.Namespace(init_adapter=str(run / "best_adapter"), split_from=None)
    warning = train_cli.split_change_warning(args, [2, 3, 4, 5])
    assert warning and warning.startswith("2 of this run's 4 validation rows") and f"--split-from {run}" in warning
    assert train_cli.split_change_warning(args, [1, 3]) is None  # a sample of its held-out rows
    assert train_cli.split_change_warning(argparse.Namespace(init_adapter=str(run / "best_adapter"),
                                                             split_from=str(run)), [4]) is None
    args.init_adapter = str(ROOT / "adapters" / "medlora-r8")  # a release: no split.json beside it
    assert train_cli.split_change_warning(args, [4]) is None


def test_init_adapter_for_other_base_weights_is_refused(tmp_path, gguf_path):
    other = tmp_path / "other-base"
    shutil.copytree(ROOT / "adapters" / "medlora-r8", other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["medlora"]["base_sha256"] = "0" * 64
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    r = cli("--init-adapter", str(other), "--limit-rows", "8", "--max-steps", "1", "--out", str(tmp_path / "o"),
            "--model", gguf_path, timeout=300)
    assert r.returncode == 2 and "--init-adapter" in r.stderr and "trained on base weights" in r.stderr, r.stderr[-2000:]


def test_sanity_fills_in_only_the_flags_not_given():
    import train as train_cli

    a = train_cli.parse_args(["--sanity", "--lr", "5e-5", "--batch-size", "16", "--max-seq-len", "512",
                              "--long-rows", "drop", "--val-fraction", "0.2", "--patience", "3"])
    assert (a.lr, a.batch_size, a.max_seq_len, a.long_rows, a.val_fraction, a.patience) == (5e-5, 16, 512, "drop", 0.2, 3)
    assert (a.limit_rows, a.max_steps, a.warmup_steps) == (200, 120, 5)  # the rest is --sanity's
    a = train_cli.parse_args(["--sanity", "--epochs", "2"])
    assert a.epochs == 2 and a.max_steps is None  # the epochs asked for, not 120 steps
    a = train_cli.parse_args(["--sanity", "--lr", "2e-4"])  # a value equal to the default still counts as given
    assert a.lr == 2e-4 and a.batch_size == 4
    assert train_cli.parse_args(["--rank", "16"]).alpha == 32


def test_resume_refuses_settings_that_would_make_another_run(tmp_path, gguf_path):
    """--resume used to take the checkpoint's lr and weight decay whatever the flags said, rescale the
    adapter under a new --alpha, and re-split the data under a new --val-fraction (leaking validation rows
    into training) without a word. Each is now an error naming the flag and the run's value."""
    out = tmp_path / "run"
    base = ["--limit-rows", "40", "--batch-size", "2", "--max-seq-len", "256", "--val-rows", "2", "--eval-every", "50",
            "--save-every", "1", "--out", str(out), "--model", gguf_path, "--no-safety-data", "--no-replay-data"]
    r = cli(*base, "--max-steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    # One refused resume names every change (one model load, not four); the record is made to look like a
    # run from before data preparation version 2 (its examples were made another way).
    record = (out / "config.json").read_text()
    old_run = json.loads(record)
    del old_run["data"]["prep_version"]
    (out / "config.json").write_text(json.dumps(old_run))
    r = cli(*base, "--max-steps", "2", "--resume", "--lr", "1e-3", "--alpha", "32", "--val-fraction", "0.2",
            "--max-seq-len", "300", "--clip", "0.5", "--val-rows", "3", "--limit-rows", "42", timeout=300)
    (out / "config.json").write_text(record)
    assert r.returncode == 2 and "--init-adapter" in r.stderr, r.stderr[-2000:]
    for msg in ("--lr 0.0002 (now 0.001)", "--alpha 16.0 (now 32.0)", "the held-out split", "--max-seq-len 256 (now 300)",
                "data preparation version 1 (this medlora makes version 3", "--clip 1.0 (now 0.5)",
                "--val-rows 2 (now 3)", "the training examples (--limit-rows"):
        assert msg in r.stderr, (msg, r.stderr[-2000:])
    r = cli(*base, "--max-steps", "2", "--resume", "--weight-decay", "0.1", timeout=300)  # was silently the old one
    assert r.returncode == 2 and "--weight-decay 0.0 (now 0.1)" in r.stderr, r.stderr[-2000:]
    r = cli(*base, "--max-steps", "2", "--resume", "--eval-every", "1",  # run settings may change; targets' order too
            "--targets", "v_proj,up_proj,q_proj,o_proj,k_proj,gate_proj,down_proj")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["step"] == 2
    resumed = json.loads((out / "config.json").read_text())  # the record keeps its start and adds the resume
    assert resumed["command"] == old_run["command"] and len(resumed["resumes"]) == 1
    assert resumed["resumes"][0]["changed"] == {"max_steps": [1, 2], "eval_every": [50, 1]}
    r = cli(*base, "--max-steps", "2")  # the same command again, without --resume: never silently replaced
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--overwrite" in r.stderr, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["step"] == 2


def test_missing_column_is_a_clear_error(tmp_path, gguf_path):
    f = tmp_path / "qa.csv"
    f.write_text("question,response\nWhat is x?,It is y.\n")
    r = cli("--data", str(f), "--model", gguf_path, "--out", str(tmp_path / "o"), timeout=300)
    assert r.returncode == 2 and "no column 'Question'" in r.stderr and "qa.csv" in r.stderr


def test_a_max_seq_len_below_the_chat_frame_says_so(tmp_path, gguf_path):
    """Every row dropped by a too-small --max-seq-len: the error gives the counts and the frame's size."""
    r = cli("--max-seq-len", "50", "--limit-rows", "40", "--dry-run", "--model", gguf_path,
            "--out", str(tmp_path / "o"), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert "no training examples left" in err and "under 16 of 50 tokens" in err, err
    assert "--max-seq-len 50 leaves no room" in err and "alone take 101 tokens" in err, err


def test_a_dirty_checkout_records_its_diff(tmp_path, monkeypatch):
    """A run from a tree with uncommitted changes records them (git diff HEAD) beside its commit, so
    `git apply RUN/git.diff` on that commit gives the code that ran; a clean tree writes no diff."""
    import hashlib
    import subprocess

    import train as train_cli

    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True,
                                    capture_output=True)
    git("init", "-q")
    (repo / "model.py").write_text("x = 1\n")
    git("add", "model.py")
    git("commit", "-qm", "first")
    git("config", "diff.noprefix", "true")  # user settings that would make a patch git apply refuses
    git("config", "color.ui", "always")
    monkeypatch.setattr(train_cli, "ROOT", repo)
    (repo / "model.py").write_text("x = 2  # the change that ran\n")
    (repo / "notes.py").write_text("untracked\n")
    rec = train_cli.git_commit(tmp_path / "git.diff")
    diff = (tmp_path / "git.diff").read_bytes()
    assert rec["dirty"] is True and rec["diff"] == "git.diff" and rec["diff_sha256"] == hashlib.sha256(diff).hexdigest()
    assert rec["untracked"] == ["notes.py"]
    git("checkout", "-q", "--", "model.py")
    git("apply", str(tmp_path / "git.diff"))
    assert (repo / "model.py").read_text() == "x = 2  # the change that ran\n"
    git("checkout", "-q", "--", "model.py")  # clean again: no diff, and the earlier run's is not left behind
    clean = train_cli.git_commit(tmp_path / "git.diff")
    assert clean["dirty"] is False and "diff" not in clean and not (tmp_path / "git.diff").exists()
