"""Wrap a loaded model's targeted linear layers, in place, with :class:`MultiLoraLinear`."""

from __future__ import annotations

from torch import nn

from vajra.gpu.lora.layer import LoraBatchState, MultiLoraLinear


def inject_lora(model: nn.Module, state: LoraBatchState) -> list[str]:
    """Replace every module of ``state.pool.layout`` in ``model`` by a multi-LoRA wrapper.

    The base layers are kept as they are (frozen weights, same device and dtype), each as its
    wrapper's ``base_layer``. Returns the wrapped module paths. Raises ``ValueError`` if the
    model lacks a module of the layout or it is not an ``nn.Linear`` (nothing is changed then);
    wrapping a model twice is refused too.
    """
    layout = state.pool.layout
    found: list[tuple[nn.Module, str, nn.Linear, int]] = []
    for index, path in enumerate(layout.modules):
        parent, name = _parent(model, path)
        child = getattr(parent, name, None)
        if isinstance(child, MultiLoraLinear):
            raise ValueError(f"{path} is already wrapped")
        if not isinstance(child, nn.Linear):
            raise ValueError(f"{path} is not an nn.Linear in this model")
        if (child.in_features, child.out_features) != layout.shapes[index]:
            raise ValueError(f"{path}: shape differs from the pool layout")
        found.append((parent, name, child, index))
    for parent, name, child, index in found:
        setattr(parent, name, MultiLoraLinear(child, state, index))
    return list(layout.modules)


def remove_lora(model: nn.Module) -> list[str]:
    """Undo :func:`inject_lora`: put every wrapper's ``base_layer`` back; return their paths."""
    wrapped = [(path, m) for path, m in model.named_modules() if isinstance(m, MultiLoraLinear)]
    for path, module in wrapped:
        parent, name = _parent(model, path)
        setattr(parent, name, module.base_layer)
    return [path for path, _ in wrapped]


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name
