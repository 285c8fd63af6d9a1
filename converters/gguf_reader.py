"""A GGUF file (llama.cpp's model container) read with the ``gguf`` library: metadata and tensors.

The container is parsed by ``gguf.GGUFReader`` (a memory map) and tensors are dequantized by
``gguf.quants.dequantize``; nothing here decodes bytes by hand. Tensors come back as float32 numpy
arrays in numpy order: a GGUF tensor of dims ``[ne0, ne1]`` (``ne0`` contiguous) is ``[ne1, ne0]``,
i.e. ``(out_features, in_features)`` like torch's ``nn.Linear.weight``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# Types jaxpaged reads (each covered by tests/test_gguf_quant_types.py); others are refused by name.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_MISSING = object()


class GGUFFile:
    """Metadata (``key -> Python value``) and tensors of one GGUF file.

    Raises ValueError when the file is not a GGUF or holds a tensor type jaxpaged does not read.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise ValueError(f"GGUF file {str(self.path)!r} does not exist")
        try:
            reader = gguf.GGUFReader(self.path)
        except ValueError as e:
            raise ValueError(f"{self.path.name} is not a readable GGUF file: {e}") from e
        self.metadata: dict[str, Any] = {name: field.contents()
                                         for name, field in reader.fields.items()
                                         if not name.startswith("GGUF.")}
        self._tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise ValueError(
                    f"{self.path.name}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, "
                    f"which jaxpaged does not read (it reads "
                    f"{', '.join(q.name for q in SUPPORTED_TYPES)})")

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        """The metadata value of ``key``; ``{arch}`` in the key is the file's architecture."""
        return self.metadata.get(key.format(arch=self.architecture), default)

    def require(self, key: str) -> Any:
        value = self.metadata.get(key.format(arch=self.metadata.get("general.architecture")),
                                  _MISSING)
        if value is _MISSING:
            raise ValueError(f"{self.path.name}: GGUF metadata has no {key!r}")
        return value

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> gguf.GGMLQuantizationType:
        return self._tensor(name).tensor_type

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """numpy order: the GGUF dims reversed."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def dequantize(self, name: str) -> np.ndarray:
        """f32[tensor_shape(name)]."""
        t = self._tensor(name)
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(values, np.float32).reshape(self.tensor_shape(name))

    def _tensor(self, name: str) -> Any:
        if name not in self._tensors:
            raise ValueError(f"{self.path.name}: no tensor {name!r}")
        return self._tensors[name]
