"""Error bodies, HTTP basic auth and the route class every API route uses.

Every failure leaves as JSON. A bad field is a 422 shaped like FastAPI's own validation
errors, plus two flat keys for clients that just print something:

    {"error": "steps: must be between 1 and 150, got 0", "field": "steps",
     "detail": [{"loc": ["body", "steps"], "msg": "must be between 1 and 150, got 0",
                 "type": "value_error"}]}

Known trouble that is not the client's fault (queue full, out of memory, no ZeroGPU free) is
a 503 with {"error", "detail"}, a spent ZeroGPU quota a 429; only a genuine bug is a 500, and
it still says what happened.

The checks live in a route class rather than in app-level exception handlers so the router
can be mounted into someone else's app (Gradio's) without changing how that app's own routes
answer.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from typing import Sequence

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from pipelines.core.hosted_limits import ZeroGPUError
from pipelines.core.jobs import QueueFull
from pipelines.core.request import RequestError

log = logging.getLogger(__name__)

Credentials = Sequence[tuple[str, str]]


class ApiError(Exception):
    """An answer other than 200, raised anywhere inside a handler."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def response(self) -> JSONResponse:
        if self.field is not None:
            return field_error(self.field, self.message, self.status)
        return JSONResponse({"error": self.message, "detail": self.message}, status_code=self.status)


def bad_field(field: str, message: str) -> ApiError:
    return ApiError(422, message, field)


def field_error(field: str, message: str, status: int = 422, error_type: str = "value_error") -> JSONResponse:
    loc = ["body", *field.split(".")] if field else ["body"]
    return JSONResponse({
        "error": f"{field}: {message}" if field else message,
        "field": field,
        "detail": [{"loc": loc, "msg": message, "type": error_type}],
    }, status_code=status)


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """pydantic's errors (wrong type, malformed JSON), with the field spelled out."""
    detail = []
    for error in exc.errors():
        loc = [part for part in error.get("loc", ()) if isinstance(part, (str, int))]
        # the input is left out: it can be a multi-megabyte base64 image
        detail.append({"loc": loc, "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))})
    first = detail[0] if detail else {"loc": ["body"], "msg": "invalid request", "type": "value_error"}
    message = first["msg"]
    if first["type"] == "json_invalid":  # its loc is ("body", <character position>)
        field = "body"
        message = f"{message} at character {first['loc'][-1]}" if len(first["loc"]) > 1 else message
    else:
        path = first["loc"][1:] if first["loc"][:1] == ["body"] else first["loc"]
        field = ".".join(str(p) for p in path) or "body"
    return JSONResponse({"error": f"{field}: {message}", "field": field, "detail": detail}, status_code=422)


def _named(exc: BaseException, *names: str) -> bool:
    # pipelines.models.checkpoint_file imports torch, which webui/ must not: recognise its errors by name
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def is_checkpoint_error(exc: BaseException) -> bool:
    return _named(exc, "CheckpointError", "UnsupportedCheckpoint")


def unexpected_error(exc: Exception) -> JSONResponse:
    if isinstance(exc, RequestError):
        return field_error(exc.field, exc.message)
    if isinstance(exc, QueueFull):
        return JSONResponse({"error": str(exc), "detail": str(exc)}, status_code=503,
                            headers={"Retry-After": "5"})
    if isinstance(exc, ZeroGPUError):  # the visitor's quota is spent (429), or no GPU was lent (503)
        return JSONResponse({"error": str(exc), "detail": str(exc)}, status_code=429 if exc.quota else 503)
    if isinstance(exc, MemoryError) or _named(exc, "OutOfMemoryError"):
        message = ("out of memory while running this job; try a smaller size or batch, "
                   "or --medvram / --lowvram")
        return JSONResponse({"error": message, "detail": str(exc) or message}, status_code=503)
    if is_checkpoint_error(exc):
        return field_error("sd_model_checkpoint", str(exc))
    log.exception("internal error in the REST API")
    message = f"internal error: {type(exc).__name__}: {exc}"
    return JSONResponse({"error": message, "detail": message}, status_code=500)


def authenticated_user(request: Request, auth: Credentials) -> str | None:
    """The user name when the request carries one of the configured basic-auth pairs."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    found = None
    for known_user, known_password in auth:
        # compare every pair, in constant time, so timing says nothing about which matched
        same_user = secrets.compare_digest(user.encode(), known_user.encode())
        same_password = secrets.compare_digest(password.encode(), known_password.encode())
        if same_user and same_password:
            found = known_user
    return found


def unauthorized() -> JSONResponse:
    return JSONResponse({"error": "authentication required", "detail": "Not authenticated"},
                        status_code=401, headers={"WWW-Authenticate": 'Basic realm="sdapi"'})


def too_large(declared: int, limit: int) -> JSONResponse:
    message = (f"the request body is {declared / (1 << 20):.1f} MB; this server takes at most "
               f"{limit / (1 << 20):.0f} MB (see --max-upload-mb)")
    return JSONResponse({"error": f"body: {message}", "field": "body",
                         "detail": [{"loc": ["body"], "msg": message, "type": "value_error"}]}, status_code=413)


def route_class(auth: Credentials | None, max_body: int | None = None) -> type[APIRoute]:
    """An APIRoute that checks basic auth first, then the declared body size against `max_body`
    (a 413 before the body is read), then turns every failure into JSON."""

    class ApiRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                user = None
                if auth:
                    user = authenticated_user(request, auth)
                    if user is None:
                        return unauthorized()
                declared = request.headers.get("content-length", "")
                if max_body is not None and declared.isdigit() and int(declared) > max_body:
                    return too_large(int(declared), max_body)
                request.state.api_user = user
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    return validation_error(exc)
                except ApiError as exc:
                    return exc.response()
                except HTTPException:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure leaves as JSON
                    return unexpected_error(exc)

            return guarded

    return ApiRoute


def api_user(request: Request) -> str | None:
    return getattr(request.state, "api_user", None)


API_OWNER = "api"


def owner_of(request: Request) -> str:
    """The queue owner of an API job: 'api', or 'api:<user>' when auth is on."""
    user = api_user(request)
    return f"{API_OWNER}:{user}" if user else API_OWNER


def is_api_owner(owner: object) -> bool:
    """Whether a job's owner is one `owner_of` gives (a Gradio session hash never contains ":")."""
    text = str(owner) if owner else ""
    return text == API_OWNER or text.startswith(API_OWNER + ":")

