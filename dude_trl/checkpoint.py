"""Full-precision weights of a checkpoint, read one tensor at a time.

A quantized base keeps only ``q(W0)`` in memory, but DuDe decomposes the full-precision ``W0``
(its principal part is never quantized). transformers loads and quantizes a checkpoint one
tensor at a time, so no full-precision copy of the model ever exists; this module then reads
back, from the checkpoint's safetensors (memory-mapped), exactly the target weights asked for.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

#: `from_pretrained` keyword arguments that locate a checkpoint's files.
HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download", "proxies")


class CheckpointWeights:
    """Full-precision Linear weights of a safetensors checkpoint, read one tensor at a time.

    Files are memory-mapped by `safetensors`; only the tensor asked for is materialised.
    """

    def __init__(self, key_to_file: dict[str, str], base_model_prefix: str = "") -> None:
        self.key_to_file = key_to_file
        self.base_model_prefix = base_model_prefix
        self._handles: dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, base_model_prefix: str = "", variant: Optional[str] = None, **hub_kwargs: Any
    ) -> Optional["CheckpointWeights"]:
        """The safetensors weights of a local directory or (cached) hub repository, or None when
        it has none. `hub_kwargs` are `from_pretrained`'s (revision, subfolder, token, ...)."""
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
        hub_kwargs.update(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)

        def resolve(filename: str) -> Optional[str]:
            try:
                return cached_file(name_or_path, filename, **hub_kwargs)
            except (OSError, ValueError):
                return None

        def with_variant(filename: str) -> str:
            stem, ext = filename.split(".", 1)
            return f"{stem}.{variant}.{ext}" if variant else filename

        index = resolve(with_variant(SAFE_WEIGHTS_INDEX_NAME))
        if index is not None:
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            shards = {shard: resolve(shard) for shard in set(weight_map.values())}
            if any(path is None for path in shards.values()):
                return None
            return cls({key: shards[shard] for key, shard in weight_map.items()}, base_model_prefix)
        single = resolve(with_variant(SAFE_WEIGHTS_NAME))
        if single is None:
            return None
        with safe_open(single, framework="pt") as f:
            keys = list(f.keys())
        return cls({key: single for key in keys}, base_model_prefix)

    def _candidates(self, module_name: str) -> Iterable[str]:
        yield f"{module_name}.weight"
        prefix = self.base_model_prefix
        if prefix:
            if module_name.startswith(prefix + "."):
                yield f"{module_name[len(prefix) + 1:]}.weight"
            else:
                yield f"{prefix}.{module_name}.weight"

    def get(self, module_name: str, shape: tuple[int, int], transposed_ok: bool = False) -> Optional[torch.Tensor]:
        """The ``out x in`` weight of `module_name` (named as in the transformers model), or None
        when the checkpoint has no tensor of that name and shape."""
        for key in self._candidates(module_name):
            path = self.key_to_file.get(key)
            if path is None:
                continue
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="pt")
            handle = self._handles[path]
            stored = tuple(handle.get_slice(key).get_shape())
            if stored == tuple(shape):
                return handle.get_tensor(key)
            if transposed_ok and stored == tuple(shape)[::-1]:
                return handle.get_tensor(key).T
        return None

    def close(self) -> None:
        self._handles.clear()


def checkpoint_weights(source: Optional[str], model: nn.Module, source_kwargs: dict) -> Optional[CheckpointWeights]:
    """The full-precision weights behind `model`, unless there are none to read."""
    if source is None:
        return None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "pre_quantized", False):
        return None  # the checkpoint itself stores quantized weights
    if source_kwargs.get("gguf_file"):
        return None
    prefix = getattr(model, "base_model_prefix", "") or ""
    hub_kwargs = {k: v for k, v in source_kwargs.items() if k in HUB_KWARGS}
    return CheckpointWeights.from_pretrained(
        source, base_model_prefix=prefix, variant=source_kwargs.get("variant"), **hub_kwargs
    )

