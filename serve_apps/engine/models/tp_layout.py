"""Which part of a model each tensor-parallel rank holds (pure arithmetic: no torch).

Attention splits by whole KV groups (a KV head and the query heads that read it), so every rank
attends with its own keys and values and nothing crosses ranks until the output projection. The
counts may differ by one group: SmolLM2 (9 query heads, 3 KV heads) at tp=2 gives rank 0 two groups
(6 query heads) and rank 1 one (3). With more ranks than KV heads, each group's query heads are
split over tp / num_kv_heads ranks and its KV head is replicated on each of them. The MLP's
intermediate rows and the vocabulary split evenly (where they do not divide, the first shards take
one more row each).
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A tensor_parallel_size the model's shapes cannot take."""


@dataclass(frozen=True)
class Span:
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def scaled(self, factor: int) -> Span:
        return Span(self.start * factor, self.stop * factor)


@dataclass(frozen=True)
class RankShard:
    """What one rank holds: its query heads, KV heads, MLP rows and vocabulary rows."""

    rank: int
    size: int  # tensor_parallel_size
    q_heads: Span
    kv_heads: Span
    mlp: Span
    vocab: Span


def even_spans(total: int, parts: int) -> list[Span]:
    """`total` split into `parts` contiguous spans, sizes differing by at most one, larger first."""
    base, extra = divmod(total, parts)
    spans, start = [], 0
    for index in range(parts):
        size = base + (index < extra)
        spans.append(Span(start, start + size))
        start += size
    return spans


def _attention_spans(num_heads: int, num_kv: int, tp: int) -> list[tuple[Span, Span]]:
    group = num_heads // num_kv  # query heads per KV head
    if tp <= num_kv:
        return [(kv.scaled(group), kv) for kv in even_spans(num_kv, tp)]
    ranks_per_kv = tp // num_kv
    spans = []
    for kv in range(num_kv):
        for q in even_spans(group, ranks_per_kv):
            spans.append((Span(kv * group + q.start, kv * group + q.stop), Span(kv, kv + 1)))
    return spans


def valid_sizes(num_heads: int, num_kv: int, intermediate: int, limit: int = 16) -> list[int]:
    return [tp for tp in range(1, limit + 1) if _problem(num_heads, num_kv, intermediate, tp) is None]


def _problem(num_heads: int, num_kv: int, intermediate: int, tp: int) -> str | None:
    if intermediate % tp:
        return f"its {intermediate} MLP rows do not split evenly"
    if tp > num_kv and (tp % num_kv or (num_heads // num_kv) < tp // num_kv):
        return f"its {num_kv} KV heads cannot be replicated evenly over {tp} ranks"
    return None


def rank_shards(config, tp: int) -> list[RankShard]:
    """Each rank's share of a Hugging Face config's model; LayoutError naming the sizes that work."""
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    intermediate = config.intermediate_size
    if tp < 1:
        raise LayoutError(f"tensor_parallel_size must be at least 1, got {tp}")
    if (problem := _problem(num_heads, num_kv, intermediate, tp)) is not None:
        sizes = ", ".join(map(str, valid_sizes(num_heads, num_kv, intermediate)))
        raise LayoutError(f"tensor_parallel_size {tp}: {problem} ({num_heads} query heads, {num_kv} KV heads, "
                          f"{intermediate} MLP rows); sizes that work: {sizes}")
    attention = _attention_spans(num_heads, num_kv, tp)
    mlp, vocab = even_spans(intermediate, tp), even_spans(config.vocab_size, tp)
    return [RankShard(rank, tp, q, kv, mlp[rank], vocab[rank]) for rank, (q, kv) in enumerate(attention)]


def single_rank(config) -> RankShard:
    """The whole model as one rank holds it (tp=1)."""
    return rank_shards(config, 1)[0]
