"""MiniLoader: build a layer skeleton without parameter init, then materialize it from bytes.

Parameters are created on the ``meta`` device (the checkpoint overwrites them anyway) while
buffers stay real, because non-persistent buffers (rotary ``inv_freq``, position ids) are not
in checkpoints and must keep the values ``__init__`` computed.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from protocols.errors import WeightMismatch
from protocols.manifest import TensorEntry

from cicada_async.engine.patches import ScopedPatch
from cicada_async.engine.tensorbytes import CONVERTIBLE

if TYPE_CHECKING:
    from cicada_async.engine.modeldir import ModelSpec


def _skeleton_targets() -> list[tuple[object, str]]:
    targets: list[tuple[object, str]] = [(nn.Module, "register_parameter")]
    # Init functions on meta tensors still cost ~3 ms each as Python dispatch: skip them.
    for mod in (nn.init, sys.modules.get("transformers.initialization")):
        if mod is not None:
            targets += [(mod, n) for n in dir(mod) if n.endswith("_") and not n.startswith("_")]
    targets += [(torch.Tensor, n) for n in ("normal_", "uniform_", "zero_", "fill_")]
    return targets


def _skeleton_replacement(attr: str) -> Callable[..., object]:
    if attr == "register_parameter":
        def register_parameter(orig: Callable[..., None], module: nn.Module, name: str,
                               param: nn.Parameter | None) -> None:
            orig(module, name, param)
            if param is not None and not param.is_meta:
                p = module._parameters[name]
                assert p is not None
                module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

        return register_parameter

    def init(orig: Callable[..., object], tensor: object, *args: object, **kwargs: object) -> object:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return orig(tensor, *args, **kwargs)

    return init


_SKELETON = ScopedPatch("skeleton", _skeleton_targets, _skeleton_replacement)


def skeleton_mode() -> contextlib.AbstractContextManager[None]:
    """Inside, new parameters land on ``meta`` and init functions skip meta tensors.

    Only on the calling thread: a model built or initialized on another thread meanwhile gets
    real parameters and real init.
    """
    return _SKELETON.active()


@dataclass
class Slot:
    """One checkpoint-backed tensor of the model: a parameter (maybe tied) or a buffer."""

    names: list[str]  # every qualified name that refers to it (tied parameters share a slot)
    owners: list[tuple[nn.Module, str]]  # (module, attribute) pairs holding it
    shape: tuple[int, ...]
    is_param: bool
    source: str | None = None  # the checkpoint name it is read from
    requires_grad: bool = False
    dtype: torch.dtype | None = None  # the skeleton's dtype for it: what a conversion aims at


@dataclass
class SkeletonIndex:
    """Which checkpoint tensor fills which slot, validated against the checkpoint's tensors."""

    slots: dict[str, Slot]  # by source (checkpoint) name
    module_slots: dict[str, list[str]] = field(default_factory=dict)  # module -> source names


def _match(order: list[Slot], tensors: dict[str, TensorEntry], rename: Callable[[str], str] | None,
           ) -> tuple[dict[str, Slot], list[str], list[str], list[str]]:
    """Slots by checkpoint name, and the missing, unexpected and mis-shaped names."""
    by_model_name = {rename(n): n for n in tensors} if rename else {n: n for n in tensors}
    missing: list[str] = []
    shapes: list[str] = []
    used: set[str] = set()
    slots: dict[str, Slot] = {}
    for slot in order:
        # transformers drops tied duplicates when saving: any one of the names will do.
        found = [by_model_name[n] for n in slot.names if n in by_model_name]
        if not found:
            missing.append(slot.names[0])
            continue
        slot.source = found[0]
        used.update(found)
        entry = tensors[slot.source]
        if entry.shape != slot.shape:
            shapes.append(f"{slot.source} (checkpoint {list(entry.shape)}, model {list(slot.shape)})")
        slots[slot.source] = slot
    return slots, missing, sorted(set(tensors) - used), shapes


