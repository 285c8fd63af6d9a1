"""Per-layer K and V scales of an fp8 KV cache, as checkpoints carry them.

A stored fp8 code stands for ``code * scale`` (``jaxpaged.pallas_kernels.kv_quant``); vLLM's
checkpoints name the scales ``model.layers.N.self_attn.k_scale`` / ``v_scale``
(compressed-tensors) or ``...k_proj.output_scale`` / ``v_proj.output_scale`` (older fp8 exports),
one scalar per layer. ``jaxpaged convert`` keeps them in ``kv_scales.json`` beside its checkpoint.
A checkpoint carries scales for every layer's K and V or for none: anything else is a ValueError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np

from jaxpaged.converters.hf_reader import iter_tensors

SCALES_FILE = "kv_scales.json"
_SCALE_NAME = re.compile(
    r"model\.layers\.(\d+)\.self_attn\.(?:(?P<a>[kv])_scale|(?P<b>[kv])_proj\.output_scale)")


@dataclasses.dataclass(frozen=True)
class KVScales:
    k: tuple[float, ...]  # [num_layers]
    v: tuple[float, ...]  # [num_layers]

    def to_json(self) -> str:
        return json.dumps({"k_scale": list(self.k), "v_scale": list(self.v)})


def kv_scale_key(name: str) -> tuple[int, str] | None:
    """(layer, "k" or "v") when ``name`` is a KV-scale tensor, else None."""
    match = _SCALE_NAME.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1)), match.group("a") or match.group("b")


def read_kv_scales(model_dir: str | pathlib.Path, num_layers: int, *,
                   converted: bool) -> KVScales | None:
    """The checkpoint's scales (an HF directory's tensors, or a converted one's kv_scales.json);
    None when it carries none."""
    model_dir = pathlib.Path(model_dir)
    if converted:
        path = model_dir / SCALES_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        found = {(i, kind[0]): v for kind in ("k_scale", "v_scale")
                 for i, v in enumerate(data.get(kind) or [])}
        return _assemble(found, num_layers, str(path))
    found = {}
    for name, array in iter_tensors(model_dir, select=lambda n: kv_scale_key(n) is not None):
        if np.size(array) != 1:
            raise ValueError(f"KV scale {name!r} has shape {tuple(np.shape(array))}; "
                             "only per-tensor (scalar) scales are supported")
        found[kv_scale_key(name)] = float(np.asarray(array, np.float32).reshape(()))
    return _assemble(found, num_layers, str(model_dir))


def _assemble(found: dict[tuple[int, str], float], num_layers: int,
              source: str) -> KVScales | None:
    if not found:
        return None
    for (layer, kind), value in found.items():
        if not 0 <= layer < num_layers:
            raise ValueError(f"{source}: KV scale for layer {layer}, but the model has "
                             f"{num_layers} layers")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{source}: {kind}_scale of layer {layer} is {value}; "
                             "scales must be positive and finite")
    missing = [f"{kind}_scale of layer {layer}" for layer in range(num_layers)
               for kind in "kv" if (layer, kind) not in found]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: the checkpoint carries KV scales but lacks "
                         f"{', '.join(missing[:3])}{more}")
    return KVScales(k=tuple(found[(i, "k")] for i in range(num_layers)),
                    v=tuple(found[(i, "v")] for i in range(num_layers)))
