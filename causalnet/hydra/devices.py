"""Models that do not fit one device: accelerate's ``device_map`` under the adapter's fast patching.

A model loaded with ``device_map="auto"`` (or any explicit map) has its decoder layers spread over
GPUs, the CPU and the disk, with accelerate's hooks moving activations and, for offloaded layers,
streaming the weights in when the Hugging Face ``forward`` of a module runs. The adapters
(:mod:`causalnet.adapters`) do not run the model's ``forward``: their block methods call the
layers' sub-modules and read their weights (``o_proj.weight``, ``norm.weight``) directly. So a
dispatched model is wrapped (:func:`dispatch_adapter`) in a subclass of its family's adapter that,
around every block method:

- layer methods (``qkv``, ``head_outputs``, ``attn_output``, ``attn_and_heads``, ``mlp`` of
  layer l) run on layer l's execution device: the tensor arguments are moved there, every
  offloaded weight of the layer is loaded onto that device for the duration of the call
  (``accelerate.utils.align_module_device``) and the results are moved back to the main
  device. Parameter-free shared modules with an accelerate hook (the rotary embedding) compute
  on the layer's device during the call.
- everything else (``embed``, ``final_scale``, ``logits``, ``readout``, ``centred_logit``) runs on
  the main device, with the offloaded non-layer weights loaded there.

Activations, the clean run's caches and attention itself stay on the main device (the device of
the input embedding); only [rows, d] activations cross devices, as in accelerate's own pipeline.
The arithmetic is the adapter's own, on the same weights, so a dispatched adapter computes what the
unsplit one computes. :func:`auto_device_map` computes accelerate's ``"auto"`` map but keeps the
modules outside the decoder layers (embeddings, final norm, unembedding) on one device, which the
wrapper requires. Offloaded layers re-load their weights on every block call (up to four times per
layer and prompt), so disk offload is correct but slow; GPUs without offload are fast.

``SweepConfig(device="auto")`` (``causalnet hydra --device auto``) loads this way
(:func:`load_for_config`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import CausalNetError

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter

#: The block methods that compute with one decoder layer's weights (first argument: the layer).
LAYER_METHODS = ("qkv", "head_outputs", "attn_output", "attn_and_heads", "mlp")
#: The block methods that compute with the weights outside the decoder layers.
OUTER_METHODS = ("embed", "final_scale", "logits", "readout", "centred_logit")


def _align_hooks(module: nn.Module) -> list[Any]:
    """The accelerate ``AlignDevicesHook`` objects attached to ``module`` (none, one, or several
    inside a ``SequentialHook``)."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, SequentialHook):
        return [h for h in hook.hooks if isinstance(h, AlignDevicesHook)]
    return [hook] if isinstance(hook, AlignDevicesHook) else []


def _as_device(device: Any) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its
    own (non-meta) parameters, else None (a module without own weights and without a hook)."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return _as_device(hook.execution_device)
    for param in module.parameters(recurse=False):
        if param.device.type != "meta":
            return param.device
    return None


