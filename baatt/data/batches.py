"""Training batches: packed real text mixed with task examples, built off the training loop.

:func:`make_batch` builds one batch on the host. :class:`BatchStream` keeps a
few batches ready: in a background thread (``workers=0``), or in ``workers``
processes for stages whose batches take longer to build than a train step
(short rows full of task examples: 128 x 128 rows with 80% passkey examples
take ~23 ms in Python against a ~9 ms step on an H100). With workers, batch i
comes from worker i mod N, each with its own random stream, so the sequence of
batches is the same on every run with the same seed and worker count.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading

import numpy as np

from baatt.data import corpus, tasks


def make_batch(rng, stream, tokenizer, seq_len, batch, *, task_fraction, task_kinds, passkey_digits=(5, 5),
               passkey_question_every=0, passkey_middle_share=None):
    """(tokens int32 [B, L], eligible bool [B, L]) mixing packed text and task examples.

    Each row is a task example with probability ``task_fraction`` (kind drawn from
    those of ``task_kinds`` that fit ``seq_len``, see ``tasks.DEFAULT_MIN_LENGTH``).
    passkey_digits: (lo, hi) digits of each passkey, uniform (default: always 5).
    passkey_question_every: > 0: a passkey row asks its question once per this many tokens (copies
    inside the haystack besides the one at the end, every answer eligible); 0: once, at the end.
    passkey_middle_share: None: keys as drawn; p: a share p of the passkeys have an answer with a middle
    token (>= 3 tokens), the others not.
    """
    toks = corpus.packed_batch(stream, rng, batch, seq_len)
    elig = np.ones((batch, seq_len), bool)
    kinds = [k for k in task_kinds if seq_len >= tasks.DEFAULT_MIN_LENGTH[k]]  # tasks that fit this length
    for i in range(batch):
        if task_fraction and kinds and rng.uniform() < task_fraction:
            kind = str(rng.choice(kinds))
            kw = {}
            if kind == "passkey":
                if tuple(passkey_digits) != (5, 5):
                    kw["digits"] = int(rng.integers(passkey_digits[0], passkey_digits[1] + 1))
                if passkey_middle_share is not None:
                    kw["middle_token"] = bool(rng.uniform() < passkey_middle_share)
                if passkey_question_every and seq_len >= 2 * passkey_question_every:
                    kw["extra_questions"] = seq_len // passkey_question_every - 1
            ex = tasks.make_example(kind, rng, stream, tokenizer, seq_len, **kw)
            toks[i] = ex.tokens
            elig[i] = False
            elig[i, ex.answer_start : ex.answer_end] = True
            for a, b in ex.extra_answer_spans:
                elig[i, a:b] = True
    return toks, elig


def _fill(out, stop, build):
    """Put ``build()`` results into ``out`` until ``stop`` is set (a full queue is retried, not waited on)."""
    while not stop.is_set():
        item = build()
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                break
            except queue.Full:
                continue


def _worker(seed, stream, tokenizer_path, args, kwargs, out, stop):
    """Process body: build batches from its own random stream into ``out`` until ``stop`` is set."""
    from baatt.data.tokenizer import get_tokenizer

    out.cancel_join_thread()  # on stop, exit without flushing batches nobody will read
    rng = np.random.default_rng(seed)
    tokenizer = get_tokenizer(tokenizer_path)
    _fill(out, stop, lambda: make_batch(rng, stream, tokenizer, *args, **kwargs))


class BatchStream:
    """Batches of ``make_batch(rng, stream, tokenizer, seq_len, batch, **kwargs)`` built ahead of use.

    seed: a ``np.random.SeedSequence`` (or anything ``default_rng`` takes). workers: 0 builds in
    one background thread; N >= 1 in N processes (forked from a fork server, not from the caller:
    they hold numpy and the tokenizer, not the training state; as with any ``multiprocessing``
    start method other than fork, a script that uses workers needs the ``if __name__ ==
    "__main__":`` guard), worker w drawing from the w-th child of ``seed``. depth: batches
    kept ready per builder. ``get()`` returns the next batch; ``close()`` stops the builders.
    """

    def __init__(self, seed, stream, tokenizer, seq_len, batch, *, workers: int = 0, depth: int = 4, **kwargs):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ValueError(f"workers must be an int >= 0; got {workers!r}")
        self._args = (seq_len, batch)
        self._n = 0
        self._closed = False
        if workers == 0:
            rng = np.random.default_rng(seed)
            self._queues = [queue.Queue(depth)]
            self._stop = threading.Event()
            build = lambda: make_batch(rng, stream, tokenizer, seq_len, batch, **kwargs)
            self._procs = [threading.Thread(target=_fill, args=(self._queues[0], self._stop, build), daemon=True)]
        else:
            seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
            seeds = seq.spawn(workers)
            # Not fork: the parent runs JAX threads. A fork server starts once (importing this module),
            # then each stage's workers fork from it in milliseconds.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            self._queues = [ctx.Queue(depth) for _ in range(workers)]
            self._stop = ctx.Event()
            self._procs = [ctx.Process(target=_worker, daemon=True, args=(
                seeds[w], np.asarray(stream), tokenizer.path, self._args, kwargs, self._queues[w], self._stop))
                for w in range(workers)]
        if workers:
            # Workers only run numpy; keep any JAX they import off the accelerator (its memory is the trainer's).
            saved = os.environ.get("JAX_PLATFORMS")
            os.environ["JAX_PLATFORMS"] = "cpu"
            try:
                for p in self._procs:
                    p.start()
            finally:
                if saved is None:
                    os.environ.pop("JAX_PLATFORMS", None)
                else:
                    os.environ["JAX_PLATFORMS"] = saved
        else:
            self._procs[0].start()

    def get(self):
        if self._closed:
            raise RuntimeError("BatchStream.get() after close()")
        q = self._queues[self._n % len(self._queues)]
        self._n += 1
        while True:
            try:
                return q.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError("a batch builder stopped without producing a batch (see its error above)") from None

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for p in self._procs:
            p.join(timeout=5.0)
            if isinstance(p, mp.process.BaseProcess) and p.is_alive():
                p.terminate()
