"""What a tensor-parallel rank does to its model once the weights are in."""
from __future__ import annotations

from torch import nn

ROW_PARALLEL = ("o_proj", "down_proj")  # their outputs are partial sums, all-reduced by the model


def finish_row_parallel(model: nn.Module) -> None:
    """Row-parallel layers' bias counted once (rank 0 keeps it, the others zero theirs), and W8A8 layers
    quantizing their inputs per token with the scale of the whole row: the max over ranks."""
    shard, group = model.shard, model.group
    if shard.size == 1:
        return
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in ROW_PARALLEL:
            continue
        if shard.rank != 0 and getattr(module, "bias", None) is not None:
            module.bias.data.zero_()
        if hasattr(module, "amax_reduce"):
            module.amax_reduce = group.all_reduce_max_
