"""Owns a loaded model's KV cache tensors and runs one forward per step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.cpu_ops import native_ops
from kernels.memory import zeros_on_huge_pages
from kernels.paged_attention import kv_cache_shapes
from serve_apps.engine.models.llama import AttentionBatch, attention_head_dim
from serve_apps.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class PromptLogprob:
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None


@dataclass
class StepLogits:
    sample_logits: torch.Tensor  # [N, vocab], one row per request that samples this step
    # request id -> (first prompt position computed this step, its logprobs onward)
    prompt_logprobs: dict[str, tuple[int, list[PromptLogprob]]]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        config = model.config
        head_dim = attention_head_dim(config)
        dtype = next(model.parameters()).dtype
        k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, config.num_key_value_heads, head_dim)
        self.kv_caches = [(zeros_on_huge_pages(k_shape, dtype), zeros_on_huge_pages(v_shape, dtype))
                          for _ in range(config.num_hidden_layers)]
        if next(model.parameters()).device.type == "cpu":
            native_ops()  # build or load the C++ kernels now, while the replica starts, not in its first request

    def _prepare(self, out: SchedulerOutput):
        """Flat inputs for the step, computed with whole-array operations: no Python per token."""
        items = out.scheduled
        query_lens = [item.num_new_tokens for item in items]
        context_lens = [item.start + item.num_new_tokens for item in items]
        input_ids: list[int] = []
        for item in items:
            input_ids += item.request.token_ids[item.start : item.start + item.num_new_tokens]
        tables = [item.block_ids for item in items]
        block_tables = np.zeros((len(tables), max(map(len, tables))), dtype=np.int64)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table
        lens = np.asarray(query_lens, dtype=np.int64)
        token_seq = np.repeat(np.arange(len(items)), lens)
        first_row = np.cumsum(lens) - lens  # where each sequence's tokens start in the batch
        starts = np.asarray([item.start for item in items], dtype=np.int64)
        positions = starts[token_seq] + np.arange(len(input_ids)) - first_row[token_seq]
        slots = block_tables[token_seq, positions // self.block_size] * self.block_size + positions % self.block_size
        batch = AttentionBatch(torch.from_numpy(slots), torch.from_numpy(block_tables), query_lens, context_lens,
                               torch.from_numpy(token_seq), torch.from_numpy(positions + 1))
        return torch.tensor(input_ids, dtype=torch.long), torch.from_numpy(positions), batch

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepLogits:
        """Logits at the last token of each request that samples this step, and the prompt
        logprobs of requests that asked for them."""
        input_ids, positions, batch = self._prepare(out)
        hidden = self.model(input_ids, positions, batch, self.kv_caches)
        ends = torch.tensor(batch.query_lens).cumsum(0)
        samples = torch.tensor([item.completes_sequence for item in out.scheduled])
        sample_logits = self.model.compute_logits(hidden[(ends - 1)[samples]])
        prompt = {}
        for item, end in zip(out.scheduled, ends.tolist()):
            if item.request.params.prompt_logprobs is not None and item.start < item.request.num_prompt_tokens:
                logprobs = self._prompt_logprobs(item, hidden[end - item.num_new_tokens : end])
                prompt[item.request.request_id] = (item.start, logprobs)
        return StepLogits(sample_logits, prompt)

    def _prompt_logprobs(self, item, hidden: torch.Tensor) -> list[PromptLogprob]:
        """For each prompt token this step computed, the logprob of the prompt token after it."""
        request = item.request
        stop = min(item.start + item.num_new_tokens, request.num_prompt_tokens - 1)
        if stop <= item.start:
            return []
        logprobs = self.model.compute_logits(hidden[: stop - item.start]).float().log_softmax(-1)
        targets = torch.tensor(request.prompt_token_ids[item.start + 1 : stop + 1])
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top_n = request.params.prompt_logprobs
        tops = [None] * len(chosen)
        if top_n:
            values, ids = logprobs.topk(top_n, dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [PromptLogprob(t, c, top) for t, c, top in zip(targets.tolist(), chosen, tops)]
