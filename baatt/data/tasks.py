"""Synthetic long-context tasks built into real text (RULER-style), in token space.

Each generator takes a haystack stream (real text tokens), inserts needles at
sentence boundaries near the requested depths, appends a question whose answer
span sits at the end of the sequence, and returns a :class:`TaskExample` that
says where every needle was placed and where the answer is. Sequences are
exactly ``length`` tokens long. The answer is what a masked-diffusion model
fills in: mask ``tokens[answer_start:answer_end]`` and compare.

Tasks: ``passkey`` (one key in the haystack), ``multikey_niah`` (several
key-value needles, one queried), ``variable_tracking`` (a chain of variable
assignments plus a distractor chain; answer: every variable of the chain).

The tokenizer is GPT-2's (``baatt.data.get_tokenizer``) or any other with
``encode``, ``decode`` and ``vocab_size``, e.g. a GGUF model's
(``baatt.data.gguf_tokenizer.GGUFTokenizer``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from baatt.data.tokenizer import Tokenizer

MIN_LENGTH = 64
# Shortest length at which each task's default needles + question leave room for a haystack
# (passkey: ~30 fixed tokens; multi-key NIAH with 4 needles: ~105; variable tracking with 4 hops: ~153).
DEFAULT_MIN_LENGTH = {"passkey": 64, "multikey_niah": 256, "variable_tracking": 256}
MAX_LENGTH = 131072

_ADJ = (
    "quiet", "amber", "brisk", "crimson", "distant", "eager", "frozen", "gentle", "hollow", "ivory",
    "jolly", "kind", "lunar", "misty", "noble", "olive", "proud", "rapid", "silver", "tidy",
    "upper", "vivid", "wooden", "young", "zesty", "bold", "calm", "dusty", "empty", "fancy",
)
_NOUN = (
    "harbor", "falcon", "garden", "lantern", "meadow", "orchard", "pepper", "quartz", "river", "saddle",
    "thimble", "umbrella", "valley", "walnut", "window", "anchor", "basket", "candle", "dolphin", "engine",
    "feather", "glacier", "hammer", "island", "jacket", "kettle", "ladder", "mirror", "needle", "pillow",
)


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One task instance.

    tokens: int32 [length]. answer_start/answer_end: the answer span (what to
    mask). needle_spans: (start, end) token span of each inserted needle, in the
    final sequence. target: index into needle_spans of the needle that holds the
    answer (the first of the chain for variable tracking). depths: requested
    relative depth of each needle.
    """

    kind: str
    tokens: np.ndarray
    answer_start: int
    answer_end: int
    answer: str
    needle_spans: tuple[tuple[int, int], ...]
    needle_texts: tuple[str, ...]
    target: int
    depths: tuple[float, ...]
    # Further (start, end) answer spans of repeated questions inside the haystack (training rows only;
    # the scored answer is always answer_start:answer_end at the end).
    extra_answer_spans: tuple[tuple[int, int], ...] = ()

    @property
    def answer_tokens(self) -> np.ndarray:
        return self.tokens[self.answer_start : self.answer_end]


def _check_length(length: int) -> None:
    if not isinstance(length, (int, np.integer)) or not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"length must be an int in [{MIN_LENGTH}, {MAX_LENGTH}]; got {length!r}")


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """One token's text as bytes: GPT-2's tokenizer gives them raw, others (GGUF) through their decoded text."""
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    return decode_bytes([token_id]) if decode_bytes is not None else tokenizer.decode([token_id]).encode("utf-8")


def _sentence_ends(tokenizer: Tokenizer) -> np.ndarray:
    """bool [vocab_size]: the tokens whose text ends a sentence ('.', '!' or '?' before trailing space, or a newline)."""
    cached = getattr(tokenizer, "_sentence_end_table", None)
    if cached is None:
        table = np.zeros(tokenizer.vocab_size, bool)
        for i in range(tokenizer.vocab_size):
            b = _token_bytes(tokenizer, i)
            table[i] = b.rstrip().endswith((b".", b"!", b"?")) or b.endswith(b"\n")
        tokenizer._sentence_end_table = table
        cached = table
    return cached


