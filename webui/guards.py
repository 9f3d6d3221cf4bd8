"""ASGI guards for the Gradio app, given to it at launch (`app_kwargs={"middleware": ...}`).

`NoUrlFetch`: Gradio's file route also takes a URL (`/gradio_api/file=https://...`) and
fetches it server-side (public addresses only) to stream it back. This app never needs that
(its images are files in the outputs folder), and a server that fetches whatever a request
names is an open proxy; such requests get a 403 before Gradio sees them. Paths are served
as before (Gradio allows only its cache, the outputs folder and --allowed-paths).
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=")
_URL = re.compile(r"^\s*([a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # scheme://... or //host/...


def names_a_url(path: str) -> bool:
    for prefix in FILE_ROUTES:
        if path.startswith(prefix):
            return bool(_URL.match(unquote(path[len(prefix):])))
    return False


class NoUrlFetch:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and names_a_url(scope.get("path", "")):
            body = json.dumps({"detail": "this server does not fetch URLs; only its own files are served"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
