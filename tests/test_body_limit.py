"""BodyLimit as plain ASGI, without a server: a refused body is read to its end before the 413
(so the client, still sending, is not reset), and never waited for past its end."""
import asyncio

import pytest

from serve_apps.body_limit import BodyLimit


async def _refuse_app(scope, receive, send):
    raise AssertionError("a body over the limit reached the app")


def _send_body(chunks: list[bytes], headers: list[tuple[bytes, bytes]], limit: int = 10) -> tuple[int, int]:
    """(status answered, body messages left unread)."""
    unread = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
              for i, chunk in enumerate(chunks)]
    answers = []

    async def receive():
        if not unread:
            await asyncio.Event().wait()  # as a server does past the body's end: until the client leaves
        return unread.pop(0)

    async def send(message):
        answers.append(message)

    middleware = BodyLimit(_refuse_app, limit_of=lambda: limit)
    asyncio.run(asyncio.wait_for(middleware({"type": "http", "headers": headers}, receive, send), timeout=5))
    return answers[0]["status"], len(unread)


@pytest.mark.parametrize("chunks, headers", [
    ([b"x" * 10] * 3, [(b"content-length", b"30")]),  # declared: refused before the app, read to the end
    ([b"x" * 11, b"y", b"z"], []),  # chunked: over the limit at once, the rest read and dropped
    ([b"x" * 5, b"x" * 8], []),  # chunked: the last message crosses the limit, nothing more to wait for
])
def test_a_body_over_the_limit_is_read_to_its_end_then_refused(chunks, headers):
    assert _send_body(chunks, headers) == (413, 0)
