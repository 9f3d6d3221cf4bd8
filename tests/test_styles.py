"""styles.csv: A1111's format, its {prompt} rule, its reverse for pasted infotexts, and safe saving."""

from __future__ import annotations

import csv
import threading

import pytest

from pipelines.core.styles import (
    PromptStyle,
    StyleDatabase,
    apply_styles,
    extract_style_text,
    extract_styles,
    merge_prompt,
    read_styles,
)

# --------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------

MERGE_CASES = [
    ("masterpiece, best quality", "a cat", "a cat, masterpiece, best quality"),
    ("masterpiece", "  a cat  ", "a cat, masterpiece"),  # both sides stripped
    ("masterpiece", "", "masterpiece"),  # empty sides dropped
    ("", "a cat", "a cat"),
    ("", "", ""),
    ("photo of {prompt}, 35mm", "a cat", "photo of a cat, 35mm"),
    ("{prompt}", " a cat ", " a cat "),  # placeholder: inserted as is
    ("{prompt} and {prompt}", "x", "x and x"),  # every placeholder
    ("photo of {prompt}", "", "photo of "),
    ("{Prompt}", "x", "x, {Prompt}"),  # case-sensitive
]


@pytest.mark.parametrize("style,prompt,expected", MERGE_CASES)
def test_merge_prompt(style, prompt, expected):
    assert merge_prompt(style, prompt) == expected


def test_apply_styles_in_order_to_both_prompts():
    first = PromptStyle("film", "film still of {prompt}", "cartoon")
    second = PromptStyle("quality", "masterpiece", "{prompt}, lowres")
    assert apply_styles("a cat", "blurry", [first, second]) == (
        "film still of a cat, masterpiece", "blurry, cartoon, lowres")
    assert apply_styles("a cat", "blurry", [second, first]) == (
        "film still of a cat, masterpiece", "blurry, lowres, cartoon")
    # an unknown style (None) is A1111's empty style: it only strips
    assert apply_styles(" a cat ", " blurry ", [None]) == ("a cat", "blurry")


# --------------------------------------------------------------------------------------
# Extracting (A1111's reverse, for pasted infotexts)
# --------------------------------------------------------------------------------------

EXTRACT_TEXT_CASES = [
    # A1111's own docstring examples
    ("masterpiece", "1girl, art by greg, masterpiece", (True, "1girl, art by greg")),
    ("masterpiece, {prompt}", "masterpiece, 1girl, art by greg", (True, "1girl, art by greg")),
    ("masterpiece, {prompt}", "exquisite, 1girl, art by greg", (False, "exquisite, 1girl, art by greg")),
    # more
    ("masterpiece", "masterpiece", (True, "")),
    ("masterpiece", " a cat, masterpiece \n", (True, "a cat")),
    ("masterpiece", "a cat", (False, "a cat")),
    ("photo of {prompt}, 35mm", "photo of a cat, 35mm", (True, "a cat")),
    ("", "anything ", (True, "anything")),  # empty style text matches anything
    ("ab{prompt}ba", "aba", (False, "aba")),  # overlapping ends are no match (A1111 says "")
]


@pytest.mark.parametrize("style,prompt,expected", EXTRACT_TEXT_CASES)
def test_extract_style_text(style, prompt, expected):
    assert extract_style_text(style, prompt) == expected


STYLES = [
    PromptStyle("quality", "masterpiece, best quality", "lowres, bad anatomy"),
    PromptStyle("film", "film still of {prompt}, grain", "{prompt}, cartoon"),
    PromptStyle("neg only", "", "watermark"),
    PromptStyle("empty", "", ""),
]


@pytest.mark.parametrize("names", [
    ["quality"], ["film"], ["neg only"], ["quality", "film"], ["film", "quality"],
    ["film", "neg only"], ["quality", "neg only", "film"],
])
def test_extract_styles_undoes_apply_styles(names):
    by_name = {s.name: s for s in STYLES}
    prompt, negative = apply_styles("a red fox in snow", "blurry", [by_name[n] for n in names])
    found, base_prompt, base_negative = extract_styles(prompt, negative, STYLES)
    assert sorted(found) == sorted(names)
    assert (base_prompt, base_negative) == ("a red fox in snow", "blurry")
    assert apply_styles(base_prompt, base_negative, [by_name[n] for n in found]) == (prompt, negative)


