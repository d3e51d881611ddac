"""Sampling parameters: every out-of-range field is named in the error."""
import pytest
from pydantic import ValidationError

from serve_apps.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1), ("top_k", -2), ("top_k", 0),
    ("min_p", 1.5), ("logprobs", 21),
])
def test_out_of_range_fields_are_named(field, value):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: value})


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="best_of"):
        SamplingParams(best_of=2)
