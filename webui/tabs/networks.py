"""Styles, LoRA and embeddings under each generation tab's prompts.

`build(engine, fields, prefix)` adds an accordion below the prompt boxes:
- Styles (A1111's ``styles.csv`` in the data dir): pick styles, "Apply" writes them into the
  prompt boxes (``{prompt}`` placeholders honoured), "Save" stores the current prompts as a
  style under a name.
- LoRA: pick a file of the Lora folder to see its trigger words (kohya's ss_tag_frequency)
  and metadata; "Insert" appends ``<lora:name:1>`` to the prompt, "Insert trigger words"
  the words.
- Embeddings: "Insert" appends the embedding's name (that is how a prompt uses it).
Infotexts keep ``<lora:...>`` tags in the prompt, so "Read parameters" restores them.

The handlers are plain functions of values (no gradio in them) so they are tested directly.
No torch here: LoRA metadata comes from the engine's `lora_listing()`.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from pipelines.core.engine_api import EngineAPI
from pipelines.core.styles import style_database
from webui.common import QUIET

log = logging.getLogger(__name__)


def append_to_prompt(prompt: str | None, text: str) -> str:
    """`text` added at the end of the prompt, separated by ", " unless it is empty."""
    prompt = (prompt or "").rstrip()
    if not text:
        return prompt
    if not prompt:
        return text
    sep = " " if prompt.endswith(",") else ", "
    return prompt + sep + text


def lora_entries(engine: EngineAPI, refresh: bool = False) -> list[dict]:
    try:
        return list(engine.lora_listing(refresh))
    except Exception as exc:  # noqa: BLE001 - a broken listing must not break the page
        log.warning("LoRA listing failed: %s", exc)
        return []


def embedding_names(engine: EngineAPI, refresh: bool = False) -> list[str]:
    try:
        return sorted(engine.embedding_listing(refresh)["loaded"])
    except Exception as exc:  # noqa: BLE001
        log.warning("embedding listing failed: %s", exc)
        return []


def describe_lora(entry: dict | None) -> str:
    """Markdown card for a LoRA: what to write, trigger words, a few training facts."""
    if not entry:
        return ""
    lines = [f"**{entry['name']}** — write `{entry['prompt']}`"]
    if entry.get("trigger_words"):
        lines.append("Trigger words: " + ", ".join(f"`{w}`" for w in entry["trigger_words"][:20]))
    meta = entry.get("metadata") or {}
    facts = [f"{label}: {meta[key]}" for key, label in (
        ("ss_sd_model_name", "base model"), ("ss_base_model_version", "base"), ("ss_network_dim", "rank"),
        ("ss_network_alpha", "alpha"), ("ss_num_train_images", "images"), ("ss_output_name", "output name"))
        if meta.get(key)]
    if facts:
        lines.append("; ".join(facts))
    return "\n\n".join(lines)


def insert_lora(engine: EngineAPI, prompt: str, name: str | None, weight: float = 1.0) -> str:
    if not name:
        return prompt
    w = f"{weight:g}"
    return append_to_prompt(prompt, f"<lora:{name}:{w}>")


def find_lora(engine: EngineAPI, name: str | None) -> dict | None:
    """The LoRA listing's entry named `name` (as the dropdown shows it)."""
    return next((e for e in lora_entries(engine) if e["name"] == name), None)


def insert_trigger_words(engine: EngineAPI, prompt: str, name: str | None) -> str:
    entry = find_lora(engine, name)
    if not entry or not entry.get("trigger_words"):
        return prompt
    return append_to_prompt(prompt, ", ".join(entry["trigger_words"][:5]))


def apply_styles(engine: EngineAPI, prompt: str, negative: str, names: list[str] | None) -> tuple[str, str]:
    db = style_database(engine)
    if db is None:
        return prompt or "", negative or ""
    return db.apply(prompt or "", negative or "", names or [])


def style_names(engine: EngineAPI) -> list[str]:
    db = style_database(engine)
    return db.names() if db is not None else []