def test_extract_styles_needs_both_prompts_to_match():
    # the positive matches "quality" but the negative does not carry its negative text
    found, prompt, negative = extract_styles("a cat, masterpiece, best quality", "blurry", STYLES[:1])
    assert (found, prompt, negative) == ([], "a cat, masterpiece, best quality", "blurry")


def test_extract_styles_without_styles_changes_nothing():
    assert extract_styles(" a cat ", "blurry", []) == ([], " a cat ", "blurry")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_read_a1111_file(tmp_path):
    path = write(tmp_path / "styles.csv",
                 'name,prompt,negative_prompt\r\n'
                 '"None","",""\r\n'
                 'Cinematic,"cinematic still {prompt} . emotional, harmonious, vignette","anime, cartoon"\r\n'
                 '"Multi line","line one\nline two, ""quoted""",\r\n',
                 encoding="utf-8-sig")
    assert read_styles(path) == [
        PromptStyle("None", "", ""),
        PromptStyle("Cinematic", "cinematic still {prompt} . emotional, harmonious, vignette",
                    "anime, cartoon"),
        PromptStyle("Multi line", 'line one\nline two, "quoted"', ""),
    ]


@pytest.mark.parametrize("content,expected", [
    ("", []),
    ("name,prompt,negative_prompt\n", []),
    ("\ufeffname,prompt,negative_prompt\na,b,c\n", [PromptStyle("a", "b", "c")]),  # BOM
    ("name, prompt, negative_prompt\na, b, c\n", [PromptStyle("a", "b", "c")]),  # spaces after commas
    ("name,prompt,negative_prompt\n\n\na,b,c\n,,\n\n", [PromptStyle("a", "b", "c")]),  # blank rows
    ("name,prompt,negative_prompt\na\n", [PromptStyle("a", "", "")]),  # short row
    ("name,prompt,negative_prompt,notes\na,b,c,d,e\n", [PromptStyle("a", "b", "c")]),  # extra columns
    ("name,text\na,b\n", [PromptStyle("a", "b", "")]),  # A1111's first format
    ("Name,Negative_Prompt,Prompt\na,n,p\n", [PromptStyle("a", "p", "n")]),  # by name, any case/order
    ("name,prompt,negative_prompt\n# a comment,x,y\na,b,c\n", [PromptStyle("a", "b", "c")]),
    ("a,b,c\nd,e,f\n", [PromptStyle("a", "b", "c"), PromptStyle("d", "e", "f")]),  # no header
    # a repeated name: the later texts win, at the first place (A1111 fills a dict)
    ("name,prompt,negative_prompt\na,1,\nb,2,\na,3,\n",
     [PromptStyle("a", "3", ""), PromptStyle("b", "2", "")]),
])
def test_read_is_lenient(tmp_path, content, expected):
    assert read_styles(write(tmp_path / "styles.csv", content)) == expected


def test_missing_file_is_empty(tmp_path):
    assert read_styles(tmp_path / "nope.csv") == []
    db = StyleDatabase(tmp_path / "nope.csv")
    assert db.names() == [] and db.get("x") is None


def test_non_utf8_file_still_reads(tmp_path):
    path = write(tmp_path / "styles.csv", "name,prompt,negative_prompt\ncaf\xe9,cr\xe8me,\n",
                 encoding="cp1252")
    assert read_styles(path) == [PromptStyle("caf\xe9", "cr\xe8me", "")]


# --------------------------------------------------------------------------------------
# The database: saving, deleting, sharing
# --------------------------------------------------------------------------------------


def test_save_creates_a1111_file_and_round_trips(tmp_path):
    path = tmp_path / "sub" / "styles.csv"
    db = StyleDatabase(path)
    tricky = 'a "quoted", multi\nline {prompt} with, commas'
    db.save_style("Tricky, name", tricky, "neg, \u00e9\u6f22")
    db.save_style("plain", "masterpiece", "")
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfname,prompt,negative_prompt\r\n")  # as A1111 writes it
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"name": "Tricky, name", "prompt": tricky, "negative_prompt": "neg, \u00e9\u6f22"},
        {"name": "plain", "prompt": "masterpiece", "negative_prompt": ""},
    ]
    assert StyleDatabase(path).styles() == [
        PromptStyle("Tricky, name", tricky, "neg, \u00e9\u6f22"), PromptStyle("plain", "masterpiece", "")]
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["styles.csv"]  # no temp file left


