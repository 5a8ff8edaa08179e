"""Worker-to-worker sample transfer over torch.distributed point-to-point calls. Both sides know
the metadata, so the receiver allocates exact buffers; keys go in sorted order, one tensor each.

Tensors travel on the worker's `device`: over gloo between CPU workers, over NCCL between GPU
workers (the group maps CUDA tensors to NCCL, see devices.process_group_backend). Workers keep
samples on the CPU (the data worker's batches and every call's outputs live there; interfaces
move each micro-batch to their device), so a GPU receiver hands its buffers back to the CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from realflow.api.data import SequenceSample

# gloo has no bool type: bools travel as uint8.
_WIRE = {torch.bool: torch.uint8}


def send_sample(sample: SequenceSample, dst: int, device: str = "cpu") -> None:
    assert sample.data is not None
    for key in sorted(sample.keys):
        t = sample.data[key]
        if t.numel():
            dist.send(t.to(device=device, dtype=_WIRE.get(t.dtype, t.dtype)).contiguous(), dst)


def recv_sample(meta: SequenceSample, src: int, device: str = "cpu") -> SequenceSample:
    data = {}
    for key in sorted(meta.keys):
        dtype = meta.dtypes[key]
        shape = (meta.total_tokens(key), *meta.trailing_shapes.get(key, ()))
        buf = torch.empty(shape, dtype=_WIRE.get(dtype, dtype), device=device)
        if buf.numel():
            dist.recv(buf, src)
        data[key] = buf.to(device="cpu", dtype=dtype)
    out = meta.meta()
    out.data = data
    out.validate()
    return out
