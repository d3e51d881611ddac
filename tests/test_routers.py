"""What the request routers read from a request, by name, without a cluster: the token ids the
kv_aware router hashes, and the text Ray's prefix router matches."""
import pytest
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from serve_apps.routing.routers import RayPrefixRouter, as_ray_llm_request, prompt_token_ids


def _request(**kwargs) -> PendingRequest:
    return PendingRequest(args=[], kwargs=kwargs, metadata=RequestMetadata("r", "r"), future=None)


def test_token_ids_are_read_by_name():
    assert prompt_token_ids(_request(token_ids=[5, 6, 7], params=None, client_prompt="hi")) == [5, 6, 7]
    assert prompt_token_ids(_request()) == []  # a call that is not a generation: routing stats
    assert prompt_token_ids(None) == []


@pytest.mark.parametrize("client_prompt, text", [
    ("Once upon a time", "Once upon a time"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Be brief.Hi"),
    ([1000, 1001], ""),  # token ids: no text, so the router falls back to power of two choices
])
def test_rays_prefix_router_reads_the_clients_prompt(client_prompt, text):
    router = RayPrefixRouter.__new__(RayPrefixRouter)  # reading a request's text needs no routing state
    request = _request(token_ids=[1, 2], params=None, client_prompt=client_prompt)
    assert router._extract_text_from_request(as_ray_llm_request(request)) == text
    assert request.args == []  # what the replica receives is left as it was


def test_a_call_that_is_not_a_generation_has_no_text():
    router = RayPrefixRouter.__new__(RayPrefixRouter)
    assert router._extract_text_from_request(as_ray_llm_request(_request())) == ""  # routing stats, health
