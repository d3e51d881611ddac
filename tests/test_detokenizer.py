"""Streaming text: multi-byte characters never split, stop strings never leaked."""
import pytest
from transformers import AutoTokenizer

from serve_apps.engine.detokenizer import IncrementalDetokenizer

TEXT = " Héllo wörld! 日本語のテキスト 🎉🚀 naïve café, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 END tail"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def stream(tokenizer, text, stop=()):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:", add_special_tokens=False), list(stop))
    pieces = []
    for i, token in enumerate(ids):
        detok.push(token)
        pieces.append(detok.take_new_text(finished=i == len(ids) - 1 or detok.stopped))
        if detok.stopped:
            break
    return ids, pieces, detok


def test_deltas_rebuild_the_text_and_never_split_a_character(tokenizer):
    ids, pieces, detok = stream(tokenizer, TEXT)
    assert len(ids) > len(TEXT.split())  # several characters span more than one token
    assert "".join(pieces) == TEXT == detok.text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_cuts_the_text_and_is_never_streamed(tokenizer):
    _, pieces, detok = stream(tokenizer, TEXT, stop=["café", "nothing"])
    assert detok.stopped
    assert "".join(pieces) == TEXT[: TEXT.index("café")]
    assert not any("caf" in p for p in pieces)
