"""The styles / LoRA / embeddings accordion: handlers on values, and the UI builds with it."""

from __future__ import annotations

from pathlib import Path

from test_webui import FakeEngine as UIFakeEngine

from webui.app import build_ui
from webui.tabs import networks as nt


class FakeEngine(UIFakeEngine):
    """The UI tests' engine with one LoRA and two embeddings, its data (styles.csv) in `data_dir`."""

    def __init__(self, data_dir: Path | None = None):
        super().__init__(data_dir=data_dir)

    def lora_listing(self, refresh: bool = False):
        return [{"name": "red", "alias": "red", "path": "/x/red.safetensors", "prompt": "<lora:red:1>",
                 "trigger_words": ["red circle", "shiny"], "metadata": {"ss_network_dim": "4"}}]

    def embedding_listing(self, refresh: bool = False):
        return {"loaded": {"glowy": {}, "shiny": {}}, "skipped": {"broken": {}}}


def test_insert_helpers(tmp_path):
    engine = FakeEngine(tmp_path)
    assert nt.append_to_prompt("", "x") == "x"
    assert nt.append_to_prompt("a cat", "x") == "a cat, x"
    assert nt.append_to_prompt("a cat,", "x") == "a cat, x"
    assert nt.insert_lora(engine, "a cat", "red") == "a cat, <lora:red:1>"
    assert nt.insert_lora(engine, "a cat", "red", 0.75) == "a cat, <lora:red:0.75>"
    assert nt.insert_lora(engine, "a cat", None) == "a cat"
    assert nt.insert_trigger_words(engine, "a cat", "red") == "a cat, red circle, shiny"
    assert nt.embedding_names(engine) == ["glowy", "shiny"]
    card = nt.describe_lora(engine.lora_listing()[0])
    assert "<lora:red:1>" in card and "red circle" in card and "rank: 4" in card


def test_styles_apply_and_save(tmp_path):
    engine = FakeEngine(tmp_path)
    names, message = nt.save_style(engine, "moody", "{prompt}, dark, moody", "bright")
    assert names == ["moody"] and "Saved" in message
    assert (tmp_path / "styles.csv").exists()
    assert nt.apply_styles(engine, "a cat", "blurry", ["moody"]) == ("a cat, dark, moody", "blurry, bright")
    names, message = nt.save_style(engine, "  ", "x", "")
    assert message.startswith("Not saved")


def test_ui_builds_with_the_accordion(engine):
    blocks = build_ui(engine)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for mode in ("txt2img", "img2img", "inpaint"):
        assert {f"{mode}_styles", f"{mode}_lora", f"{mode}_insert_lora", f"{mode}_embedding"} <= ids
