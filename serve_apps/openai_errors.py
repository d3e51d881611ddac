"""Every error the OpenAI ingress answers, in OpenAI's error JSON with the right status: ours
(OpenAIError), FastAPI's and Starlette's own refusals (a body that is not JSON, no such path, a
wrong method), a full queue (429), a replica that failed (503), anything unexpected (500)."""
from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.engine.errors import EngineDeadError
from serve_apps.openai_protocol import error_body


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.status, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def overloaded(error: BackPressureError) -> OpenAIError:
    """The model's queue is full (Serve would answer this itself, in plain text)."""
    retry_after = None if error.retry_after_s is None else {"Retry-After": str(math.ceil(error.retry_after_s))}
    return OpenAIError(error.status_code, f"the model's queue is full; retry later. {error.message}",
                       "rate_limit_error", headers=retry_after)


def failure(error: Exception) -> OpenAIError:
    """What went wrong after the request was accepted, as the client is told: retry when the model's
    replica (or its engine) died, else an internal error."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, (EngineDeadError, RayActorError)):
        return OpenAIError(503, "the model's replica failed while serving this request; retry it", "server_error")
    return OpenAIError(500, "internal error in the OpenAI ingress; see its log", "server_error")


async def _failed(_, error: Exception) -> JSONResponse:
    return failure(error).response()


async def _invalid(_, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return OpenAIError(400, _not_json("is not valid JSON", (first.get("ctx") or {}).get("error", ""))).response()
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    return OpenAIError(400, f"{param or 'request body'}: {first['msg']}", param=param).response()


async def _refused(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals: no such path (404), a method the path does not take
    (405), a body FastAPI could not parse (400: not UTF-8, or nested deeper than its JSON parser goes)."""
    where = f"{request.method} {request.url.path}"
    if error.status_code == 404:
        return OpenAIError(404, f"no such endpoint: {where}", "not_found_error").response()
    if error.status_code == 405:
        message = f"method not allowed: {where} (allowed: {error.headers['Allow']})"
    elif error.__cause__ is not None:
        message = _not_json("could not be parsed as JSON", error.__cause__)
    else:
        message = str(error.detail)
    return OpenAIError(error.status_code, message, headers=error.headers).response()


def _not_json(what: str, detail) -> str:
    detail = " ".join(str(detail).split())
    return f"request body {what} ({detail})" if detail else f"request body {what}"


def add_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(RequestValidationError, _invalid)
    api.add_exception_handler(StarletteHTTPException, _refused)
    for error in (OpenAIError, EngineDeadError, RayActorError):
        api.add_exception_handler(error, _failed)
    # Starlette answers anything else with this handler, then re-raises it, so it is still logged.
    api.add_exception_handler(Exception, _failed)
