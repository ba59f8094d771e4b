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

Both give a list of :class:`KernelCall`, with three views of the traffic:

* requested: the bytes every lane (or every masked-in element) asked for;
* coalescing: per warp-wide access (per ``tl.load``), the distinct bytes used over the
  bytes of the 32-byte sectors touched;
* the DRAM model: every block (program) fetches each sector it touches once, its own
  re-reads served by the caches, nothing shared between blocks; stores likewise.
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
    load_unique_bytes: int = 0
    load_sectors: int = 0
    store_requests: int = 0
    store_sectors: int = 0
    dram_load_bytes: int = 0
    dram_store_bytes: int = 0
    dram_scratch_bytes: int = 0   # of the DRAM bytes, those of workspace buffers (CUDA only)
    error: int = 0

    @property
    def is_memset(self) -> bool:
        return self.name == "cudaMemsetAsync"

    @property
    def dram_bytes(self) -> int:
        """Traffic by the DRAM model (see the module's docstring)."""
        return self.dram_load_bytes + self.dram_store_bytes

    @property
    def load_efficiency(self) -> float:
        """The distinct bytes the loads used over the bytes of the sectors they touched, per
        warp-wide access (1: every fetched byte is used)."""
        fetched = 32 * self.load_sectors
        return self.load_unique_bytes / fetched if fetched else 1.0


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
                                        **{k: v for k, v in r.items() if k not in ("name", "grid", "block")}))


@contextlib.contextmanager
def _record_triton() -> Iterator[Record]:
    if not triton_interpreted():
        raise RuntimeError("counting Triton launches needs the interpreter (TRITON_INTERPRET=1 set before "
                           "lipkernels is imported)")
    import numpy as np
    from triton.runtime import interpreter

    rec = Record("triton")
    current: List[KernelCall] = []
    program = {"loads": set(), "stores": set()}  # the sectors of the running program
    builder = interpreter.InterpreterBuilder
    orig_run = interpreter.InterpretedFunction.run
    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store
    orig_grid_idx = builder.set_grid_idx

    def end_program():
        if current:
            current[-1].dram_load_bytes += 32 * len(program["loads"])
            current[-1].dram_store_bytes += 32 * len(program["stores"])
        program["loads"].clear()
        program["stores"].clear()

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
            end_program()
            current.pop()
            rec.calls.append(call)

    def set_grid_idx(self, x, y, z):
        end_program()  # the interpreter runs the programs one after the other
        return orig_grid_idx(self, x, y, z)

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
        sectors = np.unique(np.concatenate([addr // 32, (addr + size - 1) // 32]))
        if store:
            call.store_bytes += int(addr.size) * size
            call.store_requests += 1
            call.store_sectors += int(sectors.size)
            program["stores"].update(sectors.tolist())
        else:
            call.load_bytes += int(addr.size) * size
            call.load_unique_bytes += int(np.unique(addr).size) * size
            call.load_requests += 1
            call.load_sectors += int(sectors.size)
            program["loads"].update(sectors.tolist())

    # The arguments after the mask differ between Triton versions (3.6: cache_modifier,
    # eviction_policy; 3.9: cache_policy): passed through as they come.
    def masked_load(self, ptrs, mask, *rest):
        account(ptrs, mask, False)
        return orig_load(self, ptrs, mask, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        account(ptrs, mask, True)
        return orig_store(self, ptrs, value, mask, *rest)

    interpreter.InterpretedFunction.run = run
    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.set_grid_idx = set_grid_idx
    try:
        yield rec
    finally:
        interpreter.InterpretedFunction.run = orig_run
        builder.create_masked_load = orig_load
        builder.create_masked_store = orig_store
        builder.set_grid_idx = orig_grid_idx
