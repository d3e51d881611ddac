"""A streamed reply that ends early stops the replica responses still generating for it, however
it ends: Starlette's two ways of noticing a client that went away (an `http.disconnect` message
before ASGI 2.4, a failing send from 2.4 on) and a cancelled request. Neither Starlette nor Python
closes the abandoned generators, so without this the replicas would go on generating.

The replica responses here are stand-ins with Serve's DeploymentResponseGenerator surface
(`async for` and `cancel()`); tests/serving/test_serve_app.py drops a real client from a real Serve
app and checks the engine aborted its request."""
import asyncio

import pytest
from starlette.requests import ClientDisconnect

from serve_apps.chunks import Chunk
from serve_apps.ingress import Choices, _EventStream


class ReplicaResponse:
    """Streams `length` chunks (None: until cancelled), and records whether it was cancelled."""

    def __init__(self, length: int | None):
        self.length, self.cancelled = length, False

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        sent = 1  # the first chunk came before Choices was made
        while (self.length is None or sent < self.length) and not self.cancelled:
            await asyncio.sleep(0)
            sent += 1
            yield Chunk("x", 1, sent)

    def cancel(self) -> None:
        self.cancelled = True


async def _events(choices: Choices):
    async for chunk in choices[0]:
        yield {"text": chunk.text}


def _reply(response: ReplicaResponse) -> _EventStream:
    return _EventStream(_events(choices := Choices([response], [Chunk("x", 1, 1, replica="r1")])), choices)


def _serve(reply, spec_version: str, send, receive):
    scope = {"type": "http", "asgi": {"spec_version": spec_version}}
    return asyncio.run(reply(scope, receive, send))


async def _never_disconnects():
    await asyncio.Event().wait()


def test_a_stream_read_to_its_end_cancels_nothing():
    response, sent = ReplicaResponse(length=5), []

    async def send(message):
        sent.append(message)

    _serve(_reply(response), "2.4", send, _never_disconnects)
    assert not response.cancelled
    assert sum(b"data: {" in m.get("body", b"") for m in sent) == 5 and sent[-2]["body"] == b"data: [DONE]\n\n"


def test_a_client_gone_by_disconnect_message_stops_its_replica():
    response, sent = ReplicaResponse(length=None), []

    async def send(message):
        sent.append(message)

    async def receive():  # before ASGI 2.4 Starlette listens for this, and ends the reply without an error
        while len(sent) < 3:
            await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    _serve(_reply(response), "2.3", send, receive)
    assert response.cancelled


def test_a_client_gone_by_failing_send_stops_its_replica():
    response = ReplicaResponse(length=None)

    async def send(message):
        if message.get("body"):
            raise OSError("the client went away")

    with pytest.raises(ClientDisconnect):
        _serve(_reply(response), "2.4", send, _never_disconnects)
    assert response.cancelled


def test_a_cancelled_request_stops_its_replica():
    response = ReplicaResponse(length=None)
    blocked = asyncio.Event()

    async def send(message):
        if message.get("body"):
            blocked.set()
            await asyncio.Event().wait()  # the proxy is slow to take the chunk when Serve cancels

    async def main():
        task = asyncio.create_task(_reply(response)({"type": "http", "asgi": {"spec_version": "2.4"}},
                                                    _never_disconnects, send))
        await blocked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert response.cancelled