def test_save_keeps_other_rows_columns_and_comments(tmp_path):
    path = write(tmp_path / "styles.csv",
                 "name,prompt,negative_prompt,author\n"
                 "# my styles,,,\n"
                 "a,pa,na,me\n"
                 "b,pb,nb,you\n")
    db = StyleDatabase(path)
    db.save_style("a", "pa2", "na2")  # replaced in place
    db.save_style("c", "pc", "nc")  # appended
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["name", "prompt", "negative_prompt", "author"],
        ["# my styles", "", "", ""],
        ["a", "pa2", "na2", "me"],
        ["b", "pb", "nb", "you"],
        ["c", "pc", "nc", ""],
    ]
    assert db.names() == ["a", "b", "c"]
    assert db.get("a") == PromptStyle("a", "pa2", "na2")


def test_save_replaces_duplicates_with_one_row(tmp_path):
    path = write(tmp_path / "styles.csv", "name,prompt,negative_prompt\na,1,\nb,2,\na,3,\n")
    db = StyleDatabase(path)
    db.save_style("a", "4", "")
    assert read_styles(path) == [PromptStyle("a", "4", ""), PromptStyle("b", "2", "")]
    assert path.read_text(encoding="utf-8-sig").count("\na,") == 1


def test_delete(tmp_path):
    db = StyleDatabase(tmp_path / "styles.csv")
    db.save_style("a", "1", "")
    db.save_style("b", "2", "")
    assert db.delete("a") is True
    assert db.delete("a") is False
    assert db.names() == ["b"]
    assert read_styles(tmp_path / "styles.csv") == [PromptStyle("b", "2", "")]


@pytest.mark.parametrize("name", ["", "   ", "#comment"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError):
        StyleDatabase(tmp_path / "styles.csv").save_style(name, "x", "")
    assert not (tmp_path / "styles.csv").exists()


def test_edits_on_disk_are_seen_and_kept(tmp_path):
    path = tmp_path / "styles.csv"
    db = StyleDatabase(path)
    db.save_style("mine", "1", "")
    # someone edits the file by hand (a different size, so the change is visible by stat)
    write(path, "name,prompt,negative_prompt\nmine,1,\ntheirs,2,\n")
    assert db.names() == ["mine", "theirs"]
    other = StyleDatabase(path)
    other.save_style("third", "3", "")
    db.save_style("mine", "changed", "")  # re-reads before writing: "third" survives
    assert read_styles(path) == [PromptStyle("mine", "changed", ""), PromptStyle("theirs", "2", ""),
                                 PromptStyle("third", "3", "")]


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "styles.csv"
    db = StyleDatabase(path)
    db.save_style("a", "1", "")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pipelines.core.styles.os.replace", boom)
    with pytest.raises(OSError):
        db.save_style("b", "2", "")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["styles.csv"]


def test_threads_saving_at_once_lose_nothing(tmp_path):
    path = tmp_path / "styles.csv"
    db = StyleDatabase(path)
    errors = []

    def worker(k):
        try:
            for j in range(10):
                db.save_style(f"s{k}-{j}", f"p{k}{j}", "")
                db.names()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = sorted(f"s{k}-{j}" for k in range(6) for j in range(10))
    assert sorted(s.name for s in read_styles(path)) == expected


def test_database_apply_and_extract(tmp_path):
    db = StyleDatabase(tmp_path / "styles.csv")
    for style in STYLES:
        db.save_style(style.name, style.prompt, style.negative_prompt)
    prompt, negative = db.apply("a cat", "blurry", ["film", "quality", "unknown"])
    assert (prompt, negative) == ("film still of a cat, grain, masterpiece, best quality",
                                  "blurry, cartoon, lowres, bad anatomy")
    assert db.extract(prompt, negative) == (["film", "quality"], "a cat", "blurry")
    assert "film" in db and "unknown" not in db
