"""`--hf-checkpoint OWNER/REPO/FILE`: fetch one checkpoint from the Hugging Face Hub at start-up.

Meant for a Space (whose repository cannot hold a multi-gigabyte checkpoint comfortably) and
for anyone who wants a known checkpoint without a browser. The file is downloaded with
`huggingface_hub` (its progress bars on stderr, `HF_TOKEN` for gated repos, `HF_ENDPOINT` for
another hub) into the checkpoint folder, then checked against the hub's size and, for LFS
files, sha256; a file that does not match is deleted. The normal loader takes it from there:
nothing else in the engine knows it came from the hub.

Every failure (offline, unknown repo, mismatch) is a `HubError` with a plain message; the
launcher prints it and starts without the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.fileio import sha256_file

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubError(RuntimeError):
    pass


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "HubFile":
        """'owner/repo/path/to/file.safetensors[@revision]'."""
        spec, _, revision = str(text).strip().partition("@")
        parts = [p for p in spec.split("/") if p]
        if len(parts) < 3:
            raise HubError(f"--hf-checkpoint {text!r}: expected OWNER/REPO/FILE, "
                           "e.g. stabilityai/sd-turbo/sd_turbo.safetensors")
        if any(p in (".", "..") for p in parts):
            raise HubError(f"--hf-checkpoint {text!r}: '.' and '..' are not allowed in the path")
        filename = "/".join(parts[2:])
        if not filename.endswith(CHECKPOINT_SUFFIXES):
            raise HubError(f"--hf-checkpoint {text!r}: the file must be a .safetensors (or .ckpt) checkpoint")
        return cls("/".join(parts[:2]), filename, revision or None)

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision else "")


def fetch_checkpoint(spec: str | HubFile, folder: Path, endpoint: str | None = None,
                     token: str | bool | None = None, timeout: float = 10.0) -> Path:
    """Download `spec` into `folder` (kept: a second start finds it and downloads nothing) and
    verify it. Returns the local path. Raises HubError."""
    hub_file = spec if isinstance(spec, HubFile) else HubFile.parse(spec)
    try:
        # optional, and slow to import: only when a checkpoint is fetched
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError as exc:  # a dependency of diffusers/transformers, so normally present
        raise HubError(f"--hf-checkpoint needs the huggingface_hub package ({exc})") from exc
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    folder = Path(folder)
    target = folder / hub_file.filename
    try:
        url = hf_hub_url(hub_file.repo_id, hub_file.filename, revision=hub_file.revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=token, timeout=timeout, endpoint=endpoint)
        before = _stat(target)
        folder.mkdir(parents=True, exist_ok=True)
        path = Path(hf_hub_download(hub_file.repo_id, hub_file.filename, revision=hub_file.revision,
                                    local_dir=folder, endpoint=endpoint, token=token, etag_timeout=timeout))
    except HubError:
        raise
    except Exception as exc:  # offline, DNS, 401/404, disk full: all mean "not this time"
        raise HubError(f"--hf-checkpoint {hub_file}: could not download from {endpoint} "
                       f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if meta.size is not None and path.stat().st_size != meta.size:
        path.unlink(missing_ok=True)
        raise HubError(f"--hf-checkpoint {hub_file}: got {path.stat().st_size if path.exists() else 0} bytes, "
                       f"the hub says {meta.size}; the file was deleted")
    expected = (meta.etag or "").strip('"').lower()
    if _SHA256.match(expected) and _stat(path) != before:  # a fresh download: check every byte once
        actual = sha256_file(path)
        if actual != expected:
            path.unlink(missing_ok=True)
            raise HubError(f"--hf-checkpoint {hub_file}: sha256 {actual[:10]}… does not match the hub's "
                           f"{expected[:10]}…; the file was deleted")
    return path



def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
