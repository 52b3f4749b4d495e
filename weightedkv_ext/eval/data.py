"""Evaluation texts: files, folders, evaldata domains or the embedded default text, tokenised.

A dataset is a named list of documents. A folder is one dataset (its ``*.txt`` files, sorted by
name, are the documents); a single file is a one-document dataset named after the file; a domain
``d`` is the folder ``<evaldata>/d``; the embedded default text (KJV Genesis) is the dataset
``kjv_genesis``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch


class DataError(ValueError):
    """A data argument that cannot be used; the message names the argument and the value."""


@dataclass
class TextDataset:
    name: str
    docs: list[tuple[str, str]]  # (document name, text)


@dataclass
class TokenDataset:
    name: str
    doc_names: list[str]
    docs: list[torch.Tensor] = field(repr=False)  # 1-D int64 token ids per document

    @property
    def doc_tokens(self) -> list[int]:
        return [len(d) for d in self.docs]

    @property
    def targets(self) -> int:
        """Targets counted by the protocol (every token but the first of each document)."""
        return sum(max(n - 1, 0) for n in self.doc_tokens)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for d in self.docs:
            h.update(d.numpy().astype("<i8").tobytes())
            h.update(b"|")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"docs": self.doc_names, "doc_tokens": self.doc_tokens, "targets": self.targets,
                "tokens_sha256": self.sha256()}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def from_path(path: str | Path, arg: str = "--data") -> TextDataset:
    p = Path(path)
    if p.is_file():
        return TextDataset(p.stem, [(p.name, _read(p))])
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"argument {arg}: folder {str(path)!r} holds no .txt file")
        return TextDataset(p.name, [(f.name, _read(f)) for f in files])
    raise DataError(f"argument {arg}: no such file or folder: {str(path)!r}")


def evaldata_dir(data_dir: str | Path | None = None) -> Path | None:
    """The evaldata folder: ``data_dir`` (``--data-dir`` / ``$WEIGHTEDKV_EVALDATA``) when given,
    else ``../shared/evaldata`` next to a source checkout, else None."""
    if data_dir is not None:
        return Path(data_dir)
    from .. import data

    root = data.evaldata_dir()
    return None if root is None else Path(root)


def from_domain(domain: str, data_dir: str | Path | None = None) -> TextDataset:
    root = evaldata_dir(data_dir)
    if root is None or not (root / domain).is_dir():
        known = sorted(d.name for d in root.iterdir() if d.is_dir()) if root and root.is_dir() else []
        where = (f"known domains: {', '.join(known)}" if known
                 else f"the evaldata folder {str(root) if root else '../shared/evaldata'!r} is "
                      "absent; pass --data-dir or set $WEIGHTEDKV_EVALDATA")
        raise DataError(f"argument --domains: no evaldata domain {domain!r} ({where})")
    return from_path(root / domain, "--domains")


def default_dataset() -> TextDataset:
    from .. import data

    return TextDataset("kjv_genesis", [("default_text", data.default_text())])


def resolve(paths: Sequence[str] = (), domains: Sequence[str] = (),
            data_dir: str | Path | None = None) -> list[TextDataset]:
    """The datasets named on the command line (the default text when none is)."""
    datasets = [from_domain(d, data_dir) for d in domains] + [from_path(p) for p in paths]
    if not datasets:
        datasets = [default_dataset()]
    names = [d.name for d in datasets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"argument --data: two datasets are named {dup[0]!r}; rename one folder or file")
    return datasets


def tokenize(ds: TextDataset, tokenizer, docs: int | None = None,
             max_tokens: int | None = None) -> TokenDataset:
    """The first ``docs`` documents, each cut to its first ``max_tokens`` tokens."""
    names, ids = [], []
    for name, text in ds.docs[:docs]:
        t = tokenizer(text, verbose=False)["input_ids"]
        t = torch.tensor(t[:max_tokens], dtype=torch.long)
        if len(t) >= 2:  # a document needs a target
            names.append(name)
            ids.append(t)
    if not ids:
        raise DataError(f"argument --data: dataset {ds.name!r} has no document of 2 tokens or more")
    return TokenDataset(ds.name, names, ids)
