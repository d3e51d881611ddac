"""A request-body size limit for the OpenAI ingress, as plain ASGI middleware.

A declared Content-Length over the limit is refused without handing the body on. A body sent
without one (chunked) is read here as it arrives, at most up to the limit, then handed on; past the
limit it is refused without being buffered whole. Refusals are 413 with OpenAI's error JSON.

A refused body is still read, and dropped, before the 413 goes out (up to MAX_DRAINED_BYTES). The
server closes the connection after its answer when the client asked it to (`Connection: close`, as
urllib sends), and closing with request bytes still arriving resets the connection (TCP RST): a
client still sending its body then gets the reset instead of the 413 (most of eight concurrent 10 MB
uploads through Serve's proxy did).
"""
from __future__ import annotations

import json

from serve_apps.openai_protocol import error_body

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
MAX_DRAINED_BYTES = 64 * 2**20  # past this, the 413 goes out at once, reset or not


async def _drain(receive, num_bytes: int) -> None:
    """Read and drop the rest of the body, up to `num_bytes`."""
    while num_bytes > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        num_bytes -= len(message.get("body", b""))


async def _refuse(send, limit: int) -> None:
    message = f"request body exceeds {limit} bytes; send a shorter prompt"
    body = json.dumps(error_body(message, "invalid_request_error", 413)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _read_within(receive, limit: int) -> list[dict] | None:
    """The body's messages, or None once more than `limit` bytes have arrived (the rest drained)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # the client went away: let the app see it
        size += len(message.get("body", b""))
        more_body = message.get("more_body", False)
        if size > limit:
            if more_body:
                await _drain(receive, MAX_DRAINED_BYTES)
            return None
        if not more_body:
            return messages


class BodyLimit:
    def __init__(self, app, limit_of):
        """`limit_of()`: the limit in bytes, read per request (the ingress sets it from its config)."""
        self.app, self.limit_of = app, limit_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_of()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                await _drain(receive, MAX_DRAINED_BYTES)
                return await _refuse(send, limit)
            return await self.app(scope, receive, send)  # the server delivers no more than declared
        messages = await _read_within(receive, limit)
        if messages is None:
            return await _refuse(send, limit)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
