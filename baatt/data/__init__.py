"""Offline data: GPT-2 BPE tokenizer, text corpus, synthetic long-context tasks."""

from baatt.data.corpus import (
    build_token_cache,
    documents,
    load_tokens,
    packed_batch,
    packed_sequences,
    split_documents,
)
from baatt.data.tasks import TASKS, TaskExample, make_example, multikey_niah, passkey, variable_tracking
from baatt.data.tokenizer import Tokenizer, data_dir, get_tokenizer

__all__ = [
    "TASKS",
    "TaskExample",
    "Tokenizer",
    "build_token_cache",
    "data_dir",
    "documents",
    "get_tokenizer",
    "load_tokens",
    "make_example",
    "multikey_niah",
    "packed_batch",
    "packed_sequences",
    "passkey",
    "split_documents",
    "variable_tracking",
]
