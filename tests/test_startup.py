"""Start-up (issue 21): the launcher's note is built with the page (Gradio builds a Blocks again
each time it is re-entered), and the start-up timeline that bench/startup.py reads."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from test_webui import FakeEngine

from webui.app import build_ui
from webui.cli import STARTUP_TIMES_ENV, startup_mark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_the_launchers_note_is_first_on_the_page_and_read_again_on_every_load():
    texts = iter(["No checkpoint found", "Hosted demo"])
    blocks = build_ui(FakeEngine(), notice=lambda: next(texts))
    note = blocks.webui.components["notice"]
    assert blocks.children[0] is note and note.value == "No checkpoint found"
    config = blocks.get_config_file()
    assert config["layout"]["children"][0]["id"] == note._id  # what the browser lays out first
    reloads = [fn for fn in blocks.fns.values() if note in fn.outputs]
    assert len(reloads) == 1 and reloads[0].fn() == "Hosted demo"  # a page load reads it again


def test_without_a_note_the_page_starts_with_the_header():
    blocks = build_ui(FakeEngine())
    assert "notice" not in blocks.webui.components
    assert all(getattr(block, "elem_id", None) != "space_notice" for block in blocks.blocks.values())


def test_startup_marks_are_silent_unless_asked_and_the_bench_reads_them(monkeypatch, capsys):
    from startup import timeline

    monkeypatch.delenv(STARTUP_TIMES_ENV, raising=False)
    startup_mark("page built")
    assert capsys.readouterr().err == ""

    monkeypatch.setenv(STARTUP_TIMES_ENV, repr(time.time() - 2.5))  # the bench's launch time
    startup_mark("page built")
    startup_mark("serving the page")
    steps = timeline("Loading the default checkpoint in the background\n" + capsys.readouterr().err)
    assert [step.split("s  ", 1)[1] for step in steps] == ["page built", "serving the page"]
    seconds = float(steps[0].split()[0])
    assert 2.5 <= seconds < 10  # counted from the launch time given, not from this module's import
