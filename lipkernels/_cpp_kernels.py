"""The compiled extension's kernel object: the ``cpu`` and ``cuda`` rows of
:data:`lipkernels.backends.TABLE` reach the C++/CUDA kernels through it.

One object per operator namespace (``torch.ops.lipkernels``; in an emulation build also
``torch.ops.lipkernels_cuda_emu``, the CUDA kernels for CPU tensors), holding

* the public ops of :data:`lipkernels.backends.OPS` as attributes: the namespace's own
  operators (their autograd written in C++, csrc/ops.cpp), which the ops' plain path
  calls directly, so a call costs what ``torch.ops.lipkernels.sample_norm(g)`` does;
* the raw kernel entry points (``_norm_epilogue``, ``_norm_epilogue_backward``,
  ``_sn_forward``, ``_sn_backward``: no autograd of their own) behind the interface every
  backend's kernel object shares (``norm_epilogue``, ``norm_epilogue_backward``,
  ``sn_forward``, ``sn_backward``), for callers that differentiate by other means (the
  torch.func rules of lipkernels/ops/_func.py, the JVP steps of lipkernels/nn).

The ``cpu`` and ``cuda`` backends share the object of ``torch.ops.lipkernels``: its
dispatcher picks the kernel by the tensors' device.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch


class CppKernels:
    """The kernel object of one compiled operator namespace."""

    def __init__(self, namespace: str, public: Sequence[str]) -> None:
        self.namespace = namespace
        self.ns = getattr(torch.ops, namespace)
        for name in public:  # the ones the namespace has (clip_ may be missing)
            op = getattr(self.ns, name, None)
            if op is not None:
                setattr(self, name, op)

    def __repr__(self) -> str:
        return f"<lipkernels kernels of torch.ops.{self.namespace}>"

    def norm_epilogue(self, g, f, epilogue, param):
        return self.ns._norm_epilogue(g, f, epilogue, param)

    def norm_epilogue_backward(self, go, g, f, norm, epilogue, param):
        return self.ns._norm_epilogue_backward(go, g, f, norm, epilogue, param)

    def sn_forward(self, ws, us, vs, iters, eps):
        w_sn, sigmas, uv = self.ns._sn_forward(ws, us, vs, iters, eps)
        return list(w_sn), sigmas, uv

    def sn_backward(self, grads, ws, uv, sigmas, eps):
        return list(self.ns._sn_backward(grads, ws, uv, sigmas, eps))


_objects: Dict[str, CppKernels] = {}


def kernels(namespace: str, public: Sequence[str]) -> CppKernels:
    """The kernel object of ``torch.ops.<namespace>``, with the public ops named in
    ``public`` (lipkernels.backends.OPS): one per namespace and process; the extension
    must be loaded."""
    found = _objects.get(namespace)
    if found is None:
        # setdefault: threads making it at once all get the one that is kept.
        found = _objects.setdefault(namespace, CppKernels(namespace, public))
    return found