def _build(
    kind: str,
    rng: np.random.Generator,
    stream: np.ndarray,
    tokenizer: Tokenizer,
    length: int,
    needles: list[str],
    depths: list[float],
    question: str,
    answer: str,
    target: int,
    suffix: str = ".",
) -> TaskExample:
    _check_length(length)
    if len(needles) != len(depths):
        raise ValueError(f"needles and depths must have the same length; got {len(needles)} and {len(depths)}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1]; got {depths}")
    needle_ids = [tokenizer.encode(n) for n in needles]
    q_ids = tokenizer.encode(question)
    a_ids = tokenizer.encode(answer)
    s_ids = tokenizer.encode(suffix)
    fixed = sum(map(len, needle_ids)) + len(q_ids) + len(a_ids) + len(s_ids)
    hay_len = length - fixed
    if hay_len < 16:
        raise ValueError(f"length must leave room for the haystack: needles and question take {fixed} tokens; got length {length}")
    if stream.size <= hay_len:
        raise ValueError(f"haystack stream must be longer than {hay_len} tokens; got {stream.size}")
    start = int(rng.integers(0, stream.size - hay_len))
    hay = np.asarray(stream[start : start + hay_len], np.int32)
    ends = np.flatnonzero(_sentence_ends(tokenizer)[hay]) + 1  # insertion points after a sentence end
    # Insertion offsets into the haystack, nearest sentence boundary to each depth.
    order = np.argsort(depths, kind="stable")
    offsets = [0] * len(needles)
    for i in order:
        want = int(round(depths[i] * hay_len))
        if ends.size:
            cand = ends[np.argmin(np.abs(ends - want))]
            want = int(cand) if abs(int(cand) - want) <= max(64, hay_len // 20) else want
        offsets[i] = min(max(want, 0), hay_len)
    pieces, spans = [], [None] * len(needles)
    pos, cursor = 0, 0
    for i in sorted(range(len(needles)), key=lambda j: (offsets[j], depths[j], j)):
        pieces.append(hay[cursor : offsets[i]])
        pos += offsets[i] - cursor
        cursor = offsets[i]
        pieces.append(np.asarray(needle_ids[i], np.int32))
        spans[i] = (pos, pos + len(needle_ids[i]))
        pos += len(needle_ids[i])
    pieces.append(hay[cursor:])
    pieces += [np.asarray(q_ids, np.int32), np.asarray(a_ids, np.int32), np.asarray(s_ids, np.int32)]
    tokens = np.concatenate(pieces).astype(np.int32)
    assert tokens.size == length, (tokens.size, length)
    a_start = length - len(s_ids) - len(a_ids)
    return TaskExample(
        kind=kind, tokens=tokens, answer_start=a_start, answer_end=a_start + len(a_ids), answer=answer,
        needle_spans=tuple(spans), needle_texts=tuple(needles), target=target, depths=tuple(float(d) for d in depths),
    )


def passkey(rng, stream, tokenizer, length, *, depth: float | None = None, digits: int = 5,
            extra_questions: int = 0, middle_token: bool | None = None) -> TaskExample:
    """Passkey retrieval: one ``digits``-digit key hidden at ``depth`` (uniform if None).

    extra_questions: copies of the question with its answer inserted at random depths of the haystack
    besides the one at the end (their answer spans in ``extra_answer_spans``): a training row then
    supervises the retrieval from several distances at the cost of one.
    middle_token: True / False: draw the key among those whose answer has / has no token between its
    first and last (>= 3 / <= 2 GPT-2 tokens; rejection sampling); None: any key.
    """
    if not isinstance(digits, int) or not 1 <= digits <= 12:
        raise ValueError(f"digits must be an int in [1, 12]; got {digits!r}")
    if isinstance(extra_questions, bool) or not isinstance(extra_questions, int) or extra_questions < 0:
        raise ValueError(f"extra_questions must be an int >= 0; got {extra_questions!r}")
    for _ in range(1000):
        key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        if middle_token is None or (len(tokenizer.encode(f" {key}")) >= 3) == middle_token:
            break
    else:
        raise ValueError(f"middle_token={middle_token} is not reachable with {digits}-digit keys")
    depth = float(rng.uniform()) if depth is None else depth
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    question, answer = " What is the pass key? The pass key is", f" {key}"
    if not extra_questions:
        return _build("passkey", rng, stream, tokenizer, length, [needle], [depth], question, answer, target=0)
    copy = question + answer + "."
    ex = _build("passkey", rng, stream, tokenizer, length, [needle] + [copy] * extra_questions,
                [depth] + list(rng.uniform(size=extra_questions)), question, answer, target=0)
    # Each copy ends like the example itself (question, answer, "."; GPT-2 pre-tokenisation splits at
    # "is| 12345|.", so the tokens are the same): its answer sits as far from its end as the example's.
    a_len, s_len = ex.answer_end - ex.answer_start, length - ex.answer_end
    extra = tuple((e - s_len - a_len, e - s_len) for _, e in ex.needle_spans[1:])
    return dataclasses.replace(ex, needle_spans=ex.needle_spans[:1], needle_texts=ex.needle_texts[:1],
                               depths=ex.depths[:1], extra_answer_spans=extra)


def multikey_niah(rng, stream, tokenizer, length, *, num_needles: int = 4, depths=None, digits: int = 6) -> TaskExample:
    """Multi-key needle in a haystack: ``num_needles`` key/value needles, one key is asked for."""
    if not isinstance(num_needles, int) or not 1 <= num_needles <= 64:
        raise ValueError(f"num_needles must be an int in [1, 64]; got {num_needles!r}")
    pairs = rng.choice(len(_ADJ) * len(_NOUN), size=num_needles, replace=False)
    keys = [f"{_ADJ[p // len(_NOUN)]}-{_NOUN[p % len(_NOUN)]}" for p in pairs]
    values = [str(int(v)) for v in rng.integers(10 ** (digits - 1), 10**digits, size=num_needles)]
    depths = list(rng.uniform(size=num_needles)) if depths is None else list(depths)
    target = int(rng.integers(num_needles))
    needles = [f" One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    q = (f" What is the special magic number for {keys[target]} mentioned in the provided text?"
         f" The special magic number for {keys[target]} mentioned in the provided text is")
    return _build("multikey_niah", rng, stream, tokenizer, length, needles, depths, q, f" {values[target]}", target)


def variable_tracking(rng, stream, tokenizer, length, *, hops: int = 4, depths=None, digits: int = 5) -> TaskExample:
    """Variable tracking: ``VAR A = v``, ``VAR B = VAR A``, ... plus a distractor chain; name the chain."""
    if not isinstance(hops, int) or not 1 <= hops <= 16:
        raise ValueError(f"hops must be an int in [1, 16]; got {hops!r}")
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names: list[str] = []
    while len(names) < 2 * hops:
        n = "".join(rng.choice(letters, size=5))
        if n not in names:
            names.append(n)
    # Two distinct values without materialising the whole range (choice(replace=False) permutes all of it).
    lo, hi = 10 ** (digits - 1), 10**digits
    a, b = int(rng.integers(lo, hi)), int(rng.integers(lo, hi - 1))
    v1, v2 = str(a), str(b + (b >= a))
    chain, other = names[:hops], names[hops:]
    needles = [f" VAR {chain[0]} = {v1}."] + [f" VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, hops)]
    needles += [f" VAR {other[0]} = {v2}."] + [f" VAR {other[i]} = VAR {other[i - 1]}." for i in range(1, hops)]
    if depths is None:
        d1 = np.sort(rng.uniform(size=hops))
        d2 = np.sort(rng.uniform(size=hops))
        depths = list(d1) + list(d2)
    q = (f" Question: Find all variables that are assigned the value {v1} in the text above."
         f" Answer: According to the chain of variable assignments, {hops} variables are assigned the value {v1}, they are:")
    return _build("variable_tracking", rng, stream, tokenizer, length, needles, list(depths), q,
                  " " + " ".join(chain), target=0)


TASKS: dict[str, Callable[..., TaskExample]] = {
    "passkey": passkey,
    "multikey_niah": multikey_niah,
    "variable_tracking": variable_tracking,
}


def make_example(kind: str, rng, stream, tokenizer, length, **kwargs) -> TaskExample:
    if kind not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}; got {kind!r}")
    return TASKS[kind](rng, stream, tokenizer, length, **kwargs)
