"""Offline data: tokenizer, corpus, long-context task generators (needs `bash scripts/setup_data.sh`)."""

import numpy as np
import pytest

from baatt.data import corpus, tasks
from baatt.data.tokenizer import Tokenizer, get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def val():
    return corpus.load_tokens("val")


@pytest.mark.parametrize("text", [
    "Hello world!",
    "The pass key is 71432. Remember it.",
    "  leading spaces,\ttabs\n\nand newlines  \n",
    "It's we've they'll I'd — “quotes” über naïve 日本語 😀 ½ ²",
    "snake_case_name = x_1 + y__2",
    "",
])
def test_tokenizer_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 50256 for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_matches_gpt2_ids(tok):
    # Reference ids of GPT-2 (r50k_base).
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.eot_id == 50256 and tok.mask_id == 50257 and tok.vocab_size == 50258
    assert tok.decode([tok.mask_id]) == "<|mask|>"


def test_tokenizer_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="bash scripts/setup_data.sh"):
        Tokenizer(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\n")
    with pytest.raises(ValueError, match="not the GPT-2 ranks file"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="token id must be in"):
        tok.decode([60000])
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(b"bytes")


def test_brown_tags_are_stripped():
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\tIt/pps is/bez n't/* ./.\n"
    assert corpus._clean_brown(raw) == 'The jury said " no evidence ".\n\nIt isn\'t.'


def test_corpus_splits_and_packing(val):
    train = corpus.load_tokens("train")
    assert train.dtype == np.uint16 and train.size > 20 * val.size > 0
    rng = np.random.default_rng(0)
    b = corpus.packed_batch(val, rng, 3, 100)
    assert b.shape == (3, 100) and b.dtype == np.int32 and b.max() < 50257
    seqs = corpus.packed_sequences(val, 1000)
    assert seqs.shape == (val.size // 1000, 1000)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        corpus.load_tokens("test")
    with pytest.raises(ValueError, match="length must be smaller than the token stream"):
        corpus.packed_batch(val, rng, 1, val.size + 1)
    with pytest.raises(ValueError, match="source must be one of"):
        corpus.documents("wiki")


@pytest.mark.parametrize("kind", sorted(tasks.TASKS))
@pytest.mark.parametrize("length", [512, 2048, 8192, 32768])
def test_task_places_needles_where_it_says(tok, val, kind, length):
    rng = np.random.default_rng(length)
    ex = tasks.make_example(kind, rng, val, tok, length)
    assert ex.tokens.shape == (length,) and ex.tokens.dtype == np.int32
    for (a, b), text in zip(ex.needle_spans, ex.needle_texts):
        assert 0 <= a < b <= ex.answer_start
        assert tok.decode(ex.tokens[a:b]) == text
    spans = sorted(ex.needle_spans)
    assert all(s[1] <= t[0] for s, t in zip(spans, spans[1:]))  # no overlap
    assert tok.decode(ex.answer_tokens) == ex.answer
    assert ex.answer_end == length - 1  # answer, then the final "."
    target = ex.needle_texts[ex.target]
    if kind == "passkey":
        assert ex.answer.strip() in target
    elif kind == "multikey_niah":
        assert target.endswith(f"is:{ex.answer}.")
        question = tok.decode(ex.tokens[ex.needle_spans[-1][1]:ex.answer_start])
        key = target.split(" for ")[1].split(" is:")[0]
        assert f"number for {key}" in question
    else:
        names = ex.answer.split()
        assert names[0] in target and all(f"VAR {n} =" in "".join(ex.needle_texts) for n in names)


def test_task_depth_is_honoured(tok, val):
    rng = np.random.default_rng(0)
    for depth in (0.0, 0.25, 0.5, 1.0):
        ex = tasks.passkey(rng, val, tok, 4096, depth=depth)
        start = ex.needle_spans[0][0]
        assert abs(start / 4096 - depth) < 0.06, (depth, start)
    ex = tasks.multikey_niah(rng, val, tok, 2048, num_needles=3, depths=[0.9, 0.1, 0.5])
    starts = [s[0] / 2048 for s in ex.needle_spans]
    assert starts[1] < starts[2] < starts[0]


def test_variable_tracking_values_are_distinct_and_in_range(tok, val):
    rng = np.random.default_rng(3)
    for digits in (1, 2, 5):
        for _ in range(60):
            ex = tasks.variable_tracking(rng, val, tok, 512, hops=2, digits=digits)
            v1 = ex.needle_texts[0].split("= ")[1].rstrip(".")
            v2 = ex.needle_texts[2].split("= ")[1].rstrip(".")
            assert v1 != v2 and len(v1) == len(v2) == digits and v1[0] != "0" and v2[0] != "0"
            assert ex.answer.split() == [n.split()[1] for n in ex.needle_texts[:2]]


def test_task_errors(tok, val):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"length must be an int in \[64"):
        tasks.passkey(rng, val, tok, 63)
    with pytest.raises(ValueError, match="task must be one of"):
        tasks.make_example("qa", rng, val, tok, 1024)
    with pytest.raises(ValueError, match=r"depths must lie in \[0, 1\]"):
        tasks.passkey(rng, val, tok, 1024, depth=1.5)
    with pytest.raises(ValueError, match="num_needles must be an int"):
        tasks.multikey_niah(rng, val, tok, 1024, num_needles=0)
    with pytest.raises(ValueError, match="length must leave room for the haystack"):
        tasks.variable_tracking(rng, val, tok, 256, hops=16)


def test_make_batch_uses_only_tasks_that_fit(tok, val):
    from baatt.data.batches import make_batch

    rng = np.random.default_rng(0)
    kinds = ("passkey", "multikey_niah", "variable_tracking")
    toks, elig = make_batch(rng, val, tok, 128, 32, task_fraction=1.0, task_kinds=kinds)
    assert toks.shape == elig.shape == (32, 128)
    # at 128 tokens only passkey fits: every row is a passkey example whose eligible span is its answer
    for row, e in zip(toks, elig):
        span = np.flatnonzero(e)
        assert 1 <= span.size <= 4 and np.all(np.diff(span) == 1)
        assert "The pass key is" in tok.decode(row[: span[0]])
    toks, elig = make_batch(rng, val, tok, 64, 4, task_fraction=1.0, task_kinds=("multikey_niah",))
    assert elig.all()  # no task fits: plain text rows
    toks, elig = make_batch(rng, val, tok, 512, 64, task_fraction=1.0, task_kinds=kinds)
    assert {tok.decode(r[-40:]).count("pass key") > 0 for r in toks} == {True, False}


def test_make_batch_passkey_digits(tok, val):
    from baatt.data.batches import make_batch
    from baatt.train import TrainConfig

    def answers(digits, seed):
        rng = np.random.default_rng(seed)
        toks, elig = make_batch(rng, val, tok, 128, 48, task_fraction=1.0, task_kinds=("passkey",), passkey_digits=digits)
        return toks, [tok.decode(r[e]).strip() for r, e in zip(toks, elig)]

    toks5, five = answers((5, 5), 1)
    assert {len(a) for a in five} == {5} and all(a.isdigit() for a in five)
    toks_default = make_batch(np.random.default_rng(1), val, tok, 128, 48, task_fraction=1.0, task_kinds=("passkey",))[0]
    assert np.array_equal(toks5, toks_default)  # the default draws exactly as before
    _, wide = answers((3, 9), 1)
    assert all(a.isdigit() and 3 <= len(a) <= 9 for a in wide) and len({len(a) for a in wide}) >= 5
    with pytest.raises(ValueError, match="passkey_digits must be a tuple"):
        TrainConfig(passkey_digits=(0, 5))
    with pytest.raises(ValueError, match="passkey_digits must be a tuple"):
        TrainConfig(passkey_digits=(7, 5))


def test_batch_stream_thread_and_workers(tok, val):
    """workers=0 yields make_batch's sequence for the seed; workers=2 is the same on every run,
    interleaves its workers' streams (batch i from worker i mod 2) and shuts down."""
    from baatt.data.batches import BatchStream, make_batch

    kw = dict(task_fraction=0.5, task_kinds=("passkey",), passkey_digits=(5, 5))
    seed = np.random.SeedSequence([7, 0])
    rng = np.random.default_rng(seed)
    want = [make_batch(rng, val, tok, 64, 4, **kw) for _ in range(3)]
    s = BatchStream(seed, val, tok, 64, 4, workers=0, **kw)
    got = [s.get() for _ in range(3)]
    s.close()
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, want))

    def run():
        s = BatchStream(np.random.SeedSequence([7, 0]), val, tok, 64, 4, workers=2, **kw)
        try:
            return [s.get() for _ in range(4)]
        finally:
            s.close()
            assert not any(p.is_alive() for p in s._procs)

    a, b = run(), run()
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    children = np.random.SeedSequence([7, 0]).spawn(2)
    w0, w1 = (np.random.default_rng(c) for c in children)
    assert np.array_equal(a[0][0], make_batch(w0, val, tok, 64, 4, **kw)[0])
    assert np.array_equal(a[1][0], make_batch(w1, val, tok, 64, 4, **kw)[0])
    assert np.array_equal(a[2][0], make_batch(w0, val, tok, 64, 4, **kw)[0])
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        BatchStream(seed, val, tok, 64, 4, workers=-1, **kw)
    with pytest.raises(RuntimeError, match="after close"):
        s.get()


