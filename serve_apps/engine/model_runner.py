"""Owns a loaded model's KV cache tensors and runs one forward per step.

The same runner serves every tensor-parallel rank: `forward` takes anything with Scheduled's face
(rank 0's Scheduled, a worker's StepItem) and computes every logit row of the step in one call, so
the ranks' collectives pair up; only rank 0 gets the logits and turns them into StepLogits.
"""
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
        k_shape, v_shape = kv_cache_shapes(num_blocks, block_size, model.num_kv_heads, head_dim)
        self.kv_caches = [(zeros_on_huge_pages(k_shape, dtype), zeros_on_huge_pages(v_shape, dtype))
                          for _ in range(config.num_hidden_layers)]
        if next(model.parameters()).device.type == "cpu":
            native_ops()  # build or load the C++ kernels now, while the replica starts, not in its first request

    def _prepare(self, items):
        """Flat inputs for the step, computed with whole-array operations: no Python per token."""
        query_lens = [item.num_new_tokens for item in items]
        context_lens = [item.start + item.num_new_tokens for item in items]
        input_ids: list[int] = []
        for item in items:
            input_ids += item.new_token_ids
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
    def forward(self, items) -> torch.Tensor | None:
        """The step's logit rows: at the last token of each item that samples, then at each item's
        prompt-logprob positions (None on tensor-parallel ranks other than 0)."""
        input_ids, positions, batch = self._prepare(items)
        hidden = self.model(input_ids, positions, batch, self.kv_caches)
        first = np.cumsum(batch.query_lens) - batch.query_lens  # each item's first row in the batch
        rows = [first[i] + item.num_new_tokens - 1 for i, item in enumerate(items) if item.completes_sequence]
        for i, item in enumerate(items):
            rows += range(first[i], first[i] + item.num_prompt_logprob_rows)
        return self.model.compute_logits(hidden[torch.as_tensor(rows, dtype=torch.long)])

    def execute(self, out: SchedulerOutput) -> StepLogits:
        """Logits at the last token of each request that samples this step, and the prompt
        logprobs of requests that asked for them."""
        logits = self.forward(out.scheduled)
        num_samples = sum(item.completes_sequence for item in out.scheduled)
        prompt, row = {}, num_samples
        for item in out.scheduled:
            if item.request.params.prompt_logprobs is not None and item.start < item.request.num_prompt_tokens:
                rows = logits[row : row + item.num_prompt_logprob_rows]
                prompt[item.request.request_id] = (item.start, self._prompt_logprobs(item, rows))
                row += item.num_prompt_logprob_rows
        return StepLogits(logits[:num_samples], prompt)

    @torch.inference_mode()
    def _prompt_logprobs(self, item, logits: torch.Tensor) -> list[PromptLogprob]:
        """For each prompt token this step computed, the logprob of the prompt token after it."""
        request = item.request
        stop = item.start + item.num_prompt_logprob_rows
        if stop <= item.start:
            return []
        logprobs = logits.float().log_softmax(-1)
        targets = torch.tensor(request.prompt_token_ids[item.start + 1 : stop + 1])
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top_n = request.params.prompt_logprobs
        tops = [None] * len(chosen)
        if top_n:
            values, ids = logprobs.topk(top_n, dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [PromptLogprob(t, c, top) for t, c, top in zip(targets.tolist(), chosen, tops)]
