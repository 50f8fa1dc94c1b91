"""Seeded samples of exact token lengths cut from a haystack: the tasks (lm, passkey, kv_retrieval,
needle), task mixtures, and the answer options of a mixture spec."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import HeadplanError

TASKS = ("lm", "passkey", "kv_retrieval", "needle")
ANSWER_TASKS = ("passkey", "kv_retrieval", "needle")
ANSWER_SOURCES = ("reference", "model")

NEEDLE_PLACES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Dakar", "Cusco", "Bergen", "Hanoi",
                 "Tucson", "Porto", "Krakow", "Accra", "Leeds", "Perth")
NEEDLE_THINGS = ("eat a sandwich in the park", "ride the old tram", "swim at dawn", "read in the library",
                 "watch the ships", "climb the clock tower", "buy blue pottery", "listen to the choir",
                 "walk along the river", "visit the glass museum", "fly a red kite", "play chess by the fountain")


@dataclass(frozen=True)
class Sample:
    """One sample: the prompt ids, and for retrieval tasks the expected answer."""

    task: str
    input_ids: tuple[int, ...]
    answer: str = ""
    answer_ids: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Haystack:
    """Tokenised haystack plus the tokenizer, to cut seeded samples of exact token lengths."""

    def __init__(self, tokenizer, text: str):
        self.tok = tokenizer
        self.ids = self.encode(text)
        if len(self.ids) < 64:
            raise HeadplanError(f"calibration text is too short ({len(self.ids)} tokens; need at least 64)")
        self.chat = getattr(tokenizer, "chat_template", None) is not None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def filler(self, rng: random.Random, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            start = rng.randrange(0, max(1, len(self.ids) - 1))
            out.extend(self.ids[start:start + n - len(out)])
        return out[:n]

    def wrap(self, instruction: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
        """Token ids before the haystack and after it (chat format when the tokenizer has one)."""
        if self.chat:
            pre = self.tok.apply_chat_template([{"role": "user", "content": instruction + "\n\n@@HAY@@\n\n" + question}],
                                               tokenize=False, add_generation_prompt=True)
            head, tail = pre.split("@@HAY@@")
            return self.encode(head), self.encode(tail + answer_prefix)
        return self.encode(instruction + "\n\n"), self.encode("\n\n" + question + "\n" + answer_prefix)


def _insert(filler: list[int], pieces: list[tuple[float, list[int]]]) -> list[int]:
    out = list(filler)
    for depth, ids in sorted(pieces, key=lambda x: -x[0]):
        at = int(round(depth * len(out)))
        out[at:at] = ids
    return out


def make_sample(hay: Haystack, task: str, length: int, rng: random.Random, opts: dict) -> Sample:
    if task == "lm":
        return Sample("lm", tuple(hay.filler(rng, length)), meta={"task": "lm"})
    if task == "passkey":
        digits = int(opts.get("digits", 5))
        nkeys = int(opts.get("keys", 1))
        depths = list(opts.get("depths", [0.5]))
        names = ["red", "blue", "green", "gold", "silver", "black", "white", "amber"][:max(1, nkeys)]
        keys = [str(rng.randrange(10 ** (digits - 1), 10 ** digits)) for _ in names]
        target = rng.randrange(len(names))
        pieces = []
        for i, (nm, key) in enumerate(zip(names, keys)):
            d = depths[(i + rng.randrange(len(depths))) % len(depths)] if i != target else rng.choice(depths)
            sent = f" The {nm} pass key is {key}. Remember it. {key} is the {nm} pass key. "
            pieces.append((d, hay.encode(sent)))
        head, tail = hay.wrap("There are pass keys hidden in the text below. Find them and remember them.",
                              f"What is the {names[target]} pass key?", f"The {names[target]} pass key is ")
        fixed = len(head) + len(tail) + sum(len(p[1]) for p in pieces)
        if fixed + 16 > length:
            raise HeadplanError(f"length {length} is too short for a passkey sample (needs > {fixed + 16} tokens)")
        ids = head + _insert(hay.filler(rng, length - fixed), pieces) + tail
        ans = keys[target]
        return Sample("passkey", tuple(ids), ans, tuple(hay.encode(ans)),
                      meta={"task": "passkey", "depth": pieces[target][0], "key": ans, "context": len(ids) - len(tail)})
    if task == "kv_retrieval":
        pairs = int(opts.get("pairs", 20))
        hexs = "0123456789abcdef"
        kv = [("".join(rng.choice(hexs) for _ in range(8)), "".join(rng.choice(hexs) for _ in range(8)))
              for _ in range(pairs)]
        target = rng.randrange(pairs)
        lines = "\n".join(f"{k}: {v}" for k, v in kv)
        head, tail = hay.wrap("Below is a list of key: value lines inside unrelated text.",
                              f"What is the value for key {kv[target][0]}?", f"The value for key {kv[target][0]} is ")
        table = hay.encode("\n" + lines + "\n")
        fixed = len(head) + len(tail) + len(table)
        if fixed + 16 > length:
            raise HeadplanError(f"length {length} is too short for {pairs} key-value pairs (needs > {fixed + 16})")
        ids = head + _insert(hay.filler(rng, length - fixed), [(rng.random(), table)]) + tail
        ans = kv[target][1]
        return Sample("kv_retrieval", tuple(ids), ans, tuple(hay.encode(ans)), meta={"task": "kv_retrieval", "context": len(ids) - len(tail)})
    if task == "needle":
        # a one-sentence fact hidden in the text, and a question about it (needle in a haystack)
        place = rng.choice(NEEDLE_PLACES)
        thing = rng.choice(NEEDLE_THINGS)
        depth = rng.choice(list(opts.get("depths", [0.5])))
        needle = hay.encode(f" The best thing to do in {place} is to {thing}. ")
        head, tail = hay.wrap("A fact is hidden somewhere in the text below. Read it carefully.",
                              f"What is the best thing to do in {place}?", f"The best thing to do in {place} is to ")
        fixed = len(head) + len(tail) + len(needle)
        if fixed + 16 > length:
            raise HeadplanError(f"length {length} is too short for a needle sample (needs > {fixed + 16} tokens)")
        ids = head + _insert(hay.filler(rng, length - fixed), [(depth, needle)]) + tail
        return Sample("needle", tuple(ids), thing, tuple(hay.encode(thing)),
                      meta={"task": "needle", "depth": depth, "place": place, "context": len(ids) - len(tail)})
    raise HeadplanError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def mixture_counts(spec: dict, n: int | None = None) -> list[int]:
    """How many of ``n`` samples per length (default: the spec's ``samples_per_length``) each task of the
    mixture gets: a deterministic largest-remainder split by ``share``. Needs no model."""
    tasks = spec.get("tasks") or []
    if not tasks:
        raise HeadplanError("data spec has no tasks")
    n = int(n if n is not None else spec.get("samples_per_length", 4))
    if n < 1:
        raise HeadplanError(f"--samples must be at least 1, got {n}")
    shares = [float(t.get("share", 1.0)) for t in tasks]
    for t in tasks:
        if t.get("task") not in TASKS:
            raise HeadplanError(f"data spec: unknown task {t.get('task')!r} (known: {', '.join(TASKS)})")
    tot = sum(shares)
    raw = [s / tot * n for s in shares]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_samples(hay: Haystack, spec: dict, length: int, n: int | None = None, reserve: int = 0) -> list[Sample]:
    """Seeded samples of exactly ``length`` tokens following a task mixture spec.

    With ``reserve`` > 0, samples of the answer tasks (passkey, kv_retrieval, needle) are cut
    ``reserve`` tokens shorter, leaving room for an answer appended after the prompt (profiling with
    a loss on answer tokens). Every sample's ``meta`` records how it was made (task, options, seed).
    """
    tasks = spec.get("tasks") or []
    counts = mixture_counts(spec, n)
    seed = int(spec.get("seed", 0))
    out = []
    for t, c in zip(tasks, counts):
        for i in range(c):
            key = f"{seed}:{length}:{t['task']}:{i}"
            rng = random.Random(key)
            cut = reserve if t["task"] in ANSWER_TASKS else 0
            s = make_sample(hay, t["task"], length - cut, rng, t)
            s.meta.update({"rng": key, "length": length, "options": {k: v for k, v in t.items() if k != "share"}})
            out.append(s)
    return out


def answer_options(spec: dict) -> tuple[str, int, float]:
    """(answers source, answer tokens reserved, lm loss tail share) from a mixture spec.

    ``answers: model`` makes the dense model write the answers the loss is taken on (MoA);
    ``answers: reference`` (default) uses the true answers. ``answer_tokens`` (default 8) is the
    room left for an answer; ``lm_tail`` (default 0.125) the share of an lm sample's tokens, at its
    end, that the loss is taken on.
    """
    src = str(spec.get("answers", "reference"))
    if src not in ANSWER_SOURCES:
        raise HeadplanError(f"data spec: answers must be one of {', '.join(ANSWER_SOURCES)}, got {src!r}")
    try:
        r = int(spec.get("answer_tokens", 8))
        tail = float(spec.get("lm_tail", 0.125))
    except (TypeError, ValueError):
        raise HeadplanError("data spec: answer_tokens must be an integer and lm_tail a number") from None
    if not 1 <= r <= 256:
        raise HeadplanError(f"data spec: answer_tokens must be in [1, 256], got {r}")
    if not 0.0 < tail <= 0.9:
        raise HeadplanError(f"data spec: lm_tail must be in (0, 0.9], got {tail}")
    return src, r, tail
