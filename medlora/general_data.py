"""General-chat replay: the base model's own good answers to everyday prompts, mixed into training.

    python -m medlora.general_data --out data/general_replay.jsonl          # ~10 min on 2 CPU cores

Why: a MedQuAD-only LoRA drifts off-domain. On our first GPU epoch the tuned model lost a fifth
of the base model's reference containment on general prompts (0.69 -> 0.54) and began padding
one-line answers ("The capital of France is Paris. Paris is the largest city in Europe ...").
Rehearsal with the model's *own* outputs ("self-distillation" replay) is the cheapest cure for
that forgetting: the targets are what the base model already says, so they pull the adapter back
toward base behaviour on non-medical prompts without teaching it anything new.

How: everyday prompts from hand-written templates x slot fillers (facts, arithmetic and simple
logic, short writing, household advice, programming), decontaminated against every evaluation
prompt with the same n-gram rules as `medlora.safety_data` (exact or near copies are dropped; so is a
prompt stating the same numbers as an evaluation one: "Calculate 12 times 11." against "What is 12
multiplied by 11?", which an audit found in an earlier version of the file),
answered greedily by the base model under the safe system prompt (the prompt training uses), and
kept only if the answer is one we would want to rehearse: it ends its turn, has no repeated
4-gram, does not wander into medical talk, and, where the prompt has a checkable answer (a
capital, a sum), contains it; and none of the checked mistakes is around it (narrow checks: an audit showed
"The oldest is Ines, since Carla is older than Jonas." passing them): in the arithmetic and
ordering answers every number is the question's or the answer's and every stated sum holds (no
"multiply 5 by itself, which is 50. So 5 times 7 is 35"), and a hand review's list of wrong claims
(`KNOWN_WRONG`: "Dublin, which is also the capital of the United Kingdom") is dropped. The rest
are counted and dropped. Each record says which base model
wrote it; with another base model the file is still ordinary general chat data, just not its own.

The prompts are seeded (`random.Random(seed)`); the answers are the base model's greedy decoding
on this machine (fp32), so the file is reproducible up to floating-point ties.
"""
from __future__ import annotations

import argparse
import operator
import random
import re
import sys
from collections import Counter
from pathlib import Path

from .safety_data import admit, eval_prompts, write_jsonl

