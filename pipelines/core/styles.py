"""Prompt styles in A1111's ``styles.csv`` format. No torch: the UI imports this.

The file is CSV with a header row ``name,prompt,negative_prompt`` (A1111 writes it UTF-8
with a BOM, ``\\r\\n`` line ends, quoting only where needed). Reading is lenient the way
A1111's is and a little more: a missing file is an empty database; a BOM, blank lines,
spaces after commas, short rows, extra columns, the pre-2023 ``name,text`` header and rows
whose name starts with ``#`` (comments) are all accepted. Writing keeps every row it does
not change (comments and extra columns included) and replaces the file atomically.

A style's text is merged into a prompt with A1111's rule (``merge_prompt``): if it contains
``{prompt}``, every ``{prompt}`` is replaced by the user's prompt; otherwise the style's
text is appended after ", " (both sides stripped, empty sides dropped).
"""

from __future__ import annotations

import csv
import functools
import io
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.fileio import write_bytes_atomic

__all__ = [
    "PromptStyle",
    "StyleDatabase",
    "apply_styles",
    "extract_style_text",
    "extract_styles",
    "merge_prompt",
    "read_styles",
    "style_database",
]

PLACEHOLDER = "{prompt}"
FIELDS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompt(style_text: str, prompt: str) -> str:
    """One style's text applied to a prompt (A1111's rule)."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: Iterable[PromptStyle | None]) -> tuple[str, str]:
    """Apply styles in order to both prompts. ``None`` (an unknown name) acts like A1111's
    empty style: it only strips the prompts."""
    for style in styles:
        prompt = merge_prompt(style.prompt if style else "", prompt)
        negative_prompt = merge_prompt(style.negative_prompt if style else "", negative_prompt)
    return prompt, negative_prompt


def extract_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """Undo ``merge_prompt``: (True, the prompt without the style) or (False, prompt).

    With ``{prompt}``: the stripped prompt must start with the text before the first
    placeholder and end with the text after it. Without: the stripped prompt must end with
    the stripped style text, which is cut off together with a ", " before it. An empty style
    text matches any prompt (and only strips it), as in A1111.
    """
    stripped = prompt.strip()
    style = style_text.strip()
    if PLACEHOLDER in style:
        left, _, right = style.partition(PLACEHOLDER)
        if stripped.startswith(left) and stripped.endswith(right) and len(left) + len(right) <= len(stripped):
            return True, stripped[len(left) : len(stripped) - len(right)]
    elif stripped.endswith(style):
        rest = stripped[: len(stripped) - len(style)]
        if rest.endswith(", "):
            rest = rest[:-2]
        return True, rest
    return False, prompt


def _extract_one(style: PromptStyle, prompt: str, negative_prompt: str) -> tuple[bool, str, str]:
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative_prompt
    ok, new_prompt = extract_style_text(style.prompt, prompt)
    if not ok:
        return False, prompt, negative_prompt
    ok, new_negative = extract_style_text(style.negative_prompt, negative_prompt)
    if not ok:
        return False, prompt, negative_prompt
    return True, new_prompt, new_negative


def extract_styles(
    prompt: str, negative_prompt: str, styles: Iterable[PromptStyle]
) -> tuple[list[str], str, str]:
    """A1111's reverse of ``apply_styles``, for pasted infotexts.

    Repeatedly finds the first style (in database order) whose prompt *and* negative prompt
    both match, removes it from both prompts and from the candidates, until none matches.
    Returns (names in the order they were applied, prompt, negative prompt), so that
    ``apply_styles(prompt, negative, names)`` gives back the texts (up to whitespace).
    """
    candidates = list(styles)
    found: list[str] = []
    while True:
        for style in candidates:
            ok, new_prompt, new_negative = _extract_one(style, prompt, negative_prompt)
            if ok:
                prompt, negative_prompt = new_prompt, new_negative
                candidates.remove(style)
                found.append(style.name)
                break
        else:
            break
    return list(reversed(found)), prompt, negative_prompt


# ---------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------


@dataclass
class _Table:
    fieldnames: list[str]  # as written in the file's header (the three known ones first when we write)
    rows: list[dict[str, str]]  # every kept row, comments included, keyed by fieldnames


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:  # an old file saved by a spreadsheet in the local code page
        return data.decode("cp1252", errors="replace")


def _parse_table(text: str) -> _Table:
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    records = [r for r in reader if any(cell.strip() for cell in r)]
    if not records:
        return _Table(list(FIELDS), [])
    header = [h.strip() for h in records[0]]
    lowered = [h.lower() for h in header]
    if "name" in lowered:
        # map the known columns by name, whatever their case or order; keep the others
        fieldnames = []
        for h, low in zip(header, lowered):
            if low == "text" and "prompt" not in lowered:
                low = "prompt"  # A1111's first format: name,text
            fieldnames.append(low if low in FIELDS else h)
        body = records[1:]
    else:  # no header at all: the columns are name, prompt, negative_prompt
        fieldnames = list(FIELDS)
        body = records
    for known in FIELDS:
        if known not in fieldnames:
            fieldnames.append(known)
    rows = []
    for record in body:
        row = {f: "" for f in fieldnames}
        for f, value in zip(fieldnames, record):
            if f not in row or not row[f]:  # a duplicated header name keeps its first value
                row[f] = value
        if not row["name"].strip():
            continue  # a row without a name is no style (A1111 would make a style called "")
        rows.append(row)
    return _Table(fieldnames, rows)


def _styles_of(table: _Table) -> dict[str, PromptStyle]:
    out: dict[str, PromptStyle] = {}
    for row in table.rows:
        name = row["name"]
        if name.startswith("#"):
            continue
        out[name] = PromptStyle(name, row.get("prompt", ""), row.get("negative_prompt", ""))
    return out


def read_styles(path: str | os.PathLike) -> list[PromptStyle]:
    """The styles in a file, in file order; of two rows with one name the later one's texts
    win at the earlier one's place (A1111 fills a dict). [] if there is no file."""
    text = _read_text(Path(path))
    return [] if text is None else list(_styles_of(_parse_table(text)).values())


