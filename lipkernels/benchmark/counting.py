"""What the GPU backends' kernels do, counted without a GPU: the kernel launches of a call,
and the global-memory traffic of each launch (bytes loaded and stored, and the 32-byte
sectors its loads touch).

* ``cuda``: the emulation build of the CUDA kernels (``LIPKERNELS_CUDA_EMULATION``;
  ``csrc/cuda/emulation/counters.h``) records every launch and memset; its
  traffic-counting variant (``build/emu``, or ``LIPKERNELS_CUDA_EMULATION=1 pip install``)
  also counts every load and store of device memory made by the kernels' lanes. A
  warp-wide access is the k-th execution of one load instruction by the lanes of a warp;
  its sectors are the distinct 32-byte segments those lanes touch.
* ``triton``: under the interpreter (``TRITON_INTERPRET=1``) every kernel launch, and
  every ``tl.load`` / ``tl.store`` of a program, with its mask: bytes are the masked-in
  elements' bytes, sectors the distinct 32-byte segments of one ``tl.load`` of one
  program (on a GPU that load is spread over the program's warps; for the contiguous
  blocks these kernels load, the fraction of fetched bytes used is the same).

Both give a list of :class:`KernelCall`.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Iterator, List

import torch


@dataclass
class KernelCall:
    """One launch (or memset) of a GPU backend."""
    name: str
    grid: tuple = (1, 1, 1)
    block: tuple = (1, 1, 1)
    dynamic_smem: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    load_requests: int = 0
    load_sectors: int = 0
    store_requests: int = 0
    store_sectors: int = 0
    error: int = 0

    @property
    def is_memset(self) -> bool:
        return self.name == "cudaMemsetAsync"

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    @property
    def load_efficiency(self) -> float:
        """Bytes the loads asked for over the bytes of the sectors they touched (1: every
        fetched byte is used)."""
        fetched = 32 * self.load_sectors
        return self.load_bytes / fetched if fetched else 1.0


@dataclass
class Record:
    """The calls made inside a :func:`record` block (filled when the block exits)."""
    backend: str
    calls: List[KernelCall] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return len(self.calls)

    def names(self) -> List[str]:
        return [c.name for c in self.calls]

    def total(self, attr: str) -> int:
        return sum(getattr(c, attr) for c in self.calls)


def cuda_emulated() -> bool:
    from .. import _extension
    return _extension.cuda_emulated()


def cuda_traffic_counted() -> bool:
    return cuda_emulated() and bool(json.loads(torch.ops.lipkernels_cuda_emu._emu_info())["traffic_counted"])


def triton_interpreted() -> bool:
    from .. import triton as triton_backend
    return triton_backend.interpreting()


@contextlib.contextmanager
def record(backend: str) -> Iterator[Record]:
    """Record the kernel calls of the block, for backend ``cuda`` (emulation build) or
    ``triton`` (interpreter)."""
    if backend == "cuda":
        with _record_cuda() as rec:
            yield rec
    elif backend == "triton":
        with _record_triton() as rec:
            yield rec
    else:
        raise ValueError(f"record: backend must be 'cuda' or 'triton', got {backend!r}")


@contextlib.contextmanager
def _record_cuda() -> Iterator[Record]:
    if not cuda_emulated():
        raise RuntimeError("counting CUDA launches needs the emulation build of the CUDA kernels "
                           "(LIPKERNELS_CUDA_EMULATION; e.g. LIPKERNELS_LIBRARY=build/emu/liblipkernels.so)")
    emu = torch.ops.lipkernels_cuda_emu
    rec = Record("cuda")
    emu._emu_take_records()  # drop anything earlier
    emu._emu_set_recording(True)
    try:
        yield rec
    finally:
        emu._emu_set_recording(False)
        for r in json.loads(emu._emu_take_records()):
            rec.calls.append(KernelCall(name=r["name"], grid=tuple(r["grid"]), block=tuple(r["block"]),
                                        dynamic_smem=r["dynamic_smem"], load_bytes=r["load_bytes"],
                                        store_bytes=r["store_bytes"], load_requests=r["load_requests"],
                                        load_sectors=r["load_sectors"], store_requests=r["store_requests"],
                                        store_sectors=r["store_sectors"], error=r["error"]))


@contextlib.contextmanager
def _record_triton() -> Iterator[Record]:
    if not triton_interpreted():
        raise RuntimeError("counting Triton launches needs the interpreter (TRITON_INTERPRET=1 set before "
                           "lipkernels is imported)")
    import numpy as np
    from triton.runtime import interpreter

    rec = Record("triton")
    current: List[KernelCall] = []
    builder = interpreter.InterpreterBuilder
    orig_run = interpreter.InterpretedFunction.run
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        call = KernelCall(name=self.__name__)
        g = grid(kwargs) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(tuple(g)))
        call.grid = g
        current.append(call)
        try:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            current.pop()
            rec.calls.append(call)

    def account(ptrs, mask, store: bool):
        if not current:
            return
        call = current[-1]
        addr = np.asarray(ptrs.data).astype(np.uint64).ravel()
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.asarray(ptrs.data).shape).ravel()
        addr = addr[m]
        if addr.size == 0:
            return
        size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        sectors = int(np.unique(np.concatenate([addr // 32, (addr + size - 1) // 32])).size)
        if store:
            call.store_bytes += int(addr.size) * size
            call.store_requests += 1
            call.store_sectors += sectors
        else:
            call.load_bytes += int(addr.size) * size
            call.load_requests += 1
            call.load_sectors += sectors

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        account(ptrs, mask, False)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        account(ptrs, mask, True)
        return orig_store(self, ptrs, value, mask, cache_policy)

    interpreter.InterpretedFunction.run = run
    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    try:
        yield rec
    finally:
        interpreter.InterpretedFunction.run = orig_run
        builder.create_masked_load = orig_load
        builder.create_masked_store = orig_store
