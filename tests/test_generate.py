"""Generation against transformers' `generate`, cache vs no cache, batching, sampling, streaming."""
from __future__ import annotations

import copy

import pytest
import torch

from medlora.generate import GenConfig, generate, generate_ids, stream_text

from helpers import DEVICES  # noqa: E402  (tests/ is on sys.path)

CHATS = [
    "What is high blood pressure?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
]


def prompts(tok):
    return [tok.encode_chat([{"role": "user", "content": c}], add_generation_prompt=True) for c in CHATS]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_matches_transformers_generate(ours, hf_model, device):
    model, tok = ours
    if device != "cpu":
        model, hf_model = copy.deepcopy(model).to(device), copy.deepcopy(hf_model).to(device)
    for p in prompts(tok):
        mine = generate(model, tok, [p], GenConfig(max_new_tokens=40, stop_ids={-1}))[0].ids
        with torch.no_grad():
            # attention_mask explicitly: pad = <|im_end|> here, so HF would otherwise mask every
            # <|im_end|> in the prompt as if it were padding.
            x = torch.tensor([p], device=device)
            ref = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False,
                                    eos_token_id=None, pad_token_id=tok.pad_id)[0, len(p):].tolist()
        assert mine == ref


@pytest.mark.parametrize("device", DEVICES)
def test_cached_equals_uncached_and_batched_equals_single(ours, device):
    model, tok = ours
    model = model if device == "cpu" else copy.deepcopy(model).to(device)
    ps = prompts(tok)
    n = 24
    single = [generate(model, tok, [p], GenConfig(max_new_tokens=n, stop_ids={-1}))[0].ids for p in ps]
    batched = [g.ids for g in generate(model, tok, ps, GenConfig(max_new_tokens=n, stop_ids={-1}))]
    assert batched == single  # left padding changes nothing
    # Uncached: recompute the whole sequence each step.
    p = ps[0]
    x = torch.tensor([p], device=device)
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], 1)
    assert x[0, len(p):].tolist() == single[0]


def test_seeded_sampling_is_reproducible_and_stops(ours):
    model, tok = ours
    p = prompts(tok)[1]
    cfg = GenConfig(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=7)
    a = generate(model, tok, [p], cfg)[0]
    b = generate(model, tok, [p], cfg)[0]
    c = generate(model, tok, [p], GenConfig(**{**cfg.__dict__, "seed": 8}))[0]
    assert a.ids == b.ids and a.ids != c.ids
    short = generate(model, tok, [p], GenConfig(max_new_tokens=3, stop_ids={-1}))[0]
    assert len(short.ids) == 3 and short.finish_reason == "length"
    capital = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    full = generate(model, tok, [capital], GenConfig(max_new_tokens=40))[0]
    assert full.finish_reason == "stop" and tok.eos_id not in full.ids


def test_stream_never_splits_multibyte_characters(ours):
    _, tok = ours
    text = "Fièvre 🤒 → 发烧 and naïve café ✅"
    ids = tok.encode(text)
    pieces = list(stream_text(tok, iter(ids), stop_ids={tok.eos_id}))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 3  # it really streamed


def test_generate_ids_yields_none_after_stop(ours):
    model, tok = ours
    ps = prompts(tok)[:2]
    steps = list(generate_ids(model, ps, GenConfig(max_new_tokens=5, stop_ids=set(range(tok.vocab_size)))))
    assert len(steps) == 1  # every token is a stop token: both rows stop at once


