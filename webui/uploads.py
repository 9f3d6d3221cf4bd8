"""Upload limits for the web UI's image inputs, checked before Gradio decodes an upload.

Gradio itself refuses files over `max_file_size` (set from `--max-upload-mb` at launch); the
pixel count needs the image's header, so every image and file input of the page gets its
`preprocess` (which decodes) preceded by `UploadLimits.check_file` on the uploaded paths. An
image over the limit is a gr.Error naming the input, never a decompression bomb in memory.
"""

from __future__ import annotations

from typing import Any, Iterator

import gradio as gr
from pydantic import BaseModel

from pipelines.core.request import RequestError
from pipelines.core.uploads import UploadLimits

from . import convert

GUARDED = (gr.Image, gr.ImageEditor, gr.File)


def guard_uploads(blocks: gr.Blocks, limits: UploadLimits) -> int:
    """Check every image/file input of `blocks` against `limits`; returns how many were guarded."""
    guarded = 0
    for block in blocks.blocks.values():
        if isinstance(block, GUARDED) and not getattr(block, "_upload_limits", None):
            _guard(block, limits)
            guarded += 1
    return guarded


def _guard(component: Any, limits: UploadLimits) -> None:
    decode = component.preprocess
    name = component.label or component.elem_id or type(component).__name__

    def preprocess(payload: Any) -> Any:
        for path in _file_paths(payload):
            try:
                limits.check_file(name, path)
            except RequestError as exc:
                raise gr.Error(convert.error_message(exc), print_exception=False) from None
        return decode(payload)

    component.preprocess = preprocess
    component._upload_limits = limits


def _file_paths(value: Any) -> Iterator[str]:
    """The local paths inside a component's payload (FileData, an editor's layers, lists)."""
    if value is None:
        return
    path = getattr(value, "path", None)
    if isinstance(path, str):
        yield path
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _file_paths(item)
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from _file_paths(getattr(value, field))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _file_paths(item)
