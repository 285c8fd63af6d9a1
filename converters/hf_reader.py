"""Read the tensors of a Hugging Face checkpoint directory without torch.

Supports one ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
and ``pytorch_model.bin`` (only where torch is installed, loaded with ``weights_only=True``).
Tensors come back as numpy arrays (bf16 through ml_dtypes) one at a time, so a large checkpoint is
never held twice in memory.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open


def checkpoint_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of an HF checkpoint, in a deterministic order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: missing or empty 'weight_map'")
        files = sorted({model_dir / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index} names shard {f.name}, which does not exist")
        return files
    single = sorted(model_dir.glob("*.safetensors"))
    if single:
        return single
    if (model_dir / "pytorch_model.bin").is_file():
        return [model_dir / "pytorch_model.bin"]
    raise ValueError(f"no weights in {model_dir}: expected model.safetensors, "
                     "model.safetensors.index.json or pytorch_model.bin")


def iter_tensors(model_dir: pathlib.Path, select: Callable[[str], bool] | None = None
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor (``select``: only the names it accepts, read without
    the others from safetensors); a name seen twice is an error that names it."""
    seen: dict[str, str] = {}
    for path in checkpoint_files(model_dir):
        for name, array in _read_file(path, select):
            if name in seen:
                raise ValueError(f"duplicate tensor {name!r} in {path.name} "
                                 f"(already read from {seen[name]})")
            seen[name] = path.name
            yield name, array


# safetensors' numpy reader has no fp8 dtypes: these are read from the file's bytes.
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_file(path: pathlib.Path, select: Callable[[str], bool] | None
               ) -> Iterator[tuple[str, np.ndarray]]:
    if path.suffix == ".safetensors":
        header, data_start = _safetensors_header(path)
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if select is not None and not select(name):
                    continue
                entry = header[name]
                if entry["dtype"] in _RAW_DTYPES:
                    yield name, _read_raw(path, data_start, entry)
                else:
                    yield name, f.get_tensor(name)
    else:
        for name, array in _read_torch_bin(path):
            if select is None or select(name):
                yield name, array


def _safetensors_header(path: pathlib.Path) -> tuple[dict, int]:
    """The file's JSON header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(size)), 8 + size


def _read_raw(path: pathlib.Path, data_start: int, entry: dict) -> np.ndarray:
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = f.read(end - begin)
    return np.frombuffer(raw, np.uint8).view(_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_torch_bin(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{path.name} needs torch to read; install torch or convert the "
                         "checkpoint to safetensors") from e
    import ml_dtypes

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            yield name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, tensor.numpy()
