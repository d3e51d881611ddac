"""Failures after a request was accepted, as the client is told them (no cluster needed)."""
import asyncio
import json

from ray.exceptions import ActorDiedError, RayTaskError

from serve_apps.engine.errors import EngineDeadError
from serve_apps.ingress import _sse_lines
from serve_apps.openai_errors import failure


def test_a_dead_engine_or_replica_is_a_503_anything_else_a_500():
    dead = EngineDeadError("the engine stopped on an internal error")
    from_replica = RayTaskError("generate", "Traceback ...", dead).as_instanceof_cause()  # as Ray delivers it
    assert failure(from_replica).status == failure(ActorDiedError()).status == 503
    assert failure(from_replica).kind == "server_error"
    assert failure(KeyError("a bug")).status == 500


def test_a_stream_that_fails_after_its_200_ends_with_an_error_event():
    async def events():
        yield {"choices": [{"index": 0, "text": "Once"}]}
        raise EngineDeadError("the engine stopped on an internal error")

    async def body() -> list[str]:
        return [part async for part in _sse_lines(events())]

    first, error, done = asyncio.run(body())
    assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "Once"
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == 503
    assert done == "data: [DONE]\n\n"
