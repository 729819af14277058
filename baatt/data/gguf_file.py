"""Opening GGUF files (llama.cpp's format) and reading their metadata, with errors that name key and file."""

from __future__ import annotations

import os
from pathlib import Path

import gguf

_REQUIRED = object()


def open_gguf(source: str | os.PathLike | gguf.GGUFReader) -> tuple[gguf.GGUFReader, Path]:
    """(reader, path) of a GGUF file given by path or as an open reader (parsing the metadata takes seconds,
    so the model and the tokenizer of one file can share a reader)."""
    if isinstance(source, gguf.GGUFReader):
        return source, Path(source.data.filename)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return gguf.GGUFReader(path), path


def read_field(reader: gguf.GGUFReader, key: str, path: Path, default=_REQUIRED):
    """The value of metadata ``key``; ``default`` when absent, or ValueError naming key and file if none is given."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{path}: GGUF metadata {key!r} is missing")
        return default
    return field.contents()