def test_no_repeat_ngram_never_changes_a_digit_within_a_number():
    """NgramBan with the tokenizer's number tokens: a digit is never banned, a separator only
    away from a digit, any other token as before, and a run of digits and separators longer than
    MAX_NUMBER_TOKENS is banned again (so "1-1-1-1-..." cannot loop)."""
    from medlora.generate import NgramBan

    CALL, SP, DASH, OR, DOT = 100, 101, 102, 103, 104
    digits, seps = frozenset(range(10)), frozenset({SP, DASH, DOT})
    row = [CALL, SP, 9, 1, 1, OR, CALL, SP, 9]  # "call 911 or call 9": 4-grams seen once, the last one open
    hf, ours = NgramBan(4, [row]), NgramBan(4, [row], (digits, seps))
    assert hf.banned() == [[1]] and ours.banned() == [[]]  # transformers' rule bans the second 911's "1"
    for ban in (hf, ours):
        ban.push([1]), ban.push([1])
    assert hf.banned() == ours.banned() == [[OR]]  # a word after the number: banned as before

    row = [7, DASH, 4, 5, OR, 7, DASH, 4]  # "7-45 or 7-4": after a digit, a separator stays allowed
    assert NgramBan(3, [row], (digits, seps)).banned() == [[]] and NgramBan(3, [row]).banned() == [[5]]
    row = [CALL, OR, SP, CALL, OR]  # a separator that follows no digit is banned as before
    assert NgramBan(3, [row], (digits, seps)).banned() == [[SP]]

    # A second number in a list is a number of its own: ", " and the space before it are not part of it
    # (counted as one run, "call 988, 1-800-273-825" reached 16 tokens and its last digit was banned again).
    COMMA = 105
    seps = seps | {COMMA}
    number = [1, DASH, 8, 0, 0, DASH, 2, 7, 3, DASH, 8, 2, 5, 5]
    row = [SP, *number, OR, SP, 9, 8, 8, COMMA, SP, *number[:-1]]
    assert NgramBan(4, [row], (digits, seps)).banned() == [[]] and NgramBan(4, [row]).banned() == [[5]]

    loop = [1, DASH] * 8  # 16 tokens of "1-1-...": longer than a number, so the rule bans again
    run = NgramBan(3, [loop[:-1]], (digits, seps))
    assert run.banned() == [[]]  # 15 tokens: still a number
    run.push([DASH])
    assert run.banned() == [[1]]


def test_a_number_written_twice_stays_the_same(gguf_path):
    """The shipped adapter's made-up hotline numbers came from transformers' no-repeat rule: after one
    "call 911", a second "call 9" cannot be followed by "1" (the 4-gram was seen), so the model wrote
    another number ("call 221", "call 112 ... crisis line"). Here the answer so far holds one
    "call 911" and the next words are "call "; our rule lets it write 911 again."""
    from medlora.lora import load_adapter
    from medlora.shipped import DEFAULT_ADAPTER
    from medlora.tokenizer import with_safety_prompt
    from medlora.weights import load_pretrained

    model, tok, _ = load_pretrained(gguf_path, verbose=False)
    load_adapter(model, DEFAULT_ADAPTER, merge=True)
    chat = with_safety_prompt([{"role": "user", "content": "What should I do if someone faints?"}])
    so_far = ("If someone has fainted, call 911 or your local emergency number right away. If someone is "
              "choking or not breathing, call ")
    prompt = tok.encode_chat(chat, add_generation_prompt=True) + tok.encode(so_far)
    cfg = dict(max_new_tokens=4, stop_ids={-1}, no_repeat_ngram=4)
    ours = generate(model, tok, [prompt], GenConfig(**cfg))[0].text
    theirs = generate(model, tok, [prompt], GenConfig(**cfg, no_repeat_keeps_numbers=False))[0].text
    assert ours.startswith("911"), ours
    other = tok.encode_chat(with_safety_prompt([{"role": "user", "content": "What is anemia?"}]), add_generation_prompt=True)
    assert generate(model, tok, [other, prompt], GenConfig(**cfg))[1].text == ours  # left-padded in a batch too
    assert not theirs.startswith("911"), theirs  # transformers' rule: another number ("112 or" here)


