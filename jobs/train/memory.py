"""What a rank holds for training: bytes of its parameter and optimizer-state tensors.

Under ZeRO-3 a parameter's own tensor is empty outside a forward; the rank's slice lives in
`ds_tensor`. ZeRO-1/2/3 wrap torch's optimizer, whose parameter groups then hold the rank's fp32
partitions (master weights) and whose state holds Adam's moments for them, except that ZeRO-3 lends
its masters to torch's groups only during a step, so they are read from the wrapper itself. Each
storage counts once: a tensor that is both a parameter and a master (fp32 training, where ZeRO-3's
master is its parameter partition) is not counted twice.
"""
from __future__ import annotations

import torch


class _Storages:
    def __init__(self):
        self.seen: set[int] = set()

    def bytes_of(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return 0
        self.seen.add(storage.data_ptr())
        return storage.nbytes()


def held_bytes(engine) -> dict[str, int]:
    storages = _Storages()
    params = sum(storages.bytes_of(getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None
                                   else p) for p in engine.module.parameters())
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # torch's, inside ZeRO's wrapper
    lent = getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3's masters
    masters = sum(storages.bytes_of(p) for p in [*lent, *(p for group in optimizer.param_groups
                                                            for p in group["params"])])
    moments = sum(storages.bytes_of(v) for state in optimizer.state.values() for v in state.values()
                  if isinstance(v, torch.Tensor))
    return {"param_bytes": params, "optimizer_bytes": masters + moments}