def _write_table(path: Path, table: _Table) -> None:
    fieldnames = list(FIELDS) + [f for f in table.fieldnames if f not in FIELDS]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for row in table.rows:
        writer.writerow({f: row.get(f, "") for f in fieldnames})
    data = buf.getvalue().encode("utf-8-sig")

    write_bytes_atomic(path, data, keep_mode=True)


class StyleDatabase:
    """The styles of one ``styles.csv``, safe to share between threads.

    The file is the source of truth: reads pick up edits made by hand (checked by mtime and
    size), and every change re-reads the file, changes one row and writes the whole file
    to a temporary file that then replaces it, so rows added by others are kept and a crash
    never leaves a half-written file. (Two *processes* saving at the same instant can still
    lose one change; A1111 has the same limit.)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._stamp: tuple[int, int] | None = None
        self._table = _Table(list(FIELDS), [])
        self._styles: dict[str, PromptStyle] = {}

    # -- reading -------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _load(self, force: bool = False) -> None:
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return
        text = _read_text(self.path)
        self._table = _parse_table(text) if text is not None else _Table(list(FIELDS), [])
        self._styles = _styles_of(self._table)
        self._stamp = stamp

    def reload(self) -> None:
        with self._lock:
            self._load(force=True)

    def names(self) -> list[str]:
        """Style names in file order."""
        with self._lock:
            self._load()
            return list(self._styles)

    def styles(self) -> list[PromptStyle]:
        with self._lock:
            self._load()
            return list(self._styles.values())

    def get(self, name: str) -> PromptStyle | None:
        with self._lock:
            self._load()
            return self._styles.get(name)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    # -- using ---------------------------------------------------------------------------

    def apply(self, prompt: str, negative_prompt: str, names: Iterable[str]) -> tuple[str, str]:
        """Apply the named styles in order; unknown names only strip the prompts (A1111)."""
        with self._lock:
            self._load()
            chosen = [self._styles.get(n) for n in names]
        return apply_styles(prompt, negative_prompt, chosen)

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """Which styles a pasted prompt pair was made with: (names, prompt, negative)."""
        return extract_styles(prompt, negative_prompt, self.styles())

    # -- changing ------------------------------------------------------------------------

    def save_style(self, name: str, prompt: str, negative_prompt: str) -> PromptStyle:
        """Add a style, or replace the one of that name in place (other columns kept)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("a style needs a name")
        if name.startswith("#"):
            raise ValueError("a style name cannot start with '#' (styles.csv reads that as a comment)")
        style = PromptStyle(name, prompt or "", negative_prompt or "")
        with self._lock:
            self._load(force=True)
            rows = self._table.rows
            same = [k for k, row in enumerate(rows) if row["name"] == name]
            if same:
                row = rows[same[0]]
                row.update(prompt=style.prompt, negative_prompt=style.negative_prompt)
                for k in reversed(same[1:]):
                    del rows[k]
            else:
                rows.append({**{f: "" for f in self._table.fieldnames},
                             "name": name, "prompt": style.prompt, "negative_prompt": style.negative_prompt})
            self._commit()
        return style

    def delete(self, name: str) -> bool:
        """Remove a style; False if there was none of that name."""
        with self._lock:
            self._load(force=True)
            before = len(self._table.rows)
            keep = [row for row in self._table.rows if row["name"] != name or name.startswith("#")]
            self._table.rows = keep
            if len(self._table.rows) == before:
                return False
            self._commit()
            return True

    def _commit(self) -> None:
        _write_table(self.path, self._table)
        self._styles = _styles_of(self._table)
        self._stamp = self._file_stamp()


@functools.lru_cache(maxsize=16)  # one per data dir in use: a server has one, a test run a few
def styles_file(path: Path) -> StyleDatabase:
    """The one shared `StyleDatabase` of the styles file at `path` (its lock guards every
    reader and writer of that file in this process)."""
    return StyleDatabase(path)


def style_database(engine: Any) -> StyleDatabase | None:
    """The engine's styles.csv (A1111 keeps it beside its data; we use --data-dir), shared by
    the UI and the API; None for an engine without a data dir."""
    data_dir = engine.paths.data_dir
    if data_dir is None:
        return None
    return styles_file(Path(data_dir).resolve() / "styles.csv")
