"""What an engine is built from, and how it reads prompts: light (no torch, no model code), so the
HTTP ingress and the Serve app builder can import it without loading the engine."""
from __future__ import annotations

from pydantic import Field

from cluster.config import StrictConfig


class EngineConfig(StrictConfig):
    block_size: int = Field(16, ge=1)
    kv_cache_memory_gib: float = Field(1.0, gt=0, description="per rank under tensor parallelism (the rank with "
                                                             "the most KV heads sizes the pool)")
    num_blocks: int | None = Field(None, ge=1, description="overrides kv_cache_memory_gib")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    max_model_len: int | None = Field(None, ge=2, description="default: the model's context")
    enable_prefix_caching: bool = True
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")
    prepack_weights: bool = Field(True, description="CPU: linear weights also kept packed for our GEMM (float32) "
                                                    "or oneDNN's; faster decode and prefill, twice the weight memory")
    tensor_parallel_size: int = Field(1, ge=1, description="ranks one model is split over: rank 0 in the engine's "
                                                           "process, the others Ray actors")
    placement_strategy: str = Field("STRICT_PACK", pattern="^(STRICT_PACK|PACK|SPREAD|STRICT_SPREAD)$",
                                    description="of the replica's placement group: STRICT_PACK keeps the ranks on one "
                                                "node; PACK or SPREAD may span nodes")
    num_cpus_per_worker: float = Field(1, gt=0, description="CPUs (and torch threads) of each tensor-parallel worker")
    num_gpus_per_worker: float = Field(0, ge=0, description="GPUs of each tensor-parallel rank (rank 0 too)")
    tp_all_reduce: str = Field("auto", pattern="^(auto|shm|gloo)$",
                               description="auto: shared memory when every rank is on one node, else gloo")
    tp_timeout_s: float = Field(60, gt=0, description="a collective or a worker's start waits this long at most")


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Text to token ids as the engine reads prompts, with the special tokens the tokenizer adds to
    any text (Gemma's <bos>; SmolLM2's adds none), as transformers and vLLM do; ids pass through."""
    return tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