def _offloaded(module: nn.Module) -> bool:
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def _to(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor in it (also inside tuples and lists) moved to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    return x


class Placement:
    """Where each part of a dispatched model computes, and the contexts that put it there.

    ``main`` is the execution device of the input embedding: activations live there. ``layers[l]``
    is the execution device of decoder layer l. Raises :class:`CausalNetError` if one layer spans
    several devices or the modules outside the layers do.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        self.model = model
        self.blocks = blocks
        inside = {id(m) for block in blocks for m in block.modules()}
        self.outer = [m for m in model.modules() if id(m) not in inside]
        self.layers: list[torch.device] = []
        for layer, block in enumerate(blocks):
            devices = {d for d in map(execution_device, block.modules()) if d is not None}
            if len(devices) != 1:
                raise CausalNetError(
                    f"decoder layer {layer} computes on {sorted(map(str, devices)) or 'no device'}"
                    "; a device_map must keep each decoder layer on one device"
                )
            self.layers.append(devices.pop())
        embedding = model.get_input_embeddings()
        main = execution_device(embedding)
        if main is None:
            raise CausalNetError("cannot tell the device of the model's input embedding")
        self.main = main
        # Modules outside the layers that hold weights must compute on the main device.
        others = {
            str(execution_device(m))
            for m in self.outer
            if any(True for _ in m.parameters(recurse=False)) and execution_device(m) != main
        }
        if others:
            raise CausalNetError(
                f"the modules outside the decoder layers compute on {sorted(others)} besides "
                f"{main}; keep the embeddings, final norm and unembedding on one device (use "
                "causalnet.hydra.devices.auto_device_map)"
            )
        # Parameter-free modules with a hook (the rotary embedding), used inside layer methods:
        # their hook moves the inputs to its execution device, which must be the layer's then.
        self.shared_hooks = [
            hook
            for m in self.outer
            if not any(True for _ in m.parameters())
            for hook in _align_hooks(m)
        ]
        self._depth: dict[object, int] = {}

    @property
    def is_split(self) -> bool:
        """Whether any weights are offloaded or any layer computes off the main device."""
        offloaded = any(_offloaded(m) for m in self.model.modules())  # the layers' and the rest
        return offloaded or any(d != self.main for d in self.layers)

    @contextlib.contextmanager
    def _resident(self, key: object, modules: list[nn.Module]) -> Iterator[None]:
        """Load the offloaded weights of ``modules`` onto their execution device (re-entrant:
        a nested call for the same ``key`` finds them loaded and leaves them so)."""
        depth = self._depth.get(key, 0)
        self._depth[key] = depth + 1
        try:
            if depth > 0:
                yield
                return
            from accelerate.utils import align_module_device

            with contextlib.ExitStack() as stack:
                for module in modules:
                    if _offloaded(module):
                        stack.enter_context(align_module_device(module))
                yield
        finally:
            self._depth[key] = depth

    @contextlib.contextmanager
    def on_layer(self, layer: int) -> Iterator[torch.device]:
        """Layer ``layer``'s weights resident on its device, shared hooks retargeted there."""
        device = self.layers[layer]
        saved = [hook.execution_device for hook in self.shared_hooks]
        with self._resident(("layer", layer), list(self.blocks[layer].modules())):
            try:
                for hook in self.shared_hooks:
                    hook.execution_device = device
                yield device
            finally:
                for hook, old in zip(self.shared_hooks, saved, strict=True):
                    hook.execution_device = old

    def on_main(self) -> contextlib.AbstractContextManager[None]:
        """The weights outside the decoder layers resident on the main device."""
        return self._resident("outer", self.outer)


class DispatchedAdapter:
    """Mixin placed before a family adapter's class by :func:`dispatch_adapter` (see the module
    docstring). ``placement`` says where each part computes."""

    __slots__ = ()  # the family class provides the instance dict
    placement: Placement

    @property
    def device(self) -> torch.device:
        """The main device: where tokens, activations and the clean run's caches live."""
        return self.placement.main


def _layer_method(name: str) -> Any:
    def method(self: Any, layer: int, *args: Any) -> Any:
        with self.placement.on_layer(layer) as device:
            out = getattr(super(DispatchedAdapter, self), name)(layer, *_to(args, device))
        return _to(out, self.placement.main)

    method.__name__ = name
    method.__doc__ = f"The family's ``{name}`` on the layer's device (:mod:`{__name__}`)."
    return method


def _outer_method(name: str) -> Any:
    def method(self: Any, *args: Any) -> Any:
        with self.placement.on_main():
            return getattr(super(DispatchedAdapter, self), name)(*_to(args, self.placement.main))

    method.__name__ = name
    method.__doc__ = f"The family's ``{name}`` on the main device (:mod:`{__name__}`)."
    return method


for _name in LAYER_METHODS:
    setattr(DispatchedAdapter, _name, _layer_method(_name))
for _name in OUTER_METHODS:
    setattr(DispatchedAdapter, _name, _outer_method(_name))


@functools.cache
def _dispatched_class(cls: type) -> type:
    return type(f"Dispatched{cls.__name__}", (DispatchedAdapter, cls), {})


def dispatch_adapter(model_or_adapter: Any, tokenizer: Any = None) -> TransformerAdapter:
    """The adapter of a model dispatched by accelerate (``device_map=...``), or of its adapter.

    Returns a new adapter (same model, weights by reference) whose block methods run each part on
    its device; a model on a single device without offloading gets its plain adapter back.
    """
    from ..adapters import TransformerAdapter, adapt

    if isinstance(model_or_adapter, DispatchedAdapter):
        return model_or_adapter
    if isinstance(model_or_adapter, TransformerAdapter):
        adapter = model_or_adapter
    else:
        adapter = adapt(model_or_adapter, tokenizer)
    blocks = [adapter.hook_points(layer).block for layer in range(adapter.arch.n_layers)]
    placement = Placement(adapter.model, blocks)
    if not placement.is_split:
        return adapter
    cls = _dispatched_class(type(adapter))
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(vars(adapter))  # the same model, tokenizer and tables, by reference
    wrapped.placement = placement
    return wrapped


def resolve_model_folder(name_or_path: str | os.PathLike[str]) -> Path:
    """The local Hugging Face folder of a bundled model name (its verified cache, built if
    needed) or of a local path."""
    from ..adapters import loading

    key = str(name_or_path)
    if key.lower() in loading.BUNDLED:
        bundle = loading.BUNDLED[key.lower()]
        folder = loading.cache_root() / bundle.name
        if loading.verify_cache(folder, loading.gguf_path(bundle)) is not None:
            loading.load_bundled(bundle.name)  # (re)builds the cache
        return folder
    path = Path(key).expanduser()
    if not path.is_dir():
        raise CausalNetError(
            f"{key!r} is neither a bundled model nor a local Hugging Face model folder; "
            "device_map loading needs a folder (causalnet never downloads models)"
        )
    return path


def _layer_names(model: nn.Module, adapter: Any) -> list[str]:
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(adapter.hook_points(i).block)] for i in range(adapter.arch.n_layers)]