COUNTRIES = [("Germany", "Berlin"), ("Spain", "Madrid"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
             ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"),
             ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"),
             ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
             ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Thailand", "Bangkok"),
             ("South Korea", "Seoul"), ("Turkey", "Ankara"), ("Peru", "Lima"), ("Finland", "Helsinki"),
             ("Denmark", "Copenhagen"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
             ("Hungary", "Budapest"), ("Chile", "Santiago"), ("Vietnam", "Hanoi"), ("Cuba", "Havana")]
COUNTRY_ACCEPT = {"Brasília": ["brasília", "brasilia"]}  # spellings a right answer may use
CAPITAL_Q = ["Which city is the capital of {c}?", "Name the capital city of {c}.", "{c}'s capital is which city?",
             "Can you tell me the capital of {c}?"]

FACTS = [  # (question, accepted substrings)
    ("Which planet is closest to the Sun?", ["mercury"]),
    ("How many days are there in a leap year?", ["366"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
    ("What is the tallest mountain in the world?", ["everest"]),
    ("Which element has the chemical symbol O?", ["oxygen"]),
    ("Who developed the theory of relativity?", ["einstein"]),
    ("What is the longest river in Africa?", ["nile"]),
    ("What language do most people in Brazil speak?", ["portuguese"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("What is the smallest prime number?", ["2", "two"]),
    ("In which country are the pyramids of Giza?", ["egypt"]),
    ("Who is credited with inventing the telephone?", ["bell"]),
    ("How many minutes are there in one hour?", ["60", "sixty"]),
    ("Which color do you get by mixing blue and yellow paint?", ["green"]),
    ("Which musical instrument usually has 88 keys?", ["piano"]),
    ("Who wrote the novel Pride and Prejudice?", ["austen"]),
    ("What is the freezing point of water in degrees Fahrenheit?", ["32"]),
    ("Which metal is liquid at room temperature?", ["mercury"]),
    ("What do bees make from flower nectar?", ["honey"]),
    ("How many hours are there in a day?", ["24", "twenty-four"]),
    ("Which country gifted the Statue of Liberty to the United States?", ["france"]),
    ("What is the largest mammal on Earth?", ["whale"]),
    ("How many players are on a soccer team on the field at once?", ["11", "eleven"]),
    ("Which planet has the most famous rings?", ["saturn"]),
    ("What is the currency of Japan?", ["yen"]),
    ("Who wrote the Harry Potter books?", ["rowling"]),
    ("What is the main language spoken in Mexico?", ["spanish"]),
    ("Which gas makes up most of the air we breathe?", ["nitrogen"]),
    ("How many strings does a standard guitar have?", ["6", "six"]),
    ("What is the hardest natural material?", ["diamond"]),
    ("Which animal is the largest living bird?", ["ostrich"]),
    ("What is the opposite of the word 'ancient'?", ["modern", "new"]),
    ("What do you call a baby cat?", ["kitten"]),
    ("How many weeks are there in a year?", ["52", "fifty-two"]),
    ("Which season comes after winter?", ["spring"]),
]
NAMES = ["Anna", "Ben", "Carla", "Dev", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ITEMS = ["notebooks", "pencils", "oranges", "stickers", "marbles", "tickets", "books", "cupcakes"]
WRITING_TOPICS = ["a rainy afternoon", "the first snow of winter", "a lighthouse", "a city at night", "a lazy cat",
                  "a mountain lake", "a summer thunderstorm", "an old bookshop", "a train journey", "the moon",
                  "a busy market", "a quiet library", "a garden in spring", "a campfire", "a sunrise at the beach"]
WRITING = ["Write a short poem about {t}.", "Describe {t} in two or three sentences.",
           "Write four lines of verse about {t}.", "Write a short paragraph that describes {t}."]
MESSAGES = ["Write a short message congratulating my friend on a new job.",
            "Write a friendly reminder to my team about tomorrow's meeting at 10 am.",
            "Write a short invitation to a backyard barbecue on Saturday.",
            "Write a two-sentence apology to a friend for missing their call.",
            "Write a short birthday message for my grandfather.",
            "Write a brief note asking my landlord to fix a leaking kitchen tap.",
            "Write a short welcome message for a new member of our book club.",
            "Write a one-sentence slogan for a neighborhood bakery.",
            "Write a short toast for my sister's wedding.",
            "Write a short out-of-office reply for my email."]
ADVICE = ["change a flat tire on a bicycle", "clean a cast iron pan", "start a small vegetable garden",
          "organize a messy closet", "prepare for a job interview", "make a monthly budget", "learn a new language",
          "bake a simple loaf of bread", "fold a fitted sheet", "keep a sourdough starter alive",
          "remove a coffee stain from a shirt", "make my phone battery last longer", "write a good cover letter",
          "choose a good watermelon", "set up a home office", "take better photos with my phone",
          "get better at public speaking", "plan a road trip", "keep cut flowers fresh longer",
          "make a paper airplane that flies far", "teach a dog to sit", "make a cup of pour-over coffee",
          "pack a suitcase efficiently", "save energy at home in winter", "start running as a beginner"]
ADVICE_Q = ["How do I {a}?", "What's the best way to {a}?", "Can you give me tips to {a}?"]
CODE = [("What does CSS stand for?", ["cascading style sheets"]),
        ("What does CPU stand for?", ["central processing unit"]),
        ("In Python, what does 3 ** 2 evaluate to?", ["9"]),
        ("In Python, how do you sort a list called numbers in place?", ["sort("]),
        ("In Python, how do you convert the string '42' to an integer?", ["int("]),
        ("What keyword defines a function in Python?", ["def"]),
        ("How do you print Hello in Python?", ["print("]),
        ("In JavaScript, how do you write a single-line comment?", ["//"]),
        ("What does the git command 'git clone' do?", []),
        ("Write a Python function that checks whether a number is even.", ["def "]),
        ("Write a Python loop that prints the numbers from 1 to 5.", ["range(1, 6)", "range(1,6)"]),
        ("What is a variable in programming?", []),
        ("What is the difference between a compiler and an interpreter?", []),
        ("Write a SQL query that counts the rows in a table named orders.", ["count("]),
        ("In Python, how do you get the last element of a list called items?", ["[-1]"]),
        ("What does JSON stand for?", ["javascript object notation"]),
        ("Write a Python function that returns the largest number in a list.", ["def "]),
        ("What is an API?", []),
        ("In Python, what does 'hello'.upper() return?", ["'HELLO'", '"HELLO"']),  # (capitals: case counts)
        ("How do you create an empty dictionary in Python?", ["{}", "dict()"])]


def _arith(r: random.Random) -> tuple[str, list[str]]:
    kind = r.randrange(6)
    a, b = r.randint(3, 60), r.randint(2, 40)
    if kind == 0:
        return f"What is {a} plus {b}?", [str(a + b)]
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What do you get if you subtract {b} from {a}?", [str(a - b)]
    if kind == 2:
        a, b = r.randint(2, 15), r.randint(2, 12)
        return f"Calculate {a} times {b}.", [str(a * b)]
    if kind == 3:
        b, q = r.randint(2, 9), r.randint(2, 12)
        return f"What is {b * q} divided by {b}?", [str(q)]
    if kind == 4:
        n, p, item = r.randint(2, 9), r.randint(2, 12), r.choice(ITEMS)
        return f"{r.choice(NAMES)} buys {n} {item} at ${p} each. How much do they spend in total?", [str(n * p)]
    n, k, item = r.randint(10, 40), r.randint(2, 9), r.choice(ITEMS)
    return f"{r.choice(NAMES)} had {n} {item} and gave away {k}. How many are left?", [str(n - k)]


def _logic(r: random.Random) -> tuple[str, list[str]]:
    if r.random() < 0.5:
        x, y, z = r.sample(NAMES, 3)
        return (f"{x} is older than {y}, and {y} is older than {z}. Who is the oldest of the three?", [x.lower()])
    d, k = r.randrange(7), r.randint(1, 5)
    return (f"If it is {DAYS[d]} today, which day of the week was it {k} day{'s' if k > 1 else ''} ago?",
            [DAYS[(d - k) % 7].lower()])


def numbers_of(text: str) -> tuple[str, ...]:
    """The numbers a prompt states, sorted: "Calculate 12 times 11." and "What is 12 multiplied by 11?"
    are the same problem in other words, which the n-gram rules do not see."""
    return tuple(sorted(re.findall(r"\d+(?:\.\d+)?", text)))


def make_prompts(n: int, seed: int = 0, references: list[str] | None = None) -> tuple[list[dict], Counter]:
    """Up to n unique, decontaminated prompts: [{"prompt", "category", "accept"}]. Besides the n-gram
    rules, a prompt stating the same two or more numbers as an evaluation prompt is dropped."""
    refs = eval_prompts(_eval_files()) if references is None else references
    r = random.Random(seed)
    fixed = ([("fact", CAPITAL_Q[i % len(CAPITAL_Q)].format(c=c), COUNTRY_ACCEPT.get(cap, [cap.lower()]))
              for i, (c, cap) in enumerate(COUNTRIES)]
             + [("fact", q, a) for q, a in FACTS] + [("coding", q, a) for q, a in CODE]
             + [("writing", m, []) for m in MESSAGES]
             + [("writing", w.format(t=t), []) for t in WRITING_TOPICS for w in r.sample(WRITING, 2)]
             + [("advice", q.format(a=a), []) for a in ADVICE for q in r.sample(ADVICE_Q, 1)])
    out, seen, counts = [], set(), Counter()
    problems = {k for k in map(numbers_of, refs) if len(k) >= 2}

    def add(cat: str, prompt: str, accept: list[str]) -> None:
        if not admit(prompt, seen, refs, counts):
            return
        if numbers_of(prompt) in problems:  # another wording of an evaluated problem teaches its answer
            counts["dropped_same_numbers"] += 1
            return
        out.append({"prompt": prompt, "category": cat, "accept": accept})

    for item in fixed:
        add(*item)
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        cat = "reasoning"
        add(cat, *(_arith(r) if r.random() < 0.7 else _logic(r)))
    return out[:n], counts


def _eval_files() -> list[Path]:
    root = Path(__file__).resolve().parents[1] / "data"
    return [root / "safety_probes.jsonl", root / "eval_medical.jsonl", root / "eval_general.jsonl"]


# Wrong claims found by reading the kept answers (a hand review of the file): an answer that contains the
# accepted word can still be wrong around it. Lower-case phrases; any answer containing one is dropped.
KNOWN_WRONG = ["also the capital of", "but it's not a prime number"]
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.]*\d)")
_RESULT = {"plus": operator.add, "+": operator.add, "minus": operator.sub, "-": operator.sub,
           "times": operator.mul, "*": operator.mul, "x": operator.mul, "×": operator.mul,
           "divided by": operator.truediv, "÷": operator.truediv, "/": operator.truediv}
_CLAIM = re.compile(r"(\d+)\s*(plus|\+|minus|-|times|\*|x|×|divided by|÷|/)\s*\$?(\d+)\s*(?:=|is|equals)\s*\$?(\d+)")


def reasoning_problem(prompt: str, text: str, accept: list[str]) -> str | None:
    """For the arithmetic and ordering prompts: a number that is neither in the prompt nor the answer
    (an invented age, a wrong intermediate: "multiply 5 by itself, which is 50"), a false "a op b = c",
    a wrong unit ("$24 cents"), or the wrong person named oldest or youngest."""
    low = text.lower()
    allowed = set(_NUMBER.findall(prompt)) | set(accept)
    extra = [n for n in _NUMBER.findall(low) if n not in allowed]
    if extra:
        return f"number {extra[0]} is not in the question or the answer"
    for a, op, b, c in _CLAIM.findall(low):
        if float(b) != 0 and abs(_RESULT[op](float(a), float(b)) - float(c)) > 1e-9:
            return f"false arithmetic: {a} {op} {b} = {c}"
    if "$" in prompt and re.search(r"\bcents?\b", low):
        return "cents for a price in dollars"
    bought = re.search(r"buys \d+ (\w+) at \$", prompt)
    if bought and any(re.search(rf"\b{re.escape(a)} {bought.group(1)}\b", low) for a in accept):
        return f"the total is money, not {bought.group(1)}"
    m = re.match(r"(\w+) is older than (\w+), and \2 is older than (\w+)", prompt)
    if m:
        named = {"oldest": m.group(1).lower(), "youngest": m.group(3).lower()}
        for who, what in re.findall(r"\b(\w+) is the (oldest|youngest)\b", low):
            if who != named[what]:
                return f"{who} is not the {what}"
    return None


def keep_answer(text: str, ended: bool, accept: list[str], prompt: str = "", category: str = "") -> str | None:
    """Why an answer is not worth rehearsing, or None to keep it."""
    from .evaluate import contains_answer, has_repeated_ngram, medical_talk

    if not ended:
        return "did not end"
    if len(text.split()) < 2:
        return "too short"
    if has_repeated_ngram(text):
        return "repeated 4-gram"
    if medical_talk(text):
        return "medical talk"
    case_sensitive = [a for a in accept if a != a.lower()]  # ('HELLO' is right, 'hello' is not)
    if case_sensitive and not any(a in text for a in case_sensitive):
        return "wrong answer"
    if accept and not case_sensitive and not contains_answer(text, accept):
        return "wrong answer"
    if any(phrase in text.lower() for phrase in KNOWN_WRONG):
        return "wrong claim"
    if category == "reasoning" and reasoning_problem(prompt, text, accept):
        return "wrong reasoning"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/general_replay.jsonl")
    ap.add_argument("--model", default="bundled", help="the base model whose answers are rehearsed")
    ap.add_argument("--n", type=int, default=300, help="prompts to try (fewer answers are kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.n <= 0:
        ap.error("--n must be positive")
    import torch
    from tqdm import tqdm

    from .generate import GenConfig, generate
    from .tokenizer import with_safety_prompt
    from .weights import load_pretrained

    prompts, counts = make_prompts(args.n, args.seed)
    model, tok, info = load_pretrained(args.model, device=args.device, verbose=True)
    model.eval()
    cfg = GenConfig(max_new_tokens=args.max_new_tokens)
    records, why = [], Counter()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["prompt"]))  # similar lengths batch well
    with torch.no_grad():
        for s in tqdm(range(0, len(order), args.batch_size), desc="base answers", unit="batch"):
            batch = [prompts[i] for i in order[s: s + args.batch_size]]
            ids = [tok.encode_chat(with_safety_prompt([{"role": "user", "content": p["prompt"]}]), True) for p in batch]
            for p, g in zip(batch, generate(model, tok, ids, cfg)):
                text = g.text.strip()
                reason = keep_answer(text, g.finish_reason == "stop", p["accept"], p["prompt"], p["category"])
                why[reason or "kept"] += 1
                if reason is None:
                    records.append({"messages": [{"role": "user", "content": p["prompt"]},
                                                 {"role": "assistant", "content": text}],
                                    "category": p["category"], "source": f"self-distilled from {info.get('id')}"})
    records.sort(key=lambda x: (x["category"], x["messages"][0]["content"]))
    write_jsonl(records, args.out)
    print(f"wrote {len(records)} of {len(prompts)} base answers to {args.out}; dropped: "
          + ", ".join(f"{k} {v}" for k, v in why.items() if k != "kept")
          + f"; prompts dropped for overlap with evaluation prompts: "
            f"{counts['dropped_exact'] + counts['dropped_near'] + counts['dropped_same_numbers']}")
    print("kept per category: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(x['category'] for x in records).items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