def test_no_repeat_ngram_matches_transformers_and_never_repeats(ours, hf_model):
    """Greedy with no_repeat_ngram=3 equals HF's no_repeat_ngram_size=3 (prompt included), and no
    3-gram that ends in the answer occurred before; batching with left padding gives the same rows."""
    model, tok = ours
    ps = prompts(tok)
    cfg = GenConfig(max_new_tokens=60, stop_ids={-1}, no_repeat_ngram=3, no_repeat_keeps_numbers=False)  # HF's rule
    single = []
    for p in ps:
        mine = generate(model, tok, [p], cfg)[0].ids
        with torch.no_grad():
            x = torch.tensor([p])
            ref = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=60, do_sample=False,
                                    no_repeat_ngram_size=3, eos_token_id=None, pad_token_id=tok.pad_id)[0, len(p):]
        assert mine == ref.tolist()
        row = p + mine
        grams = [tuple(row[i:i + 3]) for i in range(len(row) - 2)]
        assert all(grams[i] not in grams[:i] for i in range(len(p) - 2, len(grams)))  # the prompt may repeat itself
        single.append(mine)
    assert [g.ids for g in generate(model, tok, ps, cfg)] == single
    plain = generate(model, tok, ps[:1], GenConfig(max_new_tokens=60, stop_ids={-1}))[0].ids
    assert plain != single[0]  # the ban really changed something (the plain greedy answer loops)


def test_compiled_norm_rounds_as_eager_does_in_bf16():
    """In a one-token decode step RMSNorm sums its squares in fp64, so the compiled step (inductor's
    reduction order) gives the eager norm's bits exactly. With the fp32 sum, ~1 row in 1,000 of bf16
    activations came out another bf16 step, and compiled int8/int4 decoding left eager's greedy tokens at
    token 22 / 26 of the bench's 80 (bench/results/cpu-xeon-gen-s20.md)."""
    from medlora.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5).to(torch.bfloat16).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
        x = (torch.randn(6000, 1, 576) * torch.linspace(0.01, 8, 6000)[:, None, None]).to(torch.bfloat16)  # [B, 1 token, C]
        compiled = torch.compile(norm, dynamic=True, options={"emulate_precision_casts": True})
        assert torch.equal(compiled(x), norm(x))
        assert torch.equal(compiled(x[:1]), norm(x[:1]))  # batch 1


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_step_gives_the_eager_tokens(device):
    """serve.py --compile: the torch.compile'd decode step decodes exactly what the eager model does,
    for one row and for a left-padded batch (the masked path), on another thread too (the HTTP
    worker's); it really compiled, and other answer lengths and batch sizes reuse its graphs; a copy
    of the model decodes with its own weights. The same with cuda_graphs=True (fixed-shape steps; on a
    CPU inductor skips the graphs themselves, on a GPU it replays them: what the GPU bench measures).
    A tiny model keeps compiling short."""
    import copy
    import threading

    from helpers import tiny_model
    from torch._dynamo.utils import counters

    from medlora.generate import compile_decoding, decoder
    from medlora.model import init_weights

    eager = init_weights(tiny_model(), seed=1, std=0.5).to(device)  # large weights: varied tokens, not one repeated
    cfg = GenConfig(max_new_tokens=12, stop_ids={-1})
    rows = [[5, 9, 17, 3, 44, 2], [8, 1, 60]]
    for graphs in (True, False):
        compiled = compile_decoding(copy.deepcopy(eager), cuda_graphs=graphs)
        counters.clear()
        for batch in ([rows[0]], rows):
            want = [s for s in generate_ids(eager, batch, cfg)]
            assert len({tuple(s) for s in want}) > 6
            assert [s for s in generate_ids(compiled, batch, cfg)] == want
        graphs_made = counters["stats"]["unique_graphs"]
        assert graphs_made >= 1  # dynamo did compile (not an eager fallback)
        for n, batch in ((5, [rows[1]]), (20, [rows[0][:4]]), (7, [rows[1], rows[0], rows[0][:2]])):
            other = GenConfig(max_new_tokens=n, stop_ids={-1})
            assert [s for s in generate_ids(compiled, batch, other)] == [s for s in generate_ids(eager, batch, other)]
        assert counters["stats"]["unique_graphs"] == graphs_made  # other cache lengths and batch sizes: no recompiling
    if device == "cuda":
        return  # (the threads and int8/int4 below are CPU paths)
    got = []
    t = threading.Thread(target=lambda: got.extend(generate_ids(compiled, rows, cfg)))
    t.start()
    t.join()
    assert got == [s for s in generate_ids(eager, rows, cfg)]
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    other = copy.deepcopy(compiled)  # a copy is a new model: eager until compiled itself
    assert decoder(other) is other and decoder(compiled) is not compiled
    # Int8 and int4 models: bf16 activations, fp32 attention; compiled fusion must round as eager does.
    # (In this tiny model down_proj's 48 inputs are no multiple of 32: int4 keeps it int8.)
    from medlora.quant import int4_supported, int8_supported, quantize_int4, quantize_int8

    for quantize, supported in ((quantize_int8, int8_supported()), (quantize_int4, int4_supported())):
        if supported:
            q_eager = quantize(copy.deepcopy(eager))
            with pytest.raises(RuntimeError, match="already quantised"):  # the codes would be quantised again
                quantize_int8(q_eager)
            q_compiled = compile_decoding(copy.deepcopy(q_eager))
            want = [s for s in generate_ids(q_eager, rows, cfg)]
            assert [s for s in generate_ids(q_compiled, rows, cfg)] == want