def auto_device_map(
    folder: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    max_memory: dict[int | str, int | str] | None = None,
) -> dict[str, int | str]:
    """accelerate's ``"auto"`` device map for the model in ``folder`` (balanced over the GPUs,
    then CPU, then disk, whole decoder layers never split), with the modules outside the decoder
    layers moved to the device of the input embedding.

    ``max_memory`` (e.g. ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``) caps each device; what
    does not fit goes to ``"disk"``.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..adapters import adapt

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    empty.tie_weights()
    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    layers = _layer_names(empty, adapt(empty))
    if max_memory is None and torch.cuda.device_count() > 1:
        max_memory = get_balanced_memory(empty, dtype=dtype, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(
        empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )
    return keep_outer_together(device_map, layers, _embedding_name(empty))


def _embedding_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, m in model.named_modules() if m is embedding)


def keep_outer_together(
    device_map: dict[str, int | str], layers: list[str], embedding: str
) -> dict[str, int | str]:
    """``device_map`` with every entry outside the decoder ``layers`` on the input
    ``embedding``'s device (entries holding a whole layer or more are kept as they are)."""

    def covers(key: str, name: str) -> bool:  # the entry ``key`` holds the module ``name``
        return key == "" or name == key or name.startswith(key + ".")

    owner = max((k for k in device_map if covers(k, embedding)), key=len, default=None)
    if owner is None:
        raise CausalNetError(f"the device map places no entry holding {embedding!r}")
    main = device_map[owner]
    # an entry inside a layer, or holding a whole layer or more, stays where it is
    return {
        key: device if any(covers(layer, key) or covers(key, layer) for layer in layers) else main
        for key, device in device_map.items()
    }


def load_dispatched(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, int | str] = "auto",
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
) -> TransformerAdapter:
    """The adapter of a model loaded over several devices with transformers + accelerate.

    ``device_map="auto"`` uses :func:`auto_device_map` (GPUs, then CPU, then disk); a dict is
    used as given. Layers that go to ``"disk"`` are written to ``offload_folder`` (by default a
    temporary folder removed when the adapter is garbage collected).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_folder(name_or_path)
    if device_map == "auto":
        device_map = auto_device_map(folder, dtype, max_memory)
    elif not isinstance(device_map, dict):
        raise CausalNetError(f"device_map must be 'auto' or a dict, got {device_map!r}")
    owned = None
    if offload_folder is None and "disk" in device_map.values():
        owned = tempfile.mkdtemp(prefix="causalnet-offload-")
        offload_folder = owned
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        device_map=device_map,
        offload_folder=offload_folder,
        local_files_only=True,
    )
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    adapter = dispatch_adapter(model, tokenizer)
    if owned is not None:
        import shutil

        weakref.finalize(adapter, shutil.rmtree, owned, True)
    return adapter


def load_for_config(model: str, dtype: str, device: str) -> TransformerAdapter:
    """The adapter a sweep uses: ``device="auto"`` loads over all devices
    (:func:`load_dispatched`), anything else is :func:`causalnet.adapters.load`."""
    from ..adapters import load

    torch_dtype = getattr(torch, dtype)
    if device == "auto":
        return load_dispatched(model, dtype=torch_dtype)
    return load(model, dtype=torch_dtype, device=device)
