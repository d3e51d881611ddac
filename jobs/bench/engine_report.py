"""The engine benchmark's numbers: medians over the rounds, ratios to the peers, and how close each
run came to this machine's limits."""
from __future__ import annotations

import statistics


def add_limits(rows: list[dict], num_params: int, weight_bytes: int, gflops: float, gbps: float) -> None:
    """How close each run came to this machine's compute limit, and batch-1 decode to its bandwidth."""
    for row in rows:
        if row["scenario"] == "shared prefix":
            continue  # cached prompt tokens are not computed: no meaningful FLOP count
        flops = 2 * num_params * (row["prompt_tokens"] + row["output_tokens"])
        row["compute_fraction"] = flops / row["seconds"] / (gflops * 1e9)
        if row["decode_tokens_per_s"] and row["concurrency"] == 1:  # one token per full read of the weights
            row["bandwidth_fraction"] = weight_bytes * row["decode_tokens_per_s"] / (gbps * 1e9)


MEASURES = ["seconds", "tokens_per_s", "mean_ttft_s", "decode_tokens_per_s"]


def medians(rows: list[dict]) -> list[dict]:
    """One row per (engine, scenario): the median of each measure over its rounds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["engine"], row["scenario"]), []).append(row)
    summary = []
    for group in groups.values():
        row = {**group[0], "rounds": len(group)}
        for measure in MEASURES:
            values = [r[measure] for r in group if r[measure] is not None]
            row[measure] = statistics.median(values) if values else None
        summary.append(row)
    return summary


def ratio(rows: list[dict], ours: tuple[str, str], peer: tuple[str, str], measure: str,
          invert: bool = False) -> float | None:
    """ours ÷ peer (peer ÷ ours if `invert`), each an (engine, scenario): the median of the rounds'
    ratios where both took turns, else the ratio of the two medians (a peer measured once)."""
    def by_round(engine_and_scenario):
        return {r["round"]: r[measure] for r in rows
                if (r["engine"], r["scenario"]) == engine_and_scenario and r[measure]}

    mine, theirs = by_round(ours), by_round(peer)
    if not mine or not theirs:
        return None
    pairs = [(mine[t], theirs[t]) for t in mine.keys() & theirs.keys()] if len(theirs) > 1 else \
        [(statistics.median(mine.values()), statistics.median(theirs.values()))]
    return statistics.median(b / a if invert else a / b for a, b in pairs)


def ratios(rows: list[dict], concurrency: list[int]) -> list[dict]:
    one_at_a_time = ("hf-generate-1-at-a-time", "1 at a time")
    wanted = []  # (measure's title, ours, peer, measure, invert)
    for n in concurrency:
        ours = ("rayfoundry", f"{n} concurrent")
        for peer in ("vllm-cpu", "hf-generate-padded-batch", "hf-generate_batch"):
            wanted.append(("output tokens/s, ours ÷ peer", ours, (peer, ours[1]), "tokens_per_s", False))
        wanted.append(("output tokens/s, ours ÷ peer", ours, one_at_a_time, "tokens_per_s", False))
        wanted.append(("mean TTFT, peer ÷ ours", ours, ("vllm-cpu", ours[1]), "mean_ttft_s", True))
    for peer in (("vllm-cpu", "batch 1"), one_at_a_time):
        wanted.append(("batch-1 decode tokens/s, ours ÷ peer", ("rayfoundry", "batch 1"), peer,
                       "decode_tokens_per_s", False))
    wanted.append(("mean TTFT, caching off ÷ on", ("rayfoundry prefix-cache on", "shared prefix"),
                   ("rayfoundry prefix-cache off", "shared prefix"), "mean_ttft_s", True))
    out = []
    for what, ours, peer, measure, invert in wanted:
        value = ratio(rows, ours, peer, measure, invert)
        if value is not None:
            out.append({"scenario": ours[1], "measure": what, "peer": peer[0], "ratio": value})
    return out


COLUMNS = ["engine", "scenario", "requests", "rounds", "output_tokens", "seconds", "tokens_per_s", "mean_ttft_s",
           "decode_tokens_per_s", "compute_fraction", "bandwidth_fraction", "note"]