def test_bf16_model_decodes_over_an_fp32_cache_on_cpu():
    """On a CPU the KV cache (and so decode attention) is fp32 even for a bf16 model: PyTorch's bf16
    CPU attention is several times slower for one query token. Activations stay bf16, and the
    cached step still agrees with recomputing the whole sequence."""
    from helpers import tiny_model

    from medlora.generate import cache_dtype
    from medlora.model import KVCache, init_weights

    model = init_weights(tiny_model(), seed=1, std=0.5).to(torch.bfloat16).eval()
    assert cache_dtype(model) == torch.float32
    ids = torch.tensor([[5, 9, 17, 3, 44, 2, 8, 60]])
    cache = KVCache(model.config, 1, 16, "cpu", cache_dtype(model))
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache)[:, -1]
        full = model(ids)[:, -1]
    assert cache.k[0].dtype == torch.float32 and step.dtype == torch.bfloat16
    assert (step.float() - full.float()).abs().max() <= 0.03 * full.float().abs().max()
    assert step.argmax() == full.argmax()


def test_tiny_temperature_is_greedy_not_nan():
    """Dividing logits by a temperature near 0 overflowed to inf and softmax gave NaN (the HTTP API
    accepts any 0 <= temperature <= 2); shifted by the largest logit first, it picks the argmax."""
    from medlora.generate import sample_next

    logits = torch.tensor([[25.0, 3.0, -4.0], [-1.0, 7.5, 7.0]])
    for t in (1e-38, 1e-45, 5e-324, 0.7):
        gen = torch.Generator().manual_seed(0)
        tok = sample_next(logits, None, GenConfig(temperature=t, max_new_tokens=1), gen)
        if t < 1:  # (0.7 samples; only its shape and range are checked)
            assert tok.tolist() == [0, 1], t
        assert tok.shape == (2,)


def test_repetition_penalty_ignores_left_padding():
    """A left-padded row decodes as it would alone: the pad id is no token the row has seen (it was
    penalised, so a row that alone would emit the pad id's token emitted another one batched)."""
    import random

    from helpers import tiny_model

    model = tiny_model().eval()
    rng = random.Random(0)
    long = list(range(10, 40))
    cfg = GenConfig(max_new_tokens=8, repetition_penalty=3.0, stop_ids={-1})
    changed = 0
    for _ in range(200):
        short = [rng.randrange(3, 97) for _ in range(rng.randrange(2, 6))]
        alone = [s[0] for s in generate_ids(model, [short], cfg, pad_id=2)]
        batched = [s[0] for s in generate_ids(model, [short, long], cfg, pad_id=2)]
        assert batched == alone, short
        changed += 2 in alone
    assert changed  # some row alone emits the pad id's token: the case that differed before