def index_skeleton(
    model: nn.Module,
    tensors: dict[str, TensorEntry],
    rename: Callable[[str], str] | None = None,
    *,
    renamer: Callable[[], Callable[[str], str] | None] | None = None,
) -> SkeletonIndex:
    """Match the skeleton's parameters and persistent buffers to checkpoint tensors.

    ``rename`` maps a checkpoint name to the model's name for it (transformers renames legacy
    checkpoint keys such as ``encoder.layer.0`` to ``layers.0``). ``renamer`` makes one only
    when the names as saved do not match: building transformers' rules compiles ~1000 regular
    expressions (~130 ms, on a fresh process's critical path), and a checkpoint saved by the
    same class needs none.

    Raises one WeightMismatch naming every missing, unexpected and mis-shaped tensor.
    """
    by_id: dict[int, Slot] = {}
    order: list[Slot] = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for mname, module in modules.items():
        prefix = f"{mname}." if mname else ""
        for pname, p in module._parameters.items():
            if p is None:
                continue
            slot = by_id.get(id(p))
            if slot is None:
                slot = Slot([], [], tuple(p.shape), True, requires_grad=p.requires_grad, dtype=p.dtype)
                by_id[id(p)] = slot
                order.append(slot)
            if f"{prefix}{pname}" not in slot.names:
                slot.names.append(f"{prefix}{pname}")
                slot.owners.append((module, pname))
        for bname, b in module._buffers.items():
            if b is None or bname in module._non_persistent_buffers_set:
                continue
            slot = by_id.get(id(b))
            if slot is None:
                slot = Slot([], [], tuple(b.shape), False, dtype=b.dtype)
                by_id[id(b)] = slot
                order.append(slot)
            if f"{prefix}{bname}" not in slot.names:
                slot.names.append(f"{prefix}{bname}")
                slot.owners.append((module, bname))

    slots, missing, unexpected, shapes = _match(order, tensors, rename)
    if (missing or unexpected or shapes) and rename is None and renamer is not None:
        if (late := renamer()) is not None:
            slots, missing, unexpected, shapes = _match(order, tensors, late)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {_few(shapes)}")
        raise WeightMismatch("checkpoint does not match the model: " + "; ".join(parts))

    module_slots: dict[str, list[str]] = {}
    # A module registered under several names is gated under its first one, the name
    # ``named_modules()`` (deduplicated) gives it; the plan and the gates use that name.
    names_of: dict[int, str] = {}
    for n, m in modules.items():
        names_of.setdefault(id(m), n)
    for source, slot in slots.items():
        for module, _ in slot.owners:
            lst = module_slots.setdefault(names_of[id(module)], [])
            if source not in lst:
                lst.append(source)
    return SkeletonIndex(slots=slots, module_slots=module_slots)


def place_buffers(model: nn.Module, index: SkeletonIndex, device: torch.device) -> int:
    """Move the buffers the checkpoint does not fill (made in ``__init__``) to ``device``.

    Checkpoint-backed tensors land on the device when they are applied; these never are, and
    would stay on the CPU (BERT's ``position_ids``). Returns how many were moved.
    """
    backed = {(id(m), a) for slot in index.slots.values() for m, a in slot.owners}
    moved: dict[int, torch.Tensor] = {}  # one buffer shared by two modules stays one tensor
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is None or (id(module), name) in backed or b.device == device:
                continue
            if id(b) not in moved:
                moved[id(b)] = b.to(device)
            module._buffers[name] = moved[id(b)]
    return len(moved)


def _few(names: list[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return f"{shown} (+{len(names) - n} more)" if len(names) > n else shown


def materialize(slot: Slot, value: torch.Tensor) -> None:
    """Put ``value`` into every place that refers to ``slot`` (keeps ties as one tensor)."""
    if slot.is_param:
        module, attr = slot.owners[0]
        old = module._parameters[attr]
        new = nn.Parameter(value, requires_grad=slot.requires_grad and value.is_floating_point())
        if old is not None and old.is_meta:
            # swap_tensors keeps the Parameter object itself, so every alias (tied weights,
            # references held by the model's code) sees the real tensor at once.
            torch.utils.swap_tensors(old, new)  # type: ignore[no-untyped-call]
            for m, a in slot.owners[1:]:
                if m._parameters[a] is not old:
                    m._parameters[a] = old
        else:
            for m, a in slot.owners:
                m._parameters[a] = new
    else:
        for m, a in slot.owners:
            m._buffers[a] = value


def build_skeleton(spec: ModelSpec, dtype: torch.dtype | None) -> nn.Module:
    """The model with parameters on meta and real buffers, in eval mode."""
    # Buffers are made on the CPU even under another default device. The device context is a
    # Python torch-function mode under every op of __init__ (about a quarter of the build):
    # entered only when it changes something.
    on_cpu = torch.get_default_device().type == "cpu"
    with skeleton_mode(), contextlib.nullcontext() if on_cpu else torch.device("cpu"):
        model = spec.build()
    if dtype is not None:
        cast_for_serving(model, dtype)
    return model.eval()


def cast_for_serving(model: nn.Module, dtype: torch.dtype) -> None:
    """Give parameters and persistent buffers the dtype transformers' ``from_pretrained`` would.

    Plain floats become ``dtype``, except tensors under ``_keep_in_fp32_modules`` (fp16 only)
    or ``_keep_in_fp32_modules_strict`` (fp16 and bf16), which stay fp32. Integers and F8 keep
    their dtype, and so do non-persistent buffers: the checkpoint never fills them, and
    ``__init__`` chose their dtype (rotary ``inv_freq`` is fp32 on purpose).
    """
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep_re = re.compile("|".join(k.replace("*", ".*") for k in sorted(keep))) if keep else None
    done: dict[int, torch.Tensor] = {}  # by id: tied tensors stay one tensor
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for name, p in list(module._parameters.items()):
            if p is None or p.dtype not in CONVERTIBLE:
                continue
            if id(p) not in done:
                want = torch.float32 if keep_re and keep_re.search(prefix + name) else dtype
                done[id(p)] = p if p.dtype == want else nn.Parameter(p.to(want), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is None or b.dtype not in CONVERTIBLE or name in module._non_persistent_buffers_set:
                continue
            if id(b) not in done:
                want = torch.float32 if keep_re and keep_re.search(prefix + name) else dtype
                done[id(b)] = b.to(want)
            module._buffers[name] = done[id(b)]
