"""The fast paths give what the plain paths give (issue #7): same loss and gradients in fp32,
bf16 within bf16's precision, int8 and int4 decoding close to fp32, prefill logits of the last position
only, and the benchmark's quick mode runs end to end with both sides computing the same loss."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from medlora.config import ALL_TARGETS, LoRAConfig
from medlora.data import IGNORE, row_messages
from medlora.generate import GenConfig, generate_ids
from medlora.lora import inject_lora
from medlora.trainer import batch_loss

from helpers import DEVICES  # noqa: E402  (tests/ is on sys.path)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
QUESTION = "What are the symptoms of anemia?"
ANSWER = ("Anemia can make you feel tired and weak. Other symptoms include pale skin, shortness of breath, "
          "dizziness, cold hands and feet, and a fast heartbeat. See a doctor if you notice these signs.")


def _batch(tok):
    ids, labels = tok.encode_for_training(row_messages(QUESTION, ANSWER))
    ids2, labels2 = tok.encode_for_training(row_messages("What causes high blood pressure?", ANSWER[:120]))
    T = max(len(ids), len(ids2))
    pad = lambda x, v: x + [v] * (T - len(x))  # noqa: E731
    return (torch.tensor([pad(ids, tok.pad_id), pad(ids2, tok.pad_id)]),
            torch.tensor([pad(labels, IGNORE), pad(labels2, IGNORE)]))


def _lora_model(base, dtype=torch.float32):
    model = copy.deepcopy(base).to(dtype)
    inject_lora(model, LoRAConfig(rank=8, alpha=16, targets=ALL_TARGETS))
    torch.manual_seed(0)
    for m in model.modules():  # a non-zero B so the LoRA path matters
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    return model


def _grads(model):
    return torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad])


def test_lora_forward_equals_the_textbook_formula(ours):
    """The scaling is folded into B (fewer FLOPs); the output must still be W x + (alpha/r) B A x."""
    model, _ = ours
    lin = copy.deepcopy(model.model.layers[0].mlp.up_proj)
    from medlora.lora import LoRALinear

    lora = LoRALinear(lin, rank=8, alpha=16)
    torch.nn.init.normal_(lora.lora_B.weight, std=0.02)
    x = torch.randn(3, 7, 576)
    want = x @ lin.weight.T + (16 / 8) * (x @ lora.lora_A.weight.T) @ lora.lora_B.weight.T
    assert torch.allclose(lora(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weights_match_fp32_within_bf16_precision(ours, device):
    """bf16 training stores the frozen base in bf16 (no per-step weight casts): the loss stays within
    bf16 rounding of the fp32 loss and the LoRA gradient points the same way."""
    base, tok = ours
    ids, labels = (t.to(device) for t in _batch(tok))
    ref = _lora_model(base).to(device)
    loss32, n = batch_loss(ref, ids, labels, "fp32")
    (loss32 / n).backward()
    fast = _lora_model(base, torch.bfloat16).to(device)
    fast.load_state_dict({k: v for k, v in ref.state_dict().items() if "lora_" in k}, strict=False)
    assert all(p.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)  # fp32 masters
    loss16, n16 = batch_loss(fast, ids, labels, "bf16")
    (loss16 / n16).backward()
    assert n16 == n
    assert abs(loss16.item() - loss32.item()) / loss32.item() < 2e-2
    g32, g16 = _grads(ref), _grads(fast)
    assert F.cosine_similarity(g32, g16, dim=0) > 0.98


def _rows(tok, pairs):
    """A right-padded batch of chat rows (each starts with the system turn, as training rows do)."""
    enc = [tok.encode_for_training(row_messages(q, a)) for q, a in pairs]
    T = max(len(i) for i, _ in enc)
    return (torch.tensor([i + [tok.pad_id] * (T - len(i)) for i, _ in enc]),
            torch.tensor([lab + [IGNORE] * (T - len(lab)) for _, lab in enc]))


@pytest.mark.parametrize("device", DEVICES)
def test_shared_prefix_gives_what_running_every_row_whole_gives(ours, device):
    """Rows that share their first P tokens (the system turn) run as one packed sequence with the
    prefix computed once: the same hidden states at every position (padding included) and, in fp32,
    the same loss and LoRA gradients (<= 1e-4 relative) as running every row whole; bf16 stays within
    bf16's rounding of the plain bf16 path."""
    from medlora.trainer import MIN_SHARED_PREFIX, shared_prefix_length

    base, tok = ours
    ids, labels = _rows(tok, [(QUESTION, ANSWER), ("What causes high blood pressure?", ANSWER[:120]),
                              ("Is anemia inherited?", "Some kinds are. " + ANSWER[:60])])
    P = shared_prefix_length(ids)
    system = len(tok.encode_chat(row_messages(QUESTION)[:1]))
    assert system <= P < ids.shape[1] and P >= MIN_SHARED_PREFIX  # the system turn and a little more
    ids, labels = ids.to(device), labels.to(device)
    model = _lora_model(base).to(device)
    model.train()
    with torch.no_grad():
        whole, packed = model(ids, hidden_only=True), model(ids, hidden_only=True, shared_prefix=P)
    assert packed.shape == whole.shape
    assert torch.allclose(packed, whole, atol=1e-4, rtol=1e-4), (packed - whole).abs().max()
    for precision in ("fp32", "bf16"):
        m = model if precision == "fp32" else _lora_model(base, torch.bfloat16).to(device)
        out = {}
        for share in (False, True):
            m.zero_grad(set_to_none=True)
            loss, n = batch_loss(m, ids, labels, precision, share_prefix=share)
            (loss / n).backward()
            out[share] = (loss.item(), _grads(m))
        (l0, g0), (l1, g1) = out[False], out[True]
        if precision == "fp32":
            assert abs(l1 - l0) <= 1e-4 * abs(l0)
            assert ((g1 - g0).norm() / g0.norm()).item() <= 1e-4
        else:  # two bf16 roundings of one computation: as far apart as either is from fp32 (measured ~4%)
            assert abs(l1 - l0) <= 1e-2 * abs(l0)
            assert F.cosine_similarity(g0, g1, dim=0) > 0.99


def test_shared_prefix_length_and_when_it_is_used():
    from helpers import tiny_model

    from medlora.trainer import MIN_SHARED_PREFIX, batch_hidden, shared_prefix_length

    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 1], [5, 6, 7, 8, 2]])
    assert shared_prefix_length(ids) == 3 and shared_prefix_length(ids[:1]) == 5
    model, calls = tiny_model(), []
    real = model._forward_shared
    model._forward_shared = lambda idx, P, h: calls.append(P) or real(idx, P, h)
    g = torch.Generator().manual_seed(0)
    same = torch.randint(3, 97, (1, 40), generator=g).expand(3, 40).clone()  # identical rows: share all but one
    batch_hidden(model, same)
    short = torch.cat((same[:, :MIN_SHARED_PREFIX - 1], torch.randint(3, 97, (3, 9), generator=g)), 1)
    batch_hidden(model, short)  # a prefix too short to be worth a pass: the plain path
    batch_hidden(model, same[:1])  # one row: nothing to share
    batch_hidden(model, same, share_prefix=False)
    assert calls == [39]


