"""The release path: adapter copy, merged HF folder, GGUF, model card, hub push.

Independent references: PEFT loads our exported adapter onto transformers' Llama, transformers
loads our merged folder and our GGUF, all compared with our own unmerged base+adapter. Most
tests use a tiny random model with a tiny trained BPE tokenizer; one test exports the shipped
GPU run (docs/runs/gpu-r8-epoch1) on the real weights.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import randomize_lora, tiny_model
from medlora.config import LoRAConfig
from medlora.export import assemble_record, main, write_gguf
from medlora.hub import NO_TOKEN, model_card
from medlora.lora import inject_lora, load_adapter, save_adapter
from medlora.tokenizer import MEDICAL_SYSTEM_PROMPT, ChatTokenizer
from medlora.weights import load_pretrained, read_gguf, save_folder, sha256_file

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = ROOT / "docs" / "runs" / "gpu-r8-epoch1"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["What are the symptoms of anemia? Fatigue, pale skin and 3 or 4 other signs.",
         "Call 911 for chest pain.  Take 250 mg twice a day, said nobody here.",
         "Ünïcödé and emoji 🙂 still tokenise byte by byte."]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def same_config(a, b) -> bool:
    """Equal configs; GGUF stores rms_norm_eps as float32, so that one within float32 rounding."""
    return replace(a, rms_norm_eps=b.rms_norm_eps) == b and abs(a.rms_norm_eps - b.rms_norm_eps) < 1e-12


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


# ---------------------------------------------------------------------------------------------
# A tiny run: byte-level BPE tokenizer, random Llama, a LoRA adapter, a run folder
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tok() -> ChatTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20 + [MEDICAL_SYSTEM_PROMPT] * 5, trainer)
    return ChatTokenizer(tok, CHATML, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|im_end|>")


def make_run(root: Path, tok: ChatTokenizer, tie: bool = True, extra_vocab: int = 0, seed: int = 0):
    """A train.py-shaped run folder around a tiny model; returns (run_dir, base_dir, unmerged model)."""
    model = tiny_model(seed, vocab_size=tok.vocab_size + extra_vocab, tie_word_embeddings=tie)
    base_dir = root / "base"
    save_folder(model, tok, base_dir)
    cfg = LoRAConfig(rank=4, alpha=8.0)
    inject_lora(model, cfg)
    randomize_lora(model, seed)
    run = root / "run"
    save_adapter(model, run / "best_adapter", cfg, str(base_dir),
                 {"base_sha256": None, "base_id": str(base_dir), "step": 20, "val_loss": 3.25})
    record = {
        "command": "train.py --rank 4 (tiny test run)",
        "model": {"kind": "folder", "path": str(base_dir), "id": str(base_dir), "revision": None, "note": "",
                  "sha256": {"model.safetensors": sha256_file(base_dir / "model.safetensors")}},
        "data": {"source": "tests", "rows": 10, "train": {"n": 8}, "val": {"n": 2}, "sha256": {"x.jsonl": "00"}},
        "split": {"seed": 0, "val_fraction": 0.2}, "lora": asdict(cfg),
        "train": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1, "epochs": 1.0,
                  "batch_size": 2, "grad_accum": 1, "precision": "fp32", "seed": 0},
        "git": {"commit": "a" * 40, "dirty": False}, "versions": {"torch": torch.__version__}, "device": "cpu",
    }
    (run / "config.json").write_text(json.dumps(record))
    (run / "summary.json").write_text(json.dumps({"step": 20, "best_val": 3.25, "best_step": 20, "base_val": 4.5,
                                                  "total_steps": 20, "tokens": 1234, "minutes": 0.1}))
    rows = [{"kind": "val", "step": 0, "val_loss": 4.5}, {"kind": "train", "step": 20, "loss": 3.0},
            {"kind": "val", "step": 20, "val_loss": 3.25}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run, base_dir, model


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory, tiny_tok):
    """Export the tiny run with --merge --gguf f32 and a dry-run push (what every tiny test inspects)."""
    root = tmp_path_factory.mktemp("tiny")
    run, base_dir, model = make_run(root, tiny_tok)
    out = root / "release"
    rc, stdout, stderr = run_main([run / "best_adapter", "--out", out, "--merge", "--gguf", "f32",
                                   "--push-to-hub", "someone/medlora-tiny", "--dry-run"])
    assert rc == 0, stderr
    ids = torch.tensor([tiny_tok.encode_chat([{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True)])
    return {"out": out, "run": run, "base": base_dir, "model": model, "ids": ids, "ref": logits(model, ids),
            "stdout": stdout}


def test_dry_run_lists_exactly_the_release_folder(tiny_release):
    out = tiny_release["out"]
    expected = {"README.md", "run_record.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json",
                "merged/tokenizer_config.json", "merged/generation_config.json", "merged.gguf"}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == expected
    listed = tiny_release["stdout"]
    assert "[dry run] would upload 10 files" in listed and "someone/medlora-tiny" in listed
    for name in expected:
        assert f"  {name}\n" in listed


def test_peft_loads_exported_adapter(tiny_release):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_release["base"], dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, tiny_release["out"] / "adapter").eval()
    diff = (logits(peft, tiny_release["ids"]) - tiny_release["ref"]).abs().max().item()
    assert diff < 1e-4


def test_transformers_loads_merged_folder(tiny_release):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tiny_release["out"] / "merged"
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert (logits(hf, tiny_release["ids"]) - tiny_release["ref"]).abs().max().item() < 1e-4
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and not any("lora" in k for k in keys)  # tied, plain
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf_tok = AutoTokenizer.from_pretrained(merged)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": TEXTS[1]}]
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        ChatTokenizer(hf_tok.backend_tokenizer, CHATML).render(msgs, add_generation_prompt=True)


def test_gguf_f32_round_trip_is_exact(tiny_release, tiny_tok):
    from medlora.weights import load_folder

    merged, _ = load_folder(tiny_release["out"] / "merged")
    cfg, state, tok = read_gguf(tiny_release["out"] / "merged.gguf")
    assert same_config(cfg, merged.config) and cfg.tie_word_embeddings and "lm_head.weight" not in state
    want = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    assert set(state) == set(want)
    for k, v in want.items():
        assert torch.equal(state[k], v), k
    for text in TEXTS + ["<|im_start|>user\n12 + 34<|im_end|>"]:
        assert tok.encode(text) == tiny_tok.encode(text)
    msgs = [{"role": "user", "content": TEXTS[2]}]
    assert tok.encode_chat(msgs, True) == tiny_tok.encode_chat(msgs, True)
    assert (tok.eos_id, tok.pad_id, tok.bos_token, tok.chat_template) == \
        (tiny_tok.eos_id, tiny_tok.pad_id, tiny_tok.bos_token, tiny_tok.chat_template)


def test_transformers_gguf_loader_agrees(tiny_release):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_release["out"], gguf_file="merged.gguf", dtype=torch.float32).eval()
    assert (logits(hf, tiny_release["ids"]) - tiny_release["ref"]).abs().max().item() < 1e-4


def test_llama_cpp_runs_the_gguf(tiny_release, tiny_tok):
    """llama.cpp itself, when llama-cpp-python is installed (optional: it builds from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_release["out"] / "merged.gguf"), n_ctx=64, logits_all=True,
                          verbose=False, n_threads=1)
    ids = tiny_release["ids"][0].tolist()
    text = tiny_tok.render([{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[:len(ids)]))
    assert (got - tiny_release["ref"][0]).abs().max().item() < 1e-3


def test_run_record_has_provenance_and_hashes(tiny_release):
    out = tiny_release["out"]
    rec = json.loads((out / "run_record.json").read_text())
    assert rec["training"]["git"]["commit"] == "a" * 40 and rec["training"]["lora"]["rank"] == 4
    m = rec["metrics"]
    assert (m["base_val_loss"], m["adapter_val_loss"], m["adapter_step"]) == (4.5, 3.25, 20)
    assert m["val_curve"] == [[0, 4.5], [20, 3.25]]
    for name, entry in rec["artifacts"].items():
        assert entry["sha256"] == sha256_file(out / name), name
    assert rec["merge"]["base_loaded"]["matches_run"] is True
    assert rec["export_command"].startswith("python -m medlora.export")


@pytest.mark.parametrize("ftype", ["f16", "q8_0"])
def test_gguf_f16_q8_0_untied_within_precision(tmp_path, tiny_tok, ftype):
    import gguf

    model = tiny_model(3, vocab_size=tiny_tok.vocab_size + 5, tie_word_embeddings=False)  # 5 unused rows
    write_gguf(model, tiny_tok, tmp_path / "m.gguf", ftype)
    cfg, state, tok = read_gguf(tmp_path / "m.gguf")
    assert not cfg.tie_word_embeddings and "lm_head.weight" in state and cfg.vocab_size == model.config.vocab_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    Q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_norm.weight"] == Q.F32
    if ftype == "q8_0":
        assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["output.weight"] == Q.Q8_0
        assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 48 are not whole q8_0 blocks
    for k, v in model.state_dict().items():
        got = state[k]
        if types.get(k) == Q.F32 or v.ndim == 1:
            assert torch.equal(got, v), k
        elif ftype == "f16" or v.shape[-1] % 32:
            torch.testing.assert_close(got, v, rtol=1e-3, atol=1e-7, msg=k)
        else:  # q8_0: within one quantisation step (block absmax / 127) of every value
            blocks = v.reshape(-1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / 127
            assert ((got.reshape(-1, 32) - blocks).abs() <= step * 0.6 + 1e-9).all(), k
    assert tok.encode(TEXTS[0]) == tiny_tok.encode(TEXTS[0])


def test_merged_bfloat16(tmp_path, tiny_tok):
    from medlora.weights import load_folder

    run, _, model = make_run(tmp_path, tiny_tok)
    rc, _, err = run_main([run / "best_adapter", "--out", tmp_path / "rel", "--merge", "--dtype", "bfloat16"])
    assert rc == 0, err
    with safe_open(str(tmp_path / "rel" / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "rel" / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    merged, _ = load_folder(tmp_path / "rel" / "merged")
    ids = torch.tensor([[3, 50, 100, 7]])
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), rtol=0.05, atol=0.05)
    assert not (tmp_path / "rel" / "merged.gguf").exists()


def test_other_base_is_flagged_and_out_dir_guarded(tmp_path, tiny_tok):
    run, _, _ = make_run(tmp_path, tiny_tok)
    other = tmp_path / "other"
    save_folder(tiny_model(9, vocab_size=tiny_tok.vocab_size), tiny_tok, other)
    rc, _, err = run_main([run / "best_adapter", "--out", tmp_path / "rel", "--merge", "--model", other])
    assert rc == 0 and "differ from the run's" in err
    rec = json.loads((tmp_path / "rel" / "run_record.json").read_text())
    assert rec["merge"]["base_loaded"]["matches_run"] is False
    assert "made on other weights" in (tmp_path / "rel" / "README.md").read_text()
    rc, _, err = run_main([run / "best_adapter", "--out", run])  # clearing old exports would delete the run
    assert rc == 2 and "outside the adapter and run folder" in err and (run / "best_adapter").exists()


# ---------------------------------------------------------------------------------------------
# Model card and run record from the shipped GPU run (no weights needed)
# ---------------------------------------------------------------------------------------------
SECTIONS = ["## Model details", "## Training data", "## Training procedure", "## Evaluation", "## Intended use",
            "## Limitations", "## Not a doctor", "## System prompt", "## How to load"]


def test_model_card_has_sections_and_real_numbers():
    rec = assemble_record(GPU_RUN / "best_adapter")
    card = model_card(rec["training"], rec["metrics"], None, base=rec["base"], repo_id="someone/medlora")
    head = card.split("---")[1]
    for line in ("license: apache-2.0", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
                 "- keivalya/MedQuad-MedicalQnADataset", "- lora", "- peft", "- medical", "- en"):
        assert line in head, line
    positions = [card.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    summary = json.loads((GPU_RUN / "summary.json").read_text())
    assert f"{summary['base_val']:.4f}" in card and f"{summary['best_val']:.4f}" in card  # 2.3629, 1.5797
    assert "10.62" in card and "4.85" in card and "1,584" in card
    sha = json.loads((GPU_RUN / "config.json").read_text())["model"]["sha256"]
    assert sha in card and "Q4_1" in card  # which weights, exactly
    assert "CC BY 4.0" in card and "Ben Abacha" in card and "Demner-Fushman" in card and "BMC Bioinformatics" in card
    assert MEDICAL_SYSTEM_PROMPT in card
    assert "| learning rate | 0.0002 |" in card and "| LoRA rank r | 8 |" in card
    assert "PeftModel.from_pretrained" in card and "load_adapter" in card and "not a doctor" in card.lower()
    assert "No `eval.py` report" in card and "Phone numbers:" not in card
    # a report that caught a made-up number to call puts it among the limitations, counted from its own rate
    report = {"safety": {"tuned": {"overall": {"harmful_n": 81, "benign_n": 45, "unknown_number_rate": 0.0159}}}}
    limits = model_card(rec["training"], rec["metrics"], report, base=rec["base"]).split("## Limitations")[1]
    assert "- Phone numbers: in 2 of 126 answers to medlora's safety probes" in limits.split("## Not a doctor")[0]
    report["safety"]["tuned"]["overall"]["unknown_number_rate"] = 0.0
    assert "Phone numbers:" not in model_card(rec["training"], rec["metrics"], report, base=rec["base"])
    # what this run did, not a fixed sentence: it dropped long rows and grouped its split by question
    assert "dropped over-long rows" in card and "grouped by question so none appears" in card
    training = json.loads(json.dumps(rec["training"]))
    training.update(long_rows="truncate", split={**training["split"], "from": "docs/runs/stage1"})
    training["data"]["prep_version"] = 3
    card = model_card(training, rec["metrics"], None, base=rec["base"])
    assert "cut over-long answers at a sentence end" in card and "dropped over-long" not in card
    assert "held-out rows recorded by run `docs/runs/stage1`" in card and "the held-out rows of run docs/runs/stage1" in card
    training["split"].pop("from")
    card = model_card(training, rec["metrics"], None, base=rec["base"])
    assert "grouped by shared answer or question topic so none appears" in card
    # a second stage: step 0 is the adapter it started from, and its loss may rise on purpose
    training["init_adapter"] = "docs/runs/stage1/best_adapter"
    card = model_card(training, {**rec["metrics"], "ppl_ratio": 1.05}, None, base=rec["base"])
    assert "| the adapter this stage started from (step 0) |" in card and "| base model (step 0) |" not in card
    assert "Perplexity rises to 1.050x that of the adapter this stage started from (a stage trained" in card


def test_eval_report_and_standalone_adapter(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(GPU_RUN, run)
    report = {"heldout": {"base": {"rougeL": 0.1234, "token_f1": 0.2}, "tuned": {"rougeL": 0.3456, "token_f1": 0.4}},
              "safety": {"base": {"overall": {"refuse_or_redirect_rate": 0.5}},
                         "tuned": {"overall": {"refuse_or_redirect_rate": 0.875}}, "items": [1, 2]}}
    (run / "report.json").write_text(json.dumps(report))
    rec = assemble_record(run / "best_adapter")
    assert rec["eval_report"] == report
    card = model_card(rec["training"], rec["metrics"], rec["eval_report"], base=rec["base"])
    for s in ("| rougeL | 0.123 | 0.346 |", "| overall.refuse_or_redirect_rate | 0.500 | 0.875 |"):
        assert s in card

    lone = tmp_path / "lone"
    shutil.copytree(GPU_RUN / "best_adapter", lone)
    rec = assemble_record(lone)
    assert rec["run_dir"] is None and rec["training"]["standalone"]
    assert rec["metrics"]["adapter_val_loss"] == pytest.approx(1.5796549, abs=1e-6)
    assert rec["base"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # found by the GGUF's sha256
    card = model_card(rec["training"], rec["metrics"], base=rec["base"])
    assert "1.5797" in card and all(s in card for s in SECTIONS)


# ---------------------------------------------------------------------------------------------
# Push: no token, network failure
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("network call")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)


def test_push_without_token_fails_before_any_work(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    rc, _, err = run_main([GPU_RUN / "best_adapter", "--out", tmp_path / "rel", "--push-to-hub", "someone/medlora"])
    assert rc == 2 and NO_TOKEN in err
    assert not (tmp_path / "rel").exists()


def test_push_network_failure_names_the_repo(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    rc, out, err = run_main([GPU_RUN / "best_adapter", "--out", tmp_path / "rel", "--push-to-hub", "someone/medlora"])
    assert rc == 2 and "'someone/medlora'" in err and "ConnectionError" in err
    assert "uploading 4 files" in out  # README.md, run_record.json, adapter/ x2


# ---------------------------------------------------------------------------------------------
# End to end on the real weights and the shipped adapter
# ---------------------------------------------------------------------------------------------
def test_real_run_end_to_end(tmp_path, gguf_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok, _ = load_pretrained(gguf_path, verbose=False)  # cached: the file is read once per session
    base_dir = tmp_path / "base"
    save_folder(model, tok, base_dir)  # transformers' view of the exact base, for PEFT
    load_adapter(model, GPU_RUN / "best_adapter")  # ours, unmerged: the reference
    msgs = [{"role": "user", "content": "What is anemia? 42"}]  # short: forward passes dominate this test
    ids = torch.tensor([tok.encode_chat(msgs, add_generation_prompt=True)])
    ref = logits(model, ids)

    out = tmp_path / "rel"
    rc, stdout, err = run_main([GPU_RUN / "best_adapter", "--out", out, "--merge", "--gguf", "q8_0",
                                "--push-to-hub", "someone/medlora", "--dry-run"])
    assert rc == 0, err
    rec = json.loads((out / "run_record.json").read_text())
    assert rec["merge"]["base_loaded"]["matches_run"] is True  # the bundled GGUF, found by sha256
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    assert "2.3629" in card and "1.5797" in card and rec["artifacts"]["merged.gguf"]["sha256"] in card

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     out / "adapter").eval()
    assert (logits(peft, ids) - ref).abs().max().item() < 1e-4
    hf = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    hf_logits = logits(hf, ids)
    # Merging W + scaling*BA in fp32 rounds differently from computing the two paths apart: over
    # 30 layers that is ~1.5e-4 on logits of magnitude ~40 (relative 4e-6), so 1e-3 here.
    assert (hf_logits - ref).abs().max().item() < 1e-3
    assert hf_logits.argmax(-1).equal(ref.argmax(-1))

    cfg, state, gtok = read_gguf(out / "merged.gguf")
    assert same_config(cfg, model.config) and "lm_head.weight" not in state
    merged = hf.state_dict()
    for k, v in state.items():
        w = merged[k]
        if w.ndim == 1:
            assert torch.equal(v, w), k
        else:
            blocks = w.reshape(-1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / 127
            assert ((v.reshape(-1, 32) - blocks).abs() <= step * 0.6 + 1e-9).all(), k
    assert gtok.encode_chat(msgs, add_generation_prompt=True) == ids[0].tolist()
    # transformers' GGUF loader is checked on the tiny export (exact); on this file it adds ~20 s.


# ---------------------------------------------------------------------------------------------
# The release audit's findings (session 15)
# ---------------------------------------------------------------------------------------------
def test_a_failed_export_leaves_the_previous_release_as_it_was(tiny_release, tmp_path, monkeypatch):
    """Everything is written beside --out first: a failure late in the export (here the merged folder's
    tokenizer hits a full disk) leaves the last release whole, byte for byte, and no staging folder."""
    out = tmp_path / "release"
    shutil.copytree(tiny_release["out"], out)
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(self, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ChatTokenizer, "save", full_disk)
    rc, _, err = run_main([tiny_release["run"] / "best_adapter", "--out", out, "--merge"])
    assert rc == 2 and "No space left on device" in err and f"{out} keeps the previous one" in err
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["release"] and not list(out.glob(".export-*"))  # no staging left


def test_a_failure_while_swapping_the_release_in_puts_the_old_one_back(tiny_release, tmp_path, monkeypatch):
    """The last step moves the old entries aside and the new ones in; a failure there (here the second
    new entry's move) puts every entry back, so the release is the previous one, whole. A symlinked --out is written
    through (its target's file system holds the staging folder, so each move is a rename)."""
    import os

    real = tmp_path / "disk" / "release"
    shutil.copytree(tiny_release["out"], real)
    out = tmp_path / "release"
    out.symlink_to(real, target_is_directory=True)
    before = {p.relative_to(real).as_posix(): p.read_bytes() for p in real.rglob("*") if p.is_file()}
    calls, replace = [], os.replace

    def flaky(src, dst):  # the second new entry's move fails, after the old ones went aside
        calls.append(src)
        if ".export-new" in str(src) and sum(".export-new" in str(c) for c in calls) == 2:
            raise OSError(5, "Input/output error")
        return replace(src, dst)

    import medlora.export as E
    monkeypatch.setattr(E.os, "replace", flaky)
    rc, _, err = run_main([tiny_release["run"] / "best_adapter", "--out", out])
    assert rc == 2 and "Input/output error" in err, err
    monkeypatch.setattr(E.os, "replace", replace)
    after = {p.relative_to(real).as_posix(): p.read_bytes() for p in real.rglob("*") if p.is_file()}
    assert after == before and out.is_symlink()
    rc, _, err = run_main([tiny_release["run"] / "best_adapter", "--out", out])  # and a clean export goes through
    assert rc == 0 and (real / "adapter" / "adapter_config.json").exists() and not (real / "merged").exists()


def test_written_weights_are_readable_as_the_umask_allows(tiny_release):
    """safetensors writes 0600 whatever the umask; a release on a shared machine must be readable."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for p in (tiny_release["out"] / "adapter" / "adapter_model.safetensors", tiny_release["out"] / "merged" / "model.safetensors",
              tiny_release["run"] / "best_adapter" / "adapter_model.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_a_dry_run_checks_the_repo_id(tiny_release, tmp_path):
    rc, _, err = run_main([tiny_release["run"] / "best_adapter", "--out", tmp_path / "r", "--push-to-hub",
                           "not a valid id!!", "--dry-run"])
    assert rc == 2 and "not a valid repo id" in err and not (tmp_path / "r").exists()


def test_re_exporting_the_shipped_adapter_keeps_its_record():
    """adapters/medlora-r8 is a release itself (no run folder beside it): exporting it again finds its
    base by sha256 (the bundled GGUF's id is no file name) and keeps its training record, metrics and
    eval report, so the card comes out as shipped."""
    import tempfile

    shipped = ROOT / "adapters" / "medlora-r8"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "again"
        rc, _, err = run_main([shipped, "--out", out, "--flat"])
        assert rc == 0, err
        assert (out / "README.md").read_text() == (shipped / "README.md").read_text()
        rec, old = (json.loads((d / "run_record.json").read_text()) for d in (out, shipped))
        assert rec["training"] == old["training"] and rec["metrics"] == old["metrics"]
        assert rec["eval_report"] == old["eval_report"] and sorted(p.name for p in (out / "eval").iterdir()) == \
            ["report.json", "report.md", "report.png"]
    from medlora.export import base_spec, standalone_record

    cfg = json.loads((shipped / "adapter_config.json").read_text())
    assert standalone_record(cfg)["model"]["kind"] == "gguf"
    spec, _ = base_spec(standalone_record(cfg)["model"])
    assert sha256_file(spec) == cfg["medlora"]["base_sha256"]  # the bundled GGUF, found by its hash


def test_an_unknown_base_claims_no_license(tiny_release):
    """The card's metadata and the GGUF say Apache-2.0 only for a base known to be under it (SmolLM's);
    the tiny test base is nobody's, so the card says "other" and points at the base's own card."""
    from gguf import GGUFReader

    card = (tiny_release["out"] / "README.md").read_text()
    assert "\nlicense: other\n" in card and "apache" not in card.split("---")[1].lower()
    assert "see the base model's own card" in card
    fields = GGUFReader(str(tiny_release["out"] / "merged.gguf")).fields
    assert "general.license" not in fields