def test_passkey_extra_questions_and_batch(tok, val):
    """Repeated questions: every extra answer span decodes to the key, sits after its own question,
    the needle stays the only needle, and make_batch marks every answer (and nothing else) eligible."""
    from baatt.data.batches import make_batch
    from baatt.train import TrainConfig

    rng = np.random.default_rng(3)
    for _ in range(5):
        ex = tasks.passkey(rng, val, tok, 2048, extra_questions=3)
        key = ex.answer.strip()
        assert len(ex.extra_answer_spans) == 3 and len(ex.needle_spans) == 1 and ex.tokens.size == 2048
        assert key in tok.decode(ex.tokens[slice(*ex.needle_spans[0])])
        for a, b in ex.extra_answer_spans:
            assert tok.decode(ex.tokens[a:b]).strip() == key
            assert tok.decode(ex.tokens[a - 10 : a]).endswith("The pass key is")
        assert tok.decode(ex.answer_tokens).strip() == key and ex.answer_end == 2047
    plain = tasks.passkey(np.random.default_rng(4), val, tok, 512)
    assert plain.extra_answer_spans == ()
    with pytest.raises(ValueError, match="extra_questions must be an int >= 0"):
        tasks.passkey(rng, val, tok, 512, extra_questions=-1)

    toks, elig = make_batch(np.random.default_rng(5), val, tok, 1024, 6, task_fraction=1.0,
                            task_kinds=("passkey",), passkey_question_every=256)
    for r, e in zip(toks, elig):
        spans = np.flatnonzero(np.diff(np.concatenate([[0], e.astype(int), [0]])))  # run starts/ends
        assert len(spans) // 2 == 1024 // 256  # 3 copies + the question at the end
        keys = {tok.decode(r[a:b]).strip() for a, b in zip(spans[::2], spans[1::2])}
        assert len(keys) == 1 and next(iter(keys)).isdigit()
    toks128, elig128 = make_batch(np.random.default_rng(5), val, tok, 128, 4, task_fraction=1.0,
                                  task_kinds=("passkey",), passkey_question_every=256)
    assert all(np.sum(np.diff(e.astype(int)) == 1) == 1 for e in elig128)  # too short: one question
    with pytest.raises(ValueError, match="passkey_question_every must be 0"):
        TrainConfig(passkey_question_every=16)


def test_passkey_middle_token_share(tok, val):
    from baatt.data.batches import make_batch
    from baatt.train import TrainConfig

    rng = np.random.default_rng(8)
    for want in (True, False):
        for _ in range(4):
            ex = tasks.passkey(rng, val, tok, 256, middle_token=want)
            assert (len(ex.answer_tokens) >= 3) == want and len(ex.answer.strip()) == 5
    with pytest.raises(ValueError, match="middle_token=True is not reachable"):
        tasks.passkey(rng, val, tok, 256, digits=1, middle_token=True)

    def share(p):
        toks, elig = make_batch(np.random.default_rng(9), val, tok, 128, 200, task_fraction=1.0,
                                task_kinds=("passkey",), passkey_middle_share=p)
        return np.mean(elig.sum(-1) >= 3)

    assert share(1.0) == 1.0 and share(0.0) == 0.0 and 0.6 < share(0.7) < 0.8
    with pytest.raises(ValueError, match="passkey_middle_share must be None or a number in"):
        TrainConfig(passkey_middle_share=1.5)