def test_prefill_head_on_last_position_equals_full_logits(ours):
    model, tok = ours
    ids = torch.tensor([tok.encode_chat(row_messages(QUESTION), add_generation_prompt=True)])
    with torch.no_grad():
        full = model(ids)[:, -1]
        last = model.lm_head(model(ids, hidden_only=True)[:, -1])
    assert torch.allclose(full, last, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantised_decoding_stays_close_to_fp32(ours, kind):
    """Int8 weights, or int4 layers (groups of 32, as llama.cpp's Q4_1) with an int8 head, change
    rounding, not behaviour: teacher-forced next-token choices agree with fp32 on >= 90% of a real
    answer's positions (95% / 96% measured; 79% when the int4 head was int4 too) and greedy decoding
    starts the same way; the original model is untouched."""
    from medlora import quant

    if not (quant.int8_supported() and (kind == "int8" or quant.int4_supported())):
        pytest.skip(f"this PyTorch build has no {kind} weight-only CPU kernel")
    model, tok = ours
    ids = torch.tensor([tok.encode_chat(row_messages(QUESTION, ANSWER))])
    q = (quant.quantize_int8 if kind == "int8" else quant.quantize_int4)(copy.deepcopy(model))
    layer = quant.Int8Linear if kind == "int8" else quant.Int4Linear
    assert isinstance(q.lm_head, quant.Int8Linear) and isinstance(q.model.layers[0].mlp.down_proj, layer)
    with torch.no_grad():
        a, b = model(ids)[0].argmax(-1), q(ids)[0].float().argmax(-1)
    agree = (a == b).float().mean().item()
    assert agree >= 0.9, agree
    prompt = tok.encode_chat(row_messages(QUESTION), add_generation_prompt=True)
    cfg = GenConfig(max_new_tokens=12)
    ref = [s[0] for s in generate_ids(model, [prompt], cfg)]
    got = [s[0] for s in generate_ids(q, [prompt], cfg)]
    assert got[:4] == ref[:4]
    assert model.lm_head.weight.dtype == torch.float32  # original untouched


def test_int4_reproduces_weights_already_on_a_4bit_grid():
    """A weight stored the way Q4_1 stores one (16 levels per group of 32 spanning the group's
    min..max) comes back on its own levels, off only by the bf16 rounding of the group's scale and
    offset and of the output; a weight off the grid may move half a level more."""
    from medlora.quant import Int4Linear, int4_supported

    if not int4_supported():
        pytest.skip("this PyTorch build has no _weight_int4pack_mm_for_cpu")
    g = torch.Generator().manual_seed(0)
    n, k = 32, 128
    scale = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 0.001).to(torch.bfloat16).float()
    low = (torch.randn(n, k // 32, 1, generator=g) * 0.05).to(torch.bfloat16).float()
    levels = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    levels[..., 0], levels[..., 1] = 0, 15  # every group spans the full range, as Q4_1's min/max do
    on_grid = (low + levels * scale).reshape(n, k)
    off_grid = torch.randn(n, k, generator=g) * 0.05
    mean_err = {}
    for name, w, levels_off in (("on", on_grid, 0.0), ("off", off_grid, 0.5)):
        groups = w.reshape(n, k // 32, 32)
        lo = groups.amin(-1, keepdim=True)
        step = (groups.amax(-1, keepdim=True) - lo) / 15
        bf16 = 2 ** -8 * ((lo + 8 * step).abs() + 8 * step + groups.abs())  # half a bf16 ulp: offset, scale x level, output
        err = (Int4Linear(w).dequantized().reshape(n, k // 32, 32) - groups).abs()
        assert (err <= levels_off * step + bf16 + 1e-7).all(), name
        mean_err[name] = (err / step).mean().item()
    assert mean_err["on"] < 0.5 * mean_err["off"], mean_err  # on the grid it is not just rounding again


def test_bench_quick_runs_and_both_sides_compute_the_same_loss(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path / "res"),
                        "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "res" / "quick.json").read_text())
    res = rec["results"]
    assert abs(res["medlora fp32"]["first_loss"] - res["hf+peft fp32"]["first_loss"]) < 1e-3
    assert res["medlora fp32"]["trainable_params"] == res["hf+peft fp32"]["trainable_params"]
    assert rec["summary"]["gen"]["greedy_tokens_equal_hf"] is True
    assert rec["summary"]["train"]["fp32"]["throughput_x"] > 0
    assert "| medlora fp32 |" in (tmp_path / "res" / "quick.md").read_text()
    inter = rec["summary"]["interleaved"]["fp32"]  # both sides' steps alternating in one process
    assert len(res["interleaved fp32"]["ratios"]) == rec["config"]["steps"]
    assert inter["ratio_min"] <= inter["ratio_median"] <= inter["ratio_max"] and inter["hf_tok_per_s"] > 0
    assert "Interleaved in one process (fp32" in (tmp_path / "res" / "quick.md").read_text()
    drop = rec["summary"]["interleaved"]["fp32 dropout 0.05"]  # the same rotation with and without LoRA dropout
    assert set(drop["also_tok_per_s"]) == {"medlora dropout 0", "hf dropout 0"} and min(drop["also_tok_per_s"].values()) > 0
    assert "(dropout costs medlora" in (tmp_path / "res" / "quick.md").read_text()
    assert not (tmp_path / "res" / "quick.partial.json").exists()  # only a cut-short run leaves one


def test_a_cut_bench_run_keeps_its_finished_jobs_and_from_partial_makes_their_record(tmp_path, monkeypatch):
    """The bench saves each finished job (atomically, with the run's inputs): a run killed at its third
    job leaves the first two, `--from-partial` turns them into the record, and a later run never
    overwrites an earlier partial."""
    import bench.run as B

    calls = []

    def fake_job(job, spec, work, root=None, timeout=None):  # stands in for the worker processes
        calls.append(spec["label"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the kill
        if job == "matmul":
            return {"gflops": {"fp32 peak": 100.0, "bf16 peak": 200.0}}
        return {"tok_per_s": 50.0 * len(calls), "tokens": 1000, "step_s": 1.0, "train_peak_mb": 900.0 + len(calls),
                "load_peak_mb": 500.0, "first_loss": 2.5, "shared_prefix": True, "trainable_params": 10}

    monkeypatch.setattr(B, "run_job", fake_job)
    args = ["--quick", "--out", str(tmp_path / "res"), "--work", str(tmp_path / "work")]
    with pytest.raises(KeyboardInterrupt):
        B.main(args)
    partial = tmp_path / "res" / "quick.partial.json"
    saved = json.loads(partial.read_text())
    assert list(saved["results"]) == calls[:2] == ["matmul", "medlora fp32"] and saved["inputs"]["row_lengths"]
    assert B.main(["--from-partial", str(partial), "--out", str(tmp_path / "rec")]) == 0
    rec = json.loads((tmp_path / "rec" / "quick.json").read_text())
    assert list(rec["results"]) == ["matmul", "medlora fp32"] and rec["machine"] == saved["machine"]
    assert f"2 of {saved['jobs']} jobs ran" in rec["note"] and "prepared again" not in rec["note"]
    assert rec["results"]["medlora fp32"]["flop_util"] > 0  # the FLOP counts come from the saved inputs
    assert "jobs ran" in (tmp_path / "rec" / "quick.md").read_text()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        B.main(args)  # a second cut run: the first one's partial is set aside, not overwritten
    kept = [p for p in (tmp_path / "res").glob("quick.partial-*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["results"] == saved["results"]
    # A partial without its inputs (older runs): they are prepared again, and must be what its jobs timed.
    bare = tmp_path / "bare.partial.json"
    no_inputs = {k: v for k, v in saved.items() if k != "inputs"}
    bare.write_text(json.dumps(no_inputs))
    again = ["--from-partial", str(bare), "--out", str(tmp_path / "rec2"), "--work", str(tmp_path / "work")]
    with pytest.raises(SystemExit, match="medlora fp32 timed 1000 tokens, these inputs"):
        B.main(again)
    w, n = saved["config"]["warmup"], saved["config"]["steps"]
    no_inputs["results"]["medlora fp32"]["tokens"] = sum(sum(b) for b in saved["inputs"]["row_lengths"][w: w + n])
    bare.write_text(json.dumps(no_inputs))
    assert B.main(again) == 0
    assert "the same timed tokens, checked" in json.loads((tmp_path / "rec2" / "quick.json").read_text())["note"]


def test_no_bench_module_shadows_the_standard_library():
    """bench/workers.py runs as a script, so bench/ is first on its sys.path: a bench/profile.py made
    every job fail (torch imports cProfile, which imports profile)."""
    clash = [p.name for p in (ROOT / "bench").glob("*.py") if p.stem in sys.stdlib_module_names]
    assert not clash


def test_profile_reports_where_a_step_goes(tmp_path):
    """`python -m bench.step_profile` (for the next GPU session: why a step is slow) runs on the bench's
    batches and writes per-step figures and the top-operator table for each side."""
    r = subprocess.run([sys.executable, "-m", "bench.step_profile", "--quick", "--warmup", "0", "--steps", "1", "--top", "5",
                        "--impls", "medlora", "--out", str(tmp_path / "res"), "--work", str(tmp_path / "work")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "res" / "profile-cpu-quick.md").read_text()
    assert "## medlora" in text and "aten::mm" in text
    figures = dict(line[2:].split(": ") for line in text.splitlines() if line.startswith("- "))
    assert float(figures["wall_s_per_step"]) > 0 and float(figures["aten_calls_per_step"]) > 100
    assert 0 < float(figures["unprofiled_s_per_step_at_these_tokens"])  # the same work without the profiler


def test_bench_keeps_the_fastest_of_the_alternating_runs_for_both_sides():
    from bench.run import BenchConfig, jobs_for, keep_best_rounds

    labels = [label for _, label, _, _ in jobs_for(BenchConfig(rounds=3), {}, None)]
    assert labels.count("medlora fp32") == labels.count("hf+peft bf16 #3") == 1
    assert labels.index("hf+peft fp32 #2") < labels.index("medlora fp32 #2")  # HF first in round 2
    assert labels.index("medlora fp32 #3") < labels.index("hf+peft fp32 #3")
    got = keep_best_rounds({"medlora fp32": {"tok_per_s": 300.0, "run": 1}, "hf+peft fp32": {"tok_per_s": 200.0},
                            "hf+peft fp32 #2": {"tok_per_s": 210.0, "run": 2}, "medlora fp32 #2": {"tok_per_s": 290.0},
                            "medlora bf16": {"tok_per_s": 600.0}, "medlora bf16 #2": {"error": "killed"}})
    assert list(got) == ["medlora fp32", "hf+peft fp32", "medlora bf16"]
    assert got["medlora fp32"] == {"tok_per_s": 300.0, "run": 1, "tok_per_s_readings": [300.0, 290.0]}
    assert got["hf+peft fp32"]["run"] == 2 and got["hf+peft fp32"]["tok_per_s_readings"] == [200.0, 210.0]
    assert got["medlora bf16"] == {"error": "killed"}  # a failed run is not hidden by a good one


def test_bench_on_cuda_runs_every_job_there_and_skips_the_cpu_only_paths(tmp_path):
    """`python -m bench --device cuda`: every job gets the device; the int8/int4 decoders and
    llama.cpp (CPU paths) are left out; both sides also decode with bf16 weights; a job past the
    timeout is recorded as an error, not waited for."""
    from bench.run import BenchConfig, cuda_config, jobs_for, run_job

    jobs = jobs_for(cuda_config(BenchConfig()), {"gguf": "model.gguf"}, None)
    labels = [label for _, label, _, _ in jobs]
    assert all(spec["device"] == "cuda" for _, _, spec, _ in jobs)
    assert not [x for x in labels if "int4" in x or "int8" in x or "llamacpp" in x]
    assert {"gen medlora bf16", "gen hf bf16", "medlora bf16", "hf+peft bf16"} <= set(labels)
    # SDPA's kernel order both ways on both sides; "flash-first" is attend()'s own order on CUDA
    from bench.workers import sdpa_order
    from medlora.model import CUDA_SDPA_ORDER

    orders = {label: spec.get("sdpa_order") for _, label, spec, _ in jobs if spec.get("sdpa_order")}
    assert orders == {"medlora bf16 cudnn-first": "cudnn-first", "hf+peft bf16 flash-first": "flash-first"}
    assert sdpa_order("flash-first") == CUDA_SDPA_ORDER != sdpa_order("cudnn-first")
    compiled = [bool(spec.get("compile")) for _, _, spec, _ in jobs]
    assert any(compiled) and compiled == sorted(compiled)  # a lease cut short loses the slow compiles only
    cpu_labels = [label for _, label, _, _ in jobs_for(BenchConfig(), {"gguf": "model.gguf"}, None)]
    assert "gen llamacpp" in cpu_labels and "gen medlora-int4+compile" in cpu_labels
    # The other layout than train.py's default for the device: rows whole on a CPU, the prefix shared on CUDA.
    assert "medlora bf16 no-share-prefix" in cpu_labels and "medlora bf16 share-prefix" in labels
    from medlora.trainer import share_prefix_default

    assert share_prefix_default(torch.device("cpu")) and not share_prefix_default(torch.device("cuda"))
    spec = {"label": "slow", "tokens": 4096, "repeats": 100, "device": "cpu"}
    assert run_job("matmul", spec, tmp_path, timeout=0.5)["error"] == "timed out after 0.5 s"


def test_bench_compares_with_llamacpp_run_that_worked_and_reports_where_compiled_tokens_leave_eager():
    """llama.cpp also runs without its repacking buffers (its AMX matmul crashed on a Xeon): the ratios
    use the faster of its runs that did not fail, and the record names it. The compiled decoders' check
    says from which token on they leave eager's greedy tokens, not only whether."""
    from bench.run import BenchConfig, jobs_for, summarise_gen

    jobs = {label: spec for _, label, spec, _ in jobs_for(BenchConfig(), {"gguf": "model.gguf"}, None)}
    assert jobs["gen llamacpp plain-buffers"]["extra_bufts"] is False and "extra_bufts" not in jobs["gen llamacpp"]

    def gen(b1, tokens):
        return {"batch1_tok_per_s": b1, "prefill_tok_per_s": 100.0, "greedy_tokens": tokens}

    results = {"gen medlora": gen(30.0, [1, 2, 3, 4]), "gen hf": gen(20.0, [1, 2, 3, 4]),
               "gen medlora-int4": gen(60.0, [1, 2, 9, 9]), "gen medlora-int4+compile": gen(90.0, [1, 2, 9, 7]),
               "gen llamacpp": {"error": "killed by SIGSEGV"}, "gen llamacpp plain-buffers": gen(80.0, [1, 5, 5, 5])}
    s = summarise_gen(results)
    assert s["llamacpp_reference"] == "llamacpp plain-buffers"
    assert s["medlora-int4+compile"]["batch1_x_llamacpp"] == 90.0 / 80.0
    assert s["llamacpp"]["batch1_x_hf"] == 4.0 and s["llamacpp_first_divergence"] == 1
    assert s["medlora-int4_compiled_tokens_equal_eager"] is False and s["medlora-int4_compiled_first_divergence"] == 3
    results["gen llamacpp"] = gen(85.0, [1, 2, 3, 4])  # both ran: the faster is the reference
    s = summarise_gen(results)
    assert s["llamacpp_reference"] == "llamacpp" and s["medlora-int4+compile"]["batch1_x_llamacpp"] == 90.0 / 85.0
    del results["gen llamacpp"], results["gen llamacpp plain-buffers"]  # not installed: no llama.cpp ratios
    assert "llamacpp_reference" not in summarise_gen(results) and "batch1_x_llamacpp" not in summarise_gen(results)["medlora"]


def test_a_crashed_bench_worker_is_recorded_with_its_signal_and_where(tmp_path, monkeypatch):
    """A worker killed by a signal (the H200's compile+graphs job segfaulted and was recorded as
    "no output") is recorded with the signal's name and the traceback faulthandler printed."""
    import bench.run as B

    fake = tmp_path / "root" / "bench"
    fake.mkdir(parents=True)
    (fake / "workers.py").write_text("import os, signal\ndef crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\ncrash()\n")
    monkeypatch.setattr(B, "ROOT", tmp_path / "root")
    r = B.run_job("train", {"label": "crash"}, tmp_path)
    assert r["error"].startswith("killed by SIGSEGV") and any("in crash" in x for x in r["stderr_tail"])
    (fake / "workers.py").write_text("import sys\nsys.exit(3)\n")
    assert B.run_job("train", {"label": "exit"}, tmp_path)["error"] == "exit 3: no output"


def readme_performance_rows(rec: dict) -> list[str]:
    """The README's Performance table rows (and two numbers of its prose), typed from a bench record."""
    r, s = rec["results"], rec["summary"]
    t, g = s["train"], s["gen"]
    tps = lambda name: r[name]["tok_per_s"]  # noqa: E731
    gb = lambda name, k: r[name][k]  # noqa: E731
    peak = lambda name: r[name]["train_peak_mb"] / 1000  # noqa: E731
    b1 = lambda impl: gb(f"gen {impl}", "batch1_tok_per_s")  # noqa: E731
    return [
        f"| training fp32, tokens/s | {tps('medlora fp32'):.0f} ({tps('medlora fp32 compile'):.0f} with `--compile`) | "
        f"{tps('hf+peft fp32'):.0f} | {t['fp32']['throughput_x']:.2f}× ({t['fp32 compile']['throughput_x']:.2f}×) |",
        f"| training bf16 autocast, tokens/s | {tps('medlora bf16'):.0f} ({tps('medlora bf16 compile'):.0f} with `--compile`) | "
        f"{tps('hf+peft bf16'):.0f} ({tps('hf+peft bf16 bf16-weights'):.0f} with bf16 weights) | "
        f"{t['bf16']['throughput_x']:.2f}× ({t['bf16 compile']['throughput_x']:.2f}×) |",
        f"| training against transformers + PEFT fed as usual (the same rows in shuffled batches, "
        f"{rec['inputs']['shuffled_padding_share']:.0%} padding), fp32 / bf16 tokens/s | {tps('medlora fp32'):.0f} / "
        f"{tps('medlora bf16'):.0f} ({tps('medlora fp32 compile'):.0f} / {tps('medlora bf16 compile'):.0f} with `--compile`) | "
        f"{tps('hf+peft fp32 shuffled'):.0f} / {tps('hf+peft bf16 shuffled'):.0f} | "
        f"{t['fp32']['throughput_x_hf_shuffled']:.2f}× / {t['bf16']['throughput_x_hf_shuffled']:.2f}× "
        f"({t['fp32 compile']['throughput_x_hf_shuffled']:.2f}× / {t['bf16 compile']['throughput_x_hf_shuffled']:.2f}×) |",
        f"| training fp32, peak memory | {peak('medlora fp32'):.1f} GB ({peak('medlora fp32 compile'):.1f} GB with `--compile`) | "
        f"{peak('hf+peft fp32'):.1f} GB | {t['fp32']['train_peak_memory_x']:.2f}× ({t['fp32 compile']['train_peak_memory_x']:.2f}×) |",
        f"| training bf16, peak memory | {peak('medlora bf16'):.1f} GB ({peak('medlora bf16 compile'):.1f} GB with `--compile`) | "
        f"{peak('hf+peft bf16'):.1f} GB ({peak('hf+peft bf16 bf16-weights'):.1f} GB) | "
        f"{t['bf16']['train_peak_memory_x']:.2f}× ({t['bf16 compile']['train_peak_memory_x']:.2f}×) |",
        f"| training with every row run whole (`--no-share-prefix`), fp32 / bf16 tokens/s | "
        f"{tps('medlora fp32 no-share-prefix'):.0f} / {tps('medlora bf16 no-share-prefix'):.0f} | "
        f"{tps('hf+peft fp32'):.0f} / {tps('hf+peft bf16'):.0f} | {tps('medlora fp32 no-share-prefix') / tps('hf+peft fp32'):.2f}× / "
        f"{tps('medlora bf16 no-share-prefix') / tps('hf+peft bf16'):.2f}× |",
        f"| training bf16 + `--grad-checkpoint` | {tps('medlora bf16 grad-checkpoint'):.0f} tok/s, "
        f"{peak('medlora bf16 grad-checkpoint'):.1f} GB training peak |",
        f"| FLOP utilisation (useful FLOPs; see above) fp32 / bf16 | {r['medlora fp32']['flop_util']:.0%} / {r['medlora bf16']['flop_util']:.0%} "
        f"({r['medlora fp32 compile']['flop_util']:.0%} / {r['medlora bf16 compile']['flop_util']:.0%} with `--compile`) | "
        f"{r['hf+peft fp32']['flop_util']:.0%} / {r['hf+peft bf16']['flop_util']:.0%} |",
        f"| greedy decoding, batch 1, tokens/s | {b1('medlora'):.1f} ({b1('medlora-int8'):.1f} with `--int8`, "
        f"{b1('medlora-int4'):.1f} with `--int4`) | {b1('hf'):.1f} | {g['medlora']['batch1_x_hf']:.2f}× "
        f"({g['medlora-int8']['batch1_x_hf']:.2f}×, {g['medlora-int4']['batch1_x_hf']:.2f}×) |",
        f"| greedy decoding, batch 1, `--compile`, tokens/s | {b1('medlora+compile'):.1f} ({b1('medlora-int8+compile'):.1f} "
        f"with `--int8`, {b1('medlora-int4+compile'):.1f} with `--int4`) | {b1('hf'):.1f} | "
        f"{g['medlora+compile']['batch1_x_hf']:.2f}× ({g['medlora-int8+compile']['batch1_x_hf']:.2f}×, "
        f"{g['medlora-int4+compile']['batch1_x_hf']:.2f}×) |",
        f"| greedy decoding, batch 1, `--int4 --compile` against llama.cpp on the same Q4_1 GGUF, tokens/s | "
        f"{b1('medlora-int4+compile'):.1f} | llama.cpp: {b1('llamacpp'):.1f} | "
        f"{g['medlora-int4+compile']['batch1_x_llamacpp']:.2f}× |",
        f"| greedy decoding, batch 16, tokens/s | {gb('gen medlora', 'batch16_tok_per_s'):.1f} | "
        f"{gb('gen hf', 'batch16_tok_per_s'):.1f} | {g['medlora']['batch16_x_hf']:.2f}× |",
        f"| prefill, {gb('gen medlora', 'prefill_tokens')}-token prompt, tokens/s | {gb('gen medlora', 'prefill_tok_per_s'):.0f} | "
        f"{gb('gen hf', 'prefill_tok_per_s'):.0f} (llama.cpp: {gb('gen llamacpp', 'prefill_tok_per_s'):.0f}) | "
        f"{g['medlora']['prefill_x_hf']:.2f}× |",
        f"{tps('medlora bf16 fp32-weights'):.0f} → {tps('medlora bf16'):.0f} tok/s",
        f"{peak('medlora bf16 fp32-weights'):.1f} → {peak('medlora bf16'):.1f} GB",
        f"({tps('medlora bf16'):.0f} → {tps('medlora bf16 dropout 0.05'):.0f} tok/s at 0.05)",
    ]


def test_readme_performance_numbers_come_from_the_bench_results():
    """The README's Performance table is typed from bench/results/cpu.json: check each row against it."""
    rec = json.loads((ROOT / "bench" / "results" / "cpu.json").read_text())
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Performance"):text.index("## Layout and reading order")]
    missing = [row for row in readme_performance_rows(rec) if row not in " ".join(section.split()) and row not in section]
    assert not missing, "README Performance differs from bench/results/cpu.json:\n" + "\n".join(missing)


def readme_gpu_rows(rec: dict) -> list[str]:
    """The README's GPU table rows that come from bench/results/cuda.json (its record of the H100 run)."""
    r, g = rec["results"], rec["summary"]["gen"]["medlora"]
    tps = lambda k: r[k]["tok_per_s"]  # noqa: E731
    gb = lambda k: r[k]["train_peak_mb"] / 1000  # noqa: E731  (as the CPU table: MiB / 1000)
    return [
        f"| training bf16 autocast, tokens/s | {tps('medlora bf16'):,.0f} (prefix shared: "
        f"{tps('medlora bf16 share-prefix'):,.0f}) | {tps('hf+peft bf16'):,.0f} | "
        f"{tps('medlora bf16') / tps('hf+peft bf16'):.2f}× |",
        f"| training fp32, tokens/s | {tps('medlora fp32 share-prefix'):,.0f} (prefix shared;",
        f"| {tps('hf+peft fp32'):,.0f} | {tps('medlora fp32 share-prefix') / tps('hf+peft fp32'):.2f}× |",
        f"| training bf16 / fp32, peak GPU memory | {gb('medlora bf16'):.1f} / {gb('medlora fp32 share-prefix'):.1f} GB "
        f"| {gb('hf+peft bf16'):.1f} / {gb('hf+peft fp32'):.1f} GB | "
        f"{r['medlora bf16']['train_peak_mb'] / r['hf+peft bf16']['train_peak_mb']:.2f}× / "
        f"{r['medlora fp32 share-prefix']['train_peak_mb'] / r['hf+peft fp32']['train_peak_mb']:.2f}× |",
        "| greedy decoding fp32, batch 1 / 16 / 64, tokens/s | " + " / ".join(
            f"{r['gen medlora'][f'batch{b}_tok_per_s']:,.{1 if b == 1 else 0}f}" for b in (1, 16, 64)) + " | " +
        " / ".join(f"{r['gen hf'][f'batch{b}_tok_per_s']:,.{1 if b == 1 else 0}f}" for b in (1, 16, 64)) + " | " +
        " / ".join(f"{g[f'batch{b}_x_hf']:.2f}×" for b in (1, 16, 64)) + " |",
        f"| prefill, {r['gen medlora']['prefill_tokens']}-token prompt, tokens/s | "
        f"{r['gen medlora']['prefill_tok_per_s']:,.0f} | {r['gen hf']['prefill_tok_per_s']:,.0f} | {g['prefill_x_hf']:.2f}× |",
    ]


def test_readme_gpu_numbers_come_from_the_gpu_bench_record():
    rec = json.loads((ROOT / "bench" / "results" / "cuda.json").read_text())
    assert rec["machine"]["cuda"] and rec["config"]["device"] == "cuda"
    missing = readme_section_lacks(readme_gpu_rows(rec), "### On a GPU", "**Startup.**")
    assert not missing, "README's GPU table differs from bench/results/cuda.json:\n" + "\n".join(missing)


def readme_section_lacks(rows: list[str], start: str, end: str) -> list[str]:
    """The rows (typed from a bench record) that the README's text from `start` to `end` does not hold."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(start):text.index(end)]
    return [row for row in rows if row not in section]


def test_readme_h200_numbers_come_from_their_bench_record():
    """The README's session-18 H200 table is bench/results/cuda-h200-s18.json's."""
    rec = json.loads((ROOT / "bench" / "results" / "cuda-h200-s18.json").read_text())
    assert rec["machine"]["cuda"] == "NVIDIA H200" and rec["config"]["device"] == "cuda"
    r, g = rec["results"], rec["summary"]["gen"]["medlora bf16"]
    ours, hf = r["medlora bf16"], r["hf+peft bf16"]
    go, gh = r["gen medlora bf16"], r["gen hf bf16"]
    bs = (1, 16, 64)
    rows = [
        f"| training bf16 autocast, tokens/s | {ours['tok_per_s']:,.0f} | {hf['tok_per_s']:,.0f} | "
        f"{ours['tok_per_s'] / hf['tok_per_s']:.2f}× |",
        f"| training bf16, peak GPU memory | {ours['train_peak_mb'] / 1000:.1f} GB | {hf['train_peak_mb'] / 1000:.1f} GB | "
        f"{ours['train_peak_mb'] / hf['train_peak_mb']:.2f}× |",
        "| greedy decoding bf16 weights, batch 1 / 16 / 64, tokens/s | "
        + " / ".join(f"{go[f'batch{b}_tok_per_s']:,.{1 if b == 1 else 0}f}" for b in bs) + " | "
        + " / ".join(f"{gh[f'batch{b}_tok_per_s']:,.{1 if b == 1 else 0}f}" for b in bs) + " | "
        + " / ".join(f"{g[f'batch{b}_x_hf_bf16']:.2f}×" for b in bs) + " |",
        f"| prefill bf16 weights, {go['prefill_tokens']}-token prompt, tokens/s | {go['prefill_tok_per_s']:,.0f} | "
        f"{gh['prefill_tok_per_s']:,.0f} | {g['prefill_x_hf_bf16']:.2f}× |",
    ]
    missing = readme_section_lacks(rows, "**Session 18, an H200**", "**Startup.**")
    assert not missing, "README's H200 table differs from bench/results/cuda-h200-s18.json:\n" + "\n".join(missing)


def _saved_bytes(model, ids, labels, precision, recompute):
    """Loss, LoRA gradients and the bytes kept for the backward pass: what autograd saves plus what
    `recompute` keeps (its inputs, which autograd's hooks do not see), distinct storages, weights aside."""
    import medlora.model as M

    seen: dict[int, int] = {}

    def keep(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    def counted(fn, *args):  # the inputs recompute holds on to
        out = recompute(fn, *args)
        if recompute is not plain:
            [keep(a) for a in args]
        return out

    M.recompute = counted
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss, n = batch_loss(model, ids, labels, precision)
    (loss / n).backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved too, but they exist anyway
    return loss.item(), _grads(model), sum(v for k, v in seen.items() if k not in weights)


def plain(fn, *args):
    return fn(*args)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("device", DEVICES)
def test_rmsnorm_written_out_backward_matches_autograd(dtypes, device):
    """_RMSNormFn (eager training's norm) against autograd on the formula (RMSNorm._norm): output,
    input gradient and, for a trainable norm, the weight's; activations and weight in each dtype pair."""
    from medlora.model import RMSNorm

    x_dtype, w_dtype = dtypes
    norm = RMSNorm(48, 1e-5).to(device, w_dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (torch.randn(2, 7, 48, device=device) * 3).to(x_dtype).requires_grad_()
    dy = torch.randn(2, 7, 48, device=device)
    if x_dtype == w_dtype == torch.float32:  # a single vector too (the weight gradient sums over no rows)
        x, dy = x[0, 0].detach().requires_grad_(), dy[0, 0]

    def run(fn):
        x.grad = norm.weight.grad = None
        y = fn(x)
        y.backward(dy.to(y.dtype))
        return [t.float() for t in (y, x.grad, norm.weight.grad)]

    ours, ref = run(norm), run(norm._norm)
    tol = 1e-6 if x_dtype == torch.float32 else 1e-2
    for a, b in zip(ours, ref):
        assert ((a - b).norm() / b.norm()).item() <= tol


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recomputed_swiglu_and_written_out_norms_give_the_same_gradients_in_less_memory(ours, monkeypatch, precision):
    """model.recompute keeps only the inputs of silu(g)*u for the backward pass, and _RMSNormFn only
    the norm's input and 1/rms: the same loss and gradients as autograd storing everything, less
    memory kept (in fp32 the norms' and silu's outputs; in bf16 also the norms' fp32 internals)."""
    import medlora.model as M

    base, tok = ours
    model = _lora_model(base, torch.bfloat16 if precision == "bf16" else torch.float32)  # as train.py loads it
    model.train()
    ids, labels = _batch(tok)
    monkeypatch.setattr(M, "recompute", M.recompute)  # restored after the test
    loss, grads, kept = _saved_bytes(model, ids, labels, precision, M.recompute)
    monkeypatch.setattr(M.RMSNorm, "forward", lambda self, x: self._norm(x))  # the norm's formula, autograd's backward
    loss0, grads0, kept0 = _saved_bytes(model, ids, labels, precision, plain)  # autograd stores everything
    assert abs(loss - loss0) <= 1e-6 * abs(loss0)
    if precision == "fp32":
        assert torch.allclose(grads, grads0, rtol=1e-4, atol=1e-7)
    else:  # bf16 rounds the written-out backward's results at other points: far inside bf16's own ~4% error
        print("bf16 gradient difference", ((grads - grads0).norm() / grads0.norm()).item())
        assert (grads - grads0).norm() <= 5e-3 * grads0.norm()
    assert kept < {"fp32": 0.9, "bf16": 0.8}[precision] * kept0, (kept, kept0)


@pytest.mark.parametrize("shared", [0, 16])
def test_grad_checkpointing_recomputes_each_block_once_not_its_parts_again(monkeypatch, shared):
    """--grad-checkpoint recomputes whole blocks; the SwiGLU recompute inside them is off (it would
    only run it a third time). Same loss and gradients as without either, also for rows
    that share a prefix (run packed)."""
    import medlora.model as M
    from helpers import randomize_lora, tiny_model

    model = tiny_model()
    inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    randomize_lora(model)
    model.train()
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[1, :shared] = ids[0, :shared]
    labels = ids.clone()
    calls = []
    real = M.checkpoint
    monkeypatch.setattr(M, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    out = {}
    for whole in (False, True):
        model.gradient_checkpointing = whole
        calls.clear()
        model.zero_grad(set_to_none=True)
        loss, n = batch_loss(model, ids, labels, "fp32")
        (loss / n).backward()
        out[whole] = (loss.item(), _grads(model), list(calls))
    layers = model.config.num_hidden_layers
    # Without: SwiGLU's recompute in each block (the norms keep their input themselves: _RMSNormFn).
    # With: each block once, as a whole, and nothing recomputed inside it.
    assert out[False][2] == [M.swiglu] * layers
    assert len(out[True][2]) == layers and M.swiglu not in out[True][2]
    assert abs(out[True][0] - out[False][0]) <= 1e-6 * abs(out[False][0])
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-4, atol=1e-7)


def test_compiled_blocks_give_the_eager_loss_and_gradients(tmp_path):
    """`--compile` (trainer.compile_blocks): the same loss and LoRA gradients as eager, <= 1e-4
    relative in fp32, over two batch lengths (one dynamic graph); train() compiles when asked and
    the state_dict keys stay the same."""
    from helpers import randomize_lora, tiny_model

    from medlora.data import Dataset, Example
    from medlora.trainer import TrainConfig, compile_blocks, train

    eager = tiny_model()
    inject_lora(eager, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    randomize_lora(eager)
    eager.train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    for T, shared in ((12, 0), (17, 0), (26, 16), (31, 18)):  # rows sharing a prefix run packed (SharedPrefix)
        ids = torch.randint(3, 97, (2, T), generator=g)
        ids[1, :shared] = ids[0, :shared]
        labels = ids.clone()
        labels[:, : T // 3] = IGNORE
        out = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss, n = batch_loss(model, ids, labels, "fp32")
            (loss / n).backward()
            out.append((loss.item(), _grads(model)))
        assert abs(out[1][0] - out[0][0]) <= 1e-4 * abs(out[0][0])
        assert ((out[1][1] - out[0][1]).norm() / out[0][1].norm()).item() <= 1e-4
    rows = [Example(list(range(3, 3 + n)), [IGNORE] * 4 + list(range(7, 3 + n))) for n in (9, 14, 11, 16, 10, 13)]
    model = copy.deepcopy(eager)
    res = train(model, Dataset(rows[:4], rows[4:]), TrainConfig(max_steps=2, batch_size=2, eval_every=2, compile=True),
                LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS), tmp_path / "run", 2, "tiny", log=lambda *a: None)
    assert res["step"] == 2 and all(b._compiled_call_impl is not None for b in model.model.layers)


def test_compiled_blocks_train_with_lora_dropout():
    """Compiled blocks draw LoRA dropout in the traced graph (lora.dropout_mask, one mask per layer): a
    compiled training step with dropout runs, its masks drop about p of the LoRA path (the loss moves
    off the dropout-free one by about what eager's dropout moves it), and eval mode takes no dropout."""
    from helpers import randomize_lora, tiny_model

    from medlora.trainer import compile_blocks

    def model_with(p):
        torch.manual_seed(0)  # (A's initialisation draws from the global generator)
        m = tiny_model()
        inject_lora(m, LoRAConfig(rank=4, alpha=8, dropout=p, targets=ALL_TARGETS))
        randomize_lora(m, std=0.5)
        return m.train()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE
    losses = {}
    for name, p, compiled in (("plain", 0.0, False), ("eager", 0.5, False), ("compiled", 0.5, True)):
        m = model_with(p)
        if compiled:
            compile_blocks(m)
        torch.manual_seed(1)
        runs = []
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            loss, n = batch_loss(m, ids, labels, "fp32")
            (loss / n).backward()
            runs.append(loss.item() / n)
            assert _grads(m).norm() > 0
        losses[name] = runs
        m.eval()
        with torch.no_grad():
            losses[name + " eval"] = batch_loss(m, ids, labels, "fp32")[0].item() / n
    assert losses["compiled eval"] == pytest.approx(losses["plain eval"], rel=1e-4)
    assert len(set(losses["compiled"])) == 3  # a new mask every step
    shift = lambda k: sum(abs(x - losses["plain"][0]) for x in losses[k]) / 3  # noqa: E731
    assert shift("compiled") > 0.2 * shift("eager") > 0  # the dropout really acts in the compiled graph


@pytest.mark.parametrize("device", DEVICES)
def test_padding_to_a_multiple_keeps_loss_and_gradients(device):
    """trainer.pad_to_multiple (fixed shapes for CUDA graphs): right-padding a batch to a multiple of 64
    changes neither the loss nor the LoRA gradients, rows whole or packed."""
    from medlora.trainer import pad_to_multiple

    model, (ids, labels), run = _padding_case(device)
    padded = pad_to_multiple(ids, labels, 0, 64)
    assert padded[0].shape == (3, 64) and (padded[1][:, 37:] == IGNORE).all()
    assert pad_to_multiple(*padded, 0, 64)[0] is padded[0]
    for share in (False, True):
        (a, ga), (b, gb) = run(model, (ids, labels), share), run(model, padded, share)
        assert abs(a - b) <= 1e-5 * abs(a) and ((ga - gb).norm() / ga.norm()).item() <= 1e-5


def _padding_case(device):
    """A tiny LoRA model on `device`, a 3-row batch sharing a 20-token prefix (one row shorter), and
    run(model, batch, share_prefix) -> (summed loss, LoRA gradients)."""
    from helpers import randomize_lora, tiny_model

    model = tiny_model()
    inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    randomize_lora(model)
    model.to(device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (3, 37), generator=g)
    ids[:, :20] = ids[0, :20]
    labels = ids.clone()
    labels[:, :25] = IGNORE
    labels[2, 30:] = IGNORE  # a shorter row, padded at its end

    def run(m, batch, share):
        m.zero_grad(set_to_none=True)
        loss, n = batch_loss(m, batch[0].to(device), batch[1].to(device), "fp32", share_prefix=share)
        (loss / n).backward()
        return loss.item(), _grads(m)

    return model, (ids, labels), run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_blocks_give_eager_loss_and_gradients():
    """compile_blocks(cuda_graphs=True) on padded batches gives eager's loss and gradients over repeated
    steps (warm-up, recording, replay). On the H200 in session 18 (torch 2.11) this was still compiling
    after ~100 s and the full-size probe crashed (bench/results/cuda-graphs-probe-h200-s18.md): gpu_bench.sh
    runs it last, under its own time limit."""
    from medlora.trainer import compile_blocks, pad_to_multiple

    model, (ids, labels), run = _padding_case("cuda")
    padded = pad_to_multiple(ids, labels, 0, 64)
    graphed = copy.deepcopy(model)
    compile_blocks(graphed, cuda_graphs=True)
    want = run(model, padded, False)
    for _ in range(3):  # warm-up, recording, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = run(graphed, padded, False)
        assert abs(got[0] - want[0]) <= 1e-4 * abs(want[0])
        assert ((got[1] - want[1]).norm() / want[1].norm()).item() <= 1e-4


def test_training_optimizer_is_fused_adamw_with_the_plain_update():
    """make_optimizer (train.py's) is fused AdamW: after a few steps the weights are those plain
    AdamW gives, within float rounding."""
    from medlora.trainer import make_optimizer

    torch.manual_seed(0)
    shapes = [(8, 576), (1536, 8), (8, 1536), (576, 8)]
    fused_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain_p = [torch.nn.Parameter(p.detach().clone()) for p in fused_p]
    start = [p.detach().clone() for p in fused_p]
    fused, plain = make_optimizer(fused_p, 1e-3, 0.01), torch.optim.AdamW(plain_p, lr=1e-3, weight_decay=0.01)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for step in range(5):
        grads = [torch.randn(s) for s in shapes]
        for ps, opt in ((fused_p, fused), (plain_p, plain)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    for a, b, a0 in zip(fused_p, plain_p, start):
        assert (a - a0).abs().max() > 1e-3  # the steps moved the weights
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_readme_interleaved_ratios_come_from_their_bench_record():
    """The README's paired (one-process) training ratios are bench/results/cpu-interleaved.json's."""
    rec = json.loads((ROOT / "bench" / "results" / "cpu-interleaved.json").read_text())
    readme = (ROOT / "README.md").read_text()
    fp32, bf16 = rec["summary"]["interleaved"]["fp32"], rec["summary"]["interleaved"]["bf16"]
    want = (f"median **{fp32['ratio_median']:.2f}×** in\nfp32 ({fp32['ratio_min']:.2f}–{fp32['ratio_max']:.2f} over "
            f"{fp32['batches']} batches; {fp32['medlora_tok_per_s']:.0f} against {fp32['hf_tok_per_s']:.0f} tokens/s) "
            f"and **{bf16['ratio_median']:.2f}×** in bf16 ({bf16['ratio_min']:.2f}–{bf16['ratio_max']:.2f}; "
            f"{bf16['medlora_tok_per_s']:.0f} against\n{bf16['hf_tok_per_s']:.0f})")
    assert want in readme


def test_readme_session14_interleaved_ratios_come_from_their_bench_records():
    """The README's session-14 paired ratios are bench/results/cpu-interleaved-s14*.json's."""
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces

    def fig(t):
        return (f"**{t['ratio_median']:.2f}×** ({t['ratio_min']:.2f}–{t['ratio_max']:.2f} over {t['batches']} batches; "
                f"{t['medlora_tok_per_s']:.0f} against {t['hf_tok_per_s']:.0f} tokens/s)")

    runs = {name: json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())["summary"]["interleaved"]
            for name in ("cpu-interleaved-s14", "cpu-interleaved-s14-fp32")}
    for want in (f"read {fig(runs['cpu-interleaved-s14']['fp32'])} in fp32",
                 f"and {fig(runs['cpu-interleaved-s14']['bf16'])} in bf16",
                 f"(`cpu-interleaved-s14-fp32.md`) {fig(runs['cpu-interleaved-s14-fp32']['fp32'])}"):
        assert want in readme, want


def test_readme_dropout_figures_come_from_their_bench_record():
    """The README's LoRA-dropout figures (cost on each side, ratio with dropout on both) are
    bench/results/cpu-dropout-s13.json's interleaved rotation."""
    rec = json.loads((ROOT / "bench" / "results" / "cpu-dropout-s13.json").read_text())
    t = rec["summary"]["interleaved"]["bf16 dropout 0.05"]
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces
    cost = {side: 1 - t[f"{side}_tok_per_s"] / t["also_tok_per_s"][f"{side} dropout 0"] for side in ("medlora", "hf")}
    want = (f"dropout costs medlora {cost['medlora']:.0%} and transformers + PEFT {cost['hf']:.0%}, and with dropout on "
            f"both sides medlora trains at {t['ratio_median']:.2f}× its speed (median per batch, {t['ratio_min']:.2f}–"
            f"{t['ratio_max']:.2f}; {t['medlora_tok_per_s']:.0f} against {t['hf_tok_per_s']:.0f} tokens/s)")
    assert want in readme


def test_gpu_graphs_probe_runs_its_eager_stage_on_a_cpu(capsys):
    """bench.gpu_graphs_probe (the tool that located the CUDA-graph crash) runs here too: 8 steps of the
    tiny model, finite losses that move."""
    from bench.gpu_graphs_probe import main

    main("eager", "tiny")
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[probe] eager tiny step")]
    losses = [float(x.split(" loss ")[1].split()[0]) for x in lines]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses) and len(set(losses)) > 1


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantised_model_fuses_the_projections_that_read_one_input(kind):
    """q, k and v (and gate and up) become one quantised layer of their stacked rows: 4 kernel calls a
    block instead of 7 when decoding, with exactly the numbers of quantising each projection alone (rows
    and groups are quantised independently), LoRA merged first as before."""
    from helpers import randomize_lora, tiny_model

    from medlora import quant
    from medlora.config import LoRAConfig
    from medlora.lora import inject_lora, merge_lora

    if not (quant.int8_supported() and (kind == "int8" or quant.int4_supported())):
        pytest.skip(f"this PyTorch build has no {kind} weight-only CPU kernel")
    model = tiny_model(seed=3, hidden_size=64, intermediate_size=128)  # int4 needs multiples of 32 inputs
    inject_lora(model, LoRAConfig(rank=4))
    randomize_lora(model)
    model.eval()
    fused = (quant.quantize_int8 if kind == "int8" else quant.quantize_int4)(copy.deepcopy(model))
    make = (lambda w: quant.Int4Linear(w) if quant.int4_fits(w) else quant.Int8Linear(w)) if kind == "int4" else quant.Int8Linear
    merged = copy.deepcopy(model)
    merge_lora(merged)
    apart = copy.deepcopy(fused)  # the same model with each projection quantised alone, as before the fusion
    for block, src in zip(apart.model.layers, merged.model.layers):
        block.self_attn.qkv_proj = block.mlp.gate_up_proj = None
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(block.self_attn, name, make(getattr(src.self_attn, name).weight))
        for name in ("gate_proj", "up_proj"):
            setattr(block.mlp, name, make(getattr(src.mlp, name).weight))
    layers = [m for m in fused.modules() if isinstance(m, (quant.Int8Linear, quant.Int4Linear))]
    assert len(layers) == 4 * len(fused.model.layers) + 1  # qkv, o, gate_up, down per block; the head
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj") and not hasattr(fused.model.layers[0].mlp, "up_proj")
    if kind == "int4":
        assert isinstance(fused.model.layers[0].self_attn.qkv_proj, quant.Int4Linear)
    ids = torch.tensor([[5, 9, 17, 3, 44, 2, 8, 60, 7, 1]])
    with torch.no_grad():
        got, want = fused(ids), apart(ids)
    assert torch.equal(got, want)
    cfg = GenConfig(max_new_tokens=6)
    assert [s for s in generate_ids(fused, [[5, 9, 17]], cfg)] == [s for s in generate_ids(apart, [[5, 9, 17]], cfg)]


def test_readme_xeon_numbers_come_from_their_bench_records():
    """The README's session-19 Xeon table is bench/results/cpu-xeon-s19.json's (training) and
    cpu-xeon-gen-s19.json's (decoding, after the fused projections and the bf16 copy for many rows); the
    longer paired run's ratios are cpu-xeon-interleaved-s19.json's."""
    rec = json.loads((ROOT / "bench" / "results" / "cpu-xeon-s19.json").read_text())
    gen = json.loads((ROOT / "bench" / "results" / "cpu-xeon-gen-s19.json").read_text())
    assert "Xeon" in rec["machine"]["cpu"] and "Xeon" in gen["machine"]["cpu"]
    r, s, inter = rec["results"], rec["summary"]["train"], rec["summary"]["interleaved"]
    g, gs = gen["results"], gen["summary"]["gen"]

    def tps(label):
        return f"{r[label]['tok_per_s']:,.0f}"

    def gb(label):
        return f"{r[label]['train_peak_mb'] / 1000:.1f}"

    rows = [
        f"| training fp32, tokens/s | {tps('medlora fp32')} ({tps('medlora fp32 compile')} with `--compile`) | "
        f"{tps('hf+peft fp32')} | {s['fp32']['throughput_x']:.2f}× ({s['fp32 compile']['throughput_x']:.2f}×) |",
        f"| training bf16 autocast, tokens/s | {tps('medlora bf16')} ({tps('medlora bf16 compile')} with `--compile`) | "
        f"{tps('hf+peft bf16')} | {s['bf16']['throughput_x']:.2f}× ({s['bf16 compile']['throughput_x']:.2f}×) |",
        "| training in one process, steps alternating (median per-batch ratio), fp32 / bf16 tokens/s | "
        f"{inter['fp32']['medlora_tok_per_s']:,.0f} / {inter['bf16']['medlora_tok_per_s']:,.0f} | "
        f"{inter['fp32']['hf_tok_per_s']:,.0f} / {inter['bf16']['hf_tok_per_s']:,.0f} | "
        f"{inter['fp32']['ratio_median']:.2f}× / {inter['bf16']['ratio_median']:.2f}× |",
        f"| training peak memory, fp32 / bf16 | {gb('medlora fp32')} / {gb('medlora bf16')} GB | "
        f"{gb('hf+peft fp32')} / {gb('hf+peft bf16')} GB | "
        f"{s['fp32']['train_peak_memory_x']:.2f}× / {s['bf16']['train_peak_memory_x']:.2f}× |",
        f"| FLOP utilisation (useful FLOPs), fp32 / bf16 | {r['medlora fp32']['flop_util']:.0%} / "
        f"{r['medlora bf16']['flop_util']:.0%} | {r['hf+peft fp32']['flop_util']:.0%} / {r['hf+peft bf16']['flop_util']:.0%} | |",
        f"| greedy decoding, batch 1, tokens/s (`cpu-xeon-gen-s19`) | {g['gen medlora']['batch1_tok_per_s']:.1f} "
        f"({g['gen medlora-int4']['batch1_tok_per_s']:.1f} with `--int4`, "
        f"{g['gen medlora-int4+compile']['batch1_tok_per_s']:.1f} with `--int4 --compile`) | "
        f"{g['gen hf']['batch1_tok_per_s']:.1f} | {gs['medlora']['batch1_x_hf']:.2f}× "
        f"({gs['medlora-int4']['batch1_x_hf']:.2f}×, {gs['medlora-int4+compile']['batch1_x_hf']:.2f}×) |",
        f"| greedy decoding, batch 16, tokens/s | {g['gen medlora']['batch16_tok_per_s']:.1f} | "
        f"{g['gen hf']['batch16_tok_per_s']:.1f} | {gs['medlora']['batch16_x_hf']:.2f}× |",
        f"| prefill, {g['gen medlora']['prefill_tokens']}-token prompt, tokens/s | "
        f"{g['gen medlora']['prefill_tok_per_s']:,.0f} | {g['gen hf']['prefill_tok_per_s']:,.0f} | "
        f"{gs['medlora']['prefill_x_hf']:.2f}× |",
        f"| `--int4 --compile`: batch 16 / prefill, tokens/s | {g['gen medlora-int4+compile']['batch16_tok_per_s']:.1f} / "
        f"{g['gen medlora-int4+compile']['prefill_tok_per_s']:,.0f} | {g['gen hf']['batch16_tok_per_s']:.1f} / "
        f"{g['gen hf']['prefill_tok_per_s']:,.0f} | {gs['medlora-int4+compile']['batch16_x_hf']:.2f}× / "
        f"{gs['medlora-int4+compile']['prefill_x_hf']:.2f}× |",
    ]
    paired = json.loads((ROOT / "bench" / "results" / "cpu-xeon-interleaved-s19.json").read_text())["summary"]["interleaved"]
    rows.append(f"read {paired['fp32']['ratio_median']:.2f}×\n({paired['fp32']['ratio_min']:.2f}–{paired['fp32']['ratio_max']:.2f}) "
                f"in fp32 and {paired['bf16']['ratio_median']:.2f}× ({paired['bf16']['ratio_min']:.2f}–{paired['bf16']['ratio_max']:.2f}) in bf16")
    full_int4 = rec["results"]["gen medlora-int4+compile"]["batch1_tok_per_s"]  # the full run's, before the changes
    rows.append(f"read {full_int4:.1f} tokens/s, {rec['summary']['gen']['medlora-int4+compile']['batch1_x_hf']:.2f}×")
    rows.append(f"({rec['summary']['gen']['medlora-int4+compile']['prefill_x_hf']:.2f}× in the full run)")
    missing = readme_section_lacks(rows, "**Session 19, another CPU", "### On a GPU")
    assert not missing, "README's Xeon table differs from its bench records:\n" + "\n".join(missing)


def test_readme_xeon_llamacpp_numbers_come_from_their_bench_record():
    """The session-20 rows and sentences of the README's Xeon section (llama.cpp built here, its AMX path
    crashed, the plain-buffer run is the reference; where the compiled decoders leave eager's tokens) are
    bench/results/cpu-xeon-gen-s20.json's."""
    gen = json.loads((ROOT / "bench" / "results" / "cpu-xeon-gen-s20.json").read_text())
    assert "Xeon" in gen["machine"]["cpu"]
    g, s = gen["results"], gen["summary"]["gen"]
    assert "SIGSEGV" in g["gen llamacpp"]["error"] and s["llamacpp_reference"] == "llamacpp plain-buffers"
    ours, lc = g["gen medlora-int4+compile"], g["gen llamacpp plain-buffers"]
    rows = [
        "| session 20 (`cpu-xeon-gen-s20`): greedy decoding, batch 1, `--int4 --compile` against llama.cpp on the "
        f"same Q4_1 GGUF, tokens/s | {ours['batch1_tok_per_s']:.1f} | llama.cpp (plain buffers): "
        f"{lc['batch1_tok_per_s']:.1f} | {s['medlora-int4+compile']['batch1_x_llamacpp']:.2f}× |",
        f"| session 20: prefill, {ours['prefill_tokens']}-token prompt, `--int4 --compile` against llama.cpp, tokens/s | "
        f"{ours['prefill_tok_per_s']:,.0f} | {lc['prefill_tok_per_s']:,.0f} | "
        f"{ours['prefill_tok_per_s'] / lc['prefill_tok_per_s']:.2f}× |",
        f"(**{s['medlora-int4+compile']['batch1_x_llamacpp']:.2f}×**; {s['medlora-int4+compile']['batch1_x_hf']:.2f}× "
        f"transformers' {g['gen hf']['batch1_tok_per_s']:.1f}), `--int4` eager {g['gen medlora-int4']['batch1_tok_per_s']:.1f} "
        f"({s['medlora-int4']['batch1_x_llamacpp']:.2f}×), fp32 {g['gen medlora']['batch1_tok_per_s']:.1f} "
        f"({s['medlora']['batch1_x_llamacpp']:.2f}×)",
        f"llama.cpp's greedy tokens follow fp32's for {s['llamacpp_first_divergence']} tokens, `--int4`'s for "
        f"{s['int4_first_divergence']};",
        f"at token {s['medlora-int8_compiled_first_divergence']} (`--int8`) and "
        f"{s['medlora-int4_compiled_first_divergence']}\n(`--int4`) of {len(g['gen medlora']['greedy_tokens'])}",
    ]
    assert s["int8_first_divergence"] == 0 and s["medlora_compiled_first_divergence"] == 80  # "from the first token", "kept all 80"
    # after decode steps sum the norms in fp64: compiled equals eager for all three decoders
    norms = json.loads((ROOT / "bench" / "results" / "cpu-xeon-gen-s20-norms.json").read_text())
    ns, nr = norms["summary"]["gen"], norms["results"]
    assert all(ns[f"{d}_compiled_first_divergence"] == 80 for d in ("medlora", "medlora-int8", "medlora-int4"))
    rows.append(f"(`--int4 --compile` {nr['gen medlora-int4+compile']['batch1_tok_per_s']:.1f} tokens/s at batch 1 in it; "
                f"the machine was slower through that run,\ntransformers {nr['gen hf']['batch1_tok_per_s']:.1f})")
    missing = readme_section_lacks(rows, "**Session 19, another CPU", "### On a GPU")
    assert not missing, "README's Xeon section differs from cpu-xeon-gen-s20:\n" + "\n".join(missing)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantised_layer_multiplies_many_rows_by_its_dequantised_weight(kind):
    """From quant.DENSE_ROWS rows on (a prompt's prefill, larger batches) a quantised layer multiplies by
    its weight dequantised to bf16 instead of calling the int8/int4 kernel, which costs ~20 us per row: the
    kernel's own weight (read back through the identity) rounded to bf16, so the outputs agree with the
    kernel's within a few bf16 steps; fewer rows (decoding one token a row) still take the kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from medlora import quant

    if not (quant.int8_supported() and (kind == "int8" or quant.int4_supported())):
        pytest.skip(f"this PyTorch build has no {kind} weight-only CPU kernel")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.05
    layer = quant.Int8Linear(w) if kind == "int8" else quant.Int4Linear(w)
    if kind == "int4":  # the copy is built by the formula: the very weight the kernel reads back
        assert torch.equal(layer.dense, layer.dequantized().to(torch.bfloat16))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    for shape in ((1, 1, 64), (2, 3, 64), (1, quant.DENSE_ROWS - 1, 64), (1, quant.DENSE_ROWS, 64), (4, 10, 64)):
        x = torch.randn(shape, generator=g)
        with Ops() as ops, torch.no_grad():
            y = layer(x)
        rows = x.numel() // 64
        assert any("pack_mm" in n for n in ops.names) == (rows < quant.DENSE_ROWS), (shape, ops.names)
        assert y.shape == (*shape[:-1], 96) and y.dtype == x.dtype
        want = layer.kernel(x.reshape(-1, 64).to(torch.bfloat16)).float().reshape(y.shape)
        err = ((y - want).abs().max() / want.abs().max()).item()
        assert err <= 2 ** -7, (shape, err)  # the bf16 copy rounds the kernel's weight: a few last-bit steps
    assert "dense" not in layer.state_dict()  # a copy made from the codes, never saved
