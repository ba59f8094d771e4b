"""Drop-in spectral normalization: ``spectral_norm()``, the ``SN*`` layers, and
``SpectralNormGroup``, which batches every spectral-norm layer of a model into one
kernel call per forward and one per backward.

``spectral_norm`` registers a parametrization exactly like
``torch.nn.utils.parametrizations.spectral_norm`` (same arguments, same buffers
``_u``/``_v``, same state_dict keys, same initialisation and update order), with the
work done by :func:`lipkernels.ops.spectral_normalize`. Checkpoints move both ways
between the two, and legacy ``torch.nn.utils.spectral_norm`` checkpoints
(``weight_orig``, ``weight_u``, ``weight_v``) load too.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import ops
from ..ops.spectral_norm import spectral_normalize_unchecked


class _SpectralNorm(nn.Module):
    """The parametrization ``weight -> weight / sigma(weight)``; state as torch's."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0,
                 eps: float = 1e-12) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError("Dimension out of range (expected to be in range of "
                             f"[-{ndim}, {ndim - 1}] but got {dim})")
        if not isinstance(n_power_iterations, int) or n_power_iterations <= 0:
            raise ValueError("Expected n_power_iterations to be positive, but "
                             f"got n_power_iterations={n_power_iterations}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"spectral_norm: eps must be a number > 0, got {eps!r}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = float(eps)
        # Set by SpectralNormGroup for the duration of one model forward.
        self._group_result: Optional[torch.Tensor] = None
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = self._matrix(weight)
            h, w = weight_mat.size(0), weight_mat[0].numel()
            # Same random draws as torch, so a seeded model starts from the same u, v.
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            ops.power_iteration([weight_mat.detach()], [self._u], [self._v], 15, self.eps)

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with the normalized dim first (flattened to (m, k) by the op)."""
        return weight if self.dim == 0 else weight.movedim(self.dim, 0)

    def _restore(self, w_sn: torch.Tensor) -> torch.Tensor:
        return w_sn if self.dim == 0 else w_sn.movedim(0, self.dim)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        if self._group_result is not None:
            return self._group_result
        (w_sn,) = spectral_normalize_unchecked([self._matrix(weight)], [self._u], [self._v],
                                               self.n_power_iterations, self.eps, self.training)
        return self._restore(w_sn)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value


def _load_legacy_spectral_norm(name: str):
    """A load_state_dict pre-hook mapping ``torch.nn.utils.spectral_norm`` keys
    (``{name}_orig``, ``{name}_u``, ``{name}_v``) onto the parametrization's."""

    def hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
             error_msgs):
        legacy = prefix + name + "_orig"
        if legacy not in state_dict:
            return
        base = f"{prefix}parametrizations.{name}."
        state_dict[base + "original"] = state_dict.pop(legacy)
        for suffix, buffer in (("_u", "_u"), ("_v", "_v")):
            key = prefix + name + suffix
            if key in state_dict:
                state_dict[base + "0." + buffer] = state_dict.pop(key)

    return hook


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = 1e-12, dim: Optional[int] = None) -> nn.Module:
    """Apply spectral normalization to ``module.<name>``; a drop-in replacement for
    ``torch.nn.utils.parametrizations.spectral_norm`` (same signature, semantics and
    state_dict keys).

    Args:
        module: the layer.
        name: the parameter to normalize.
        n_power_iterations: power iterations per training-mode access.
        eps: > 0, floor of the norms.
        dim: the output dim, default 0 (1 for transposed convolutions).
    Returns:
        ``module``, with the parametrization registered.

    Complex weights are normalized as torch does (conjugate transpose; computed by the
    ``reference`` backend, see :mod:`lipkernels.ops.spectral_norm`). Under
    ``torch.autocast`` the normalization runs in the weight's dtype.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    parametrize.register_parametrization(module, name,
                                         _SpectralNorm(weight, n_power_iterations, dim, eps))
    module._register_load_state_dict_pre_hook(_load_legacy_spectral_norm(name))
    return module


def _spectral_norm_parametrizations(model: nn.Module) -> List[Tuple[nn.Module, str, _SpectralNorm]]:
    found = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            if len(plist) and isinstance(plist[0], _SpectralNorm) and plist.original.ndim > 1:
                found.append((module, tensor_name, plist[0]))
    return found


class SpectralNormGroup:
    """Model-wide spectral normalization in one batched call.

    ``SpectralNormGroup(model)`` finds every layer normalized by
    :func:`lipkernels.spectral_norm` (as the first parametrization of its weight) and
    hooks ``model``'s forward: at the start of each forward, one call of
    :func:`lipkernels.ops.spectral_normalize` runs the power iteration and computes
    ``W_sn`` of all layers (one call per (training flag, device, dtype, settings)
    combination, normally exactly one), and the backward of all of them is one call
    too. The numbers are those of per-layer mode, provided each layer's weight is used
    once per forward (per-layer mode would iterate again on a second use; here the
    second use sees the same ``W_sn``). Outside ``model``'s forward, layers work per
    layer as usual. The state_dict is not changed.

    ``remove()`` (or leaving a ``with`` block) takes the hooks off.
    """

    #: The attribute of ``model`` holding its group (found by the JVP steps, which run
    #: the model twice with its weights normalized once: lipkernels/nn/_jvp.py).
    ATTRIBUTE = "_lipkernels_sn_group"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SpectralNormGroup: model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        #: While True the forward hook does nothing (the weights are already normalized,
        #: and cached by torch.nn.utils.parametrize.cached()).
        self._held = False
        self.layers = _spectral_norm_parametrizations(model)
        if not self.layers:
            raise ValueError("SpectralNormGroup: the model has no layer normalized by "
                             "lipkernels.spectral_norm (torch's own spectral_norm layers are "
                             "not batched; re-create them with lipkernels.spectral_norm)")
        self._lists = [(layer.parametrizations[name], sn) for layer, name, sn in self.layers]
        self._handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]
        model.__dict__[self.ATTRIBUTE] = self

    def _before_forward(self, module, args) -> None:
        if self._held:
            return
        groups: Dict[tuple, list] = {}
        for plist, sn in self._lists:
            original = plist.original
            key = (sn.training, original.device, original.dtype, sn.n_power_iterations, sn.eps)
            entry = groups.get(key)
            if entry is None:
                entry = groups[key] = ([], [], [], [])
            entry[0].append(sn._matrix(original))
            entry[1].append(sn._u)
            entry[2].append(sn._v)
            entry[3].append(sn)
        for (training, _, _, n_iter, eps), (weights, us, vs, sns) in groups.items():
            results = spectral_normalize_unchecked(weights, us, vs, n_iter, eps, training)
            for sn, w_sn in zip(sns, results):
                # Plain attribute, set without nn.Module.__setattr__'s bookkeeping.
                sn.__dict__["_group_result"] = sn._restore(w_sn)

    def _after_forward(self, module, args, output) -> None:
        if self._held:
            return
        for _, sn in self._lists:
            sn.__dict__["_group_result"] = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._held = False
        self._after_forward(None, None, None)
        if self.model.__dict__.get(self.ATTRIBUTE) is self:
            del self.model.__dict__[self.ATTRIBUTE]

    def __enter__(self) -> "SpectralNormGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _sn_layer(base: type, doc_name: str) -> type:
    def __init__(self, *args, n_power_iterations: int = 1, eps: float = 1e-12, **kwargs):
        base.__init__(self, *args, **kwargs)
        spectral_norm(self, n_power_iterations=n_power_iterations, eps=eps)

    return type("SN" + base.__name__, (base,), {
        "__init__": __init__,
        "__doc__": (f"``torch.nn.{doc_name}`` with its weight spectrally normalized by "
                    f":func:`lipkernels.spectral_norm`. Takes {doc_name}'s arguments plus "
                    "``n_power_iterations`` and ``eps``."),
        "__module__": __name__,
    })


SNLinear = _sn_layer(nn.Linear, "Linear")
SNConv1d = _sn_layer(nn.Conv1d, "Conv1d")
SNConv2d = _sn_layer(nn.Conv2d, "Conv2d")
SNConv3d = _sn_layer(nn.Conv3d, "Conv3d")
SNConvTranspose1d = _sn_layer(nn.ConvTranspose1d, "ConvTranspose1d")
SNConvTranspose2d = _sn_layer(nn.ConvTranspose2d, "ConvTranspose2d")
SNConvTranspose3d = _sn_layer(nn.ConvTranspose3d, "ConvTranspose3d")
SNEmbedding = _sn_layer(nn.Embedding, "Embedding")