def save_style(engine: EngineAPI, name: str, prompt: str, negative: str) -> tuple[list[str], str]:
    """(style names after saving, status message)."""
    db = style_database(engine)
    if db is None:
        return [], "Not saved: no data folder"
    try:
        db.save_style((name or "").strip(), prompt or "", negative or "")
    except ValueError as exc:
        return db.names(), f"Not saved: {exc}"
    return db.names(), f"Saved style {name.strip()!r} to {db.path.name}"


def build(engine: EngineAPI, fields: dict, prefix: str) -> dict:
    """The accordion of one generation tab; returns its components by name."""
    p = prefix
    entries = lora_entries(engine)
    parts: dict[str, Any] = {}
    prompt, negative = fields["prompt"], fields["negative_prompt"]
    with gr.Accordion("Styles, LoRA, embeddings", open=False, elem_id=f"{p}_networks"):
        with gr.Row():
            parts["styles"] = gr.Dropdown(style_names(engine), value=[], multiselect=True, label="Styles",
                                          elem_id=f"{p}_styles", scale=4)
            parts["apply_styles"] = gr.Button("Apply styles", size="sm", elem_id=f"{p}_apply_styles", scale=1)
            parts["style_name"] = gr.Textbox(label="Save prompts as style", placeholder="style name",
                                             elem_id=f"{p}_style_name", scale=2)
            parts["save_style"] = gr.Button("Save style", size="sm", elem_id=f"{p}_save_style", scale=1)
        parts["style_status"] = gr.Markdown("", elem_id=f"{p}_style_status")
        with gr.Row():
            parts["lora"] = gr.Dropdown([e["name"] for e in entries], value=None, label="LoRA",
                                        elem_id=f"{p}_lora", scale=3)
            parts["lora_weight"] = gr.Number(value=1.0, step=0.05, label="Weight", elem_id=f"{p}_lora_weight",
                                             scale=1, min_width=80)
            parts["insert_lora"] = gr.Button("Insert", size="sm", elem_id=f"{p}_insert_lora", scale=1)
            parts["insert_triggers"] = gr.Button("Insert trigger words", size="sm",
                                                 elem_id=f"{p}_insert_triggers", scale=1)
        parts["lora_card"] = gr.Markdown("", elem_id=f"{p}_lora_card")
        with gr.Row():
            parts["embedding"] = gr.Dropdown(embedding_names(engine), value=None, label="Embedding",
                                             elem_id=f"{p}_embedding", scale=3)
            parts["insert_embedding"] = gr.Button("Insert", size="sm", elem_id=f"{p}_insert_embedding", scale=1)
            parts["refresh_networks"] = gr.Button("Refresh", size="sm", elem_id=f"{p}_refresh_networks",
                                                  scale=1)

    parts["apply_styles"].click(lambda pr, ng, names: apply_styles(engine, pr, ng, names),
                                inputs=[prompt, negative, parts["styles"]], outputs=[prompt, negative], **QUIET)

    def on_save(name, pr, ng):
        names, message = save_style(engine, name, pr, ng)
        return gr.update(choices=names), message

    parts["save_style"].click(on_save, inputs=[parts["style_name"], prompt, negative],
                              outputs=[parts["styles"], parts["style_status"]], **QUIET)
    parts["lora"].change(lambda name: describe_lora(find_lora(engine, name)), inputs=parts["lora"],
                         outputs=parts["lora_card"], **QUIET)
    parts["insert_lora"].click(lambda pr, name, w: insert_lora(engine, pr, name, float(w or 1.0)),
                               inputs=[prompt, parts["lora"], parts["lora_weight"]], outputs=prompt, **QUIET)
    parts["insert_triggers"].click(lambda pr, name: insert_trigger_words(engine, pr, name),
                                   inputs=[prompt, parts["lora"]], outputs=prompt, **QUIET)
    parts["insert_embedding"].click(lambda pr, name: append_to_prompt(pr, name or ""),
                                    inputs=[prompt, parts["embedding"]], outputs=prompt, **QUIET)

    def on_refresh():
        return (gr.update(choices=[e["name"] for e in lora_entries(engine, refresh=True)]),
                gr.update(choices=embedding_names(engine, refresh=True)),
                gr.update(choices=style_names(engine)))

    parts["refresh_networks"].click(on_refresh, outputs=[parts["lora"], parts["embedding"], parts["styles"]],
                                    **QUIET)
    return parts
