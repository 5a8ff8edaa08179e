"""Worker-to-worker sample transfer over torch.distributed point-to-point calls (gloo on CPU,
NCCL on GPU). Both sides know the metadata, so the receiver allocates exact buffers; keys go in
sorted order, one tensor each."""

from __future__ import annotations

import torch
import torch.distributed as dist

from realflow.api.data import SequenceSample

# gloo has no bool type: bools travel as uint8.
_WIRE = {torch.bool: torch.uint8}


def send_sample(sample: SequenceSample, dst: int) -> None:
    assert sample.data is not None
    for key in sorted(sample.keys):
        t = sample.data[key]
        if t.numel():
            dist.send(t.to(_WIRE.get(t.dtype, t.dtype)).contiguous(), dst)


def recv_sample(meta: SequenceSample, src: int) -> SequenceSample:
    data = {}
    for key in sorted(meta.keys):
        dtype = meta.dtypes[key]
        shape = (meta.total_tokens(key), *meta.trailing_shapes.get(key, ()))
        buf = torch.empty(shape, dtype=_WIRE.get(dtype, dtype))
        if buf.numel():
            dist.recv(buf, src)
        data[key] = buf.to(dtype)
    out = meta.meta()
    out.data = data
    out.validate()
    return out
