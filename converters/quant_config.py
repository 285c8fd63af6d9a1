"""Which quantization a checkpoint carries, and which one the engine runs.

Read from a converted checkpoint's marker (``"quantization": "fp8" | "int8"``) or from a Hugging
Face ``config.json``'s ``quantization_config``:
- ``quant_method == "fp8"`` (vLLM's / transformers' FP8 layout): E4M3 weights with a per-tensor
  ``weight_scale`` each, optional static ``input_scale``, ``ignored_layers``;
  ``weight_block_size`` (block-wise scales) is refused: not built.
- ``quant_method == "compressed-tensors"`` with ``format == "float-quantized"`` (the RedHatAI /
  neuralmagic ``-FP8`` and ``-FP8-dynamic`` checkpoints): 8-bit float weights, ``channel`` or
  ``tensor`` strategy; activations dynamic per token or static per tensor.
Any other method or layout is refused with its name.

Activations: jaxpaged's kernels take fp8 weights with bf16 activations (W8A16) or quantize the
activations dynamically per token (W8A8). A checkpoint's static ``input_scale`` is therefore not
used (it is read and checked, and the log says so): dynamic per-token scales are at least as fine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

from jaxpaged.config import QUANTIZATION_METHODS
from jaxpaged.models.linear import QuantConfig

logger = logging.getLogger(__name__)

# The HF modules a checkpoint may leave unquantized that jaxpaged keeps unquantized anyway.
ALWAYS_UNQUANTIZED = ("lm_head", "model.embed_tokens")


@dataclasses.dataclass(frozen=True)
class CheckpointQuant:
    """A checkpoint's quantization as jaxpaged reads it."""

    method: str  # "fp8" or "int8": the codes' format
    layout: str  # "converted", "fp8" (HF per-tensor), "compressed-tensors"
    static_activations: bool = False


def checkpoint_quantization(model_dir: pathlib.Path) -> CheckpointQuant | None:
    """The quantization ``model_dir``'s weights are stored in (None: unquantized)."""
    marker = model_dir / "jaxpaged_checkpoint.json"
    if marker.is_file():
        method = json.loads(marker.read_text()).get("quantization")
        return None if method is None else CheckpointQuant(method=method, layout="converted")
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{config_file}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method == "fp8":
        return _hf_fp8(qc, config_file)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, config_file)
    raise ValueError(f"quantization method {method!r} of {config_file} is not supported "
                     "(jaxpaged reads 'fp8' and 'compressed-tensors' float-quantized FP8)")


def _hf_fp8(qc: dict[str, Any], config_file: pathlib.Path) -> CheckpointQuant:
    if qc.get("weight_block_size") is not None:
        raise ValueError(f"{config_file}: fp8 weight_block_size={qc['weight_block_size']!r} "
                         "(block-wise scales) is not supported")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"{config_file}: fp8 activation_scheme {scheme!r} is not supported")
    _check_ignored(qc.get("ignored_layers") or [], config_file, "ignored_layers")
    return CheckpointQuant(method="fp8", layout="fp8", static_activations=scheme == "static")


def _compressed_tensors(qc: dict[str, Any], config_file: pathlib.Path) -> CheckpointQuant:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise ValueError(f"{config_file}: compressed-tensors format {fmt!r} is not supported "
                         "(only 'float-quantized' FP8)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{config_file}: compressed-tensors needs exactly one config group, "
                         f"got {len(groups)}")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    if (weights.get("type"), weights.get("num_bits")) != ("float", 8):
        raise ValueError(f"{config_file}: compressed-tensors weights {weights!r} are not 8-bit "
                         "float")
    if weights.get("strategy") not in ("channel", "tensor"):
        raise ValueError(f"{config_file}: compressed-tensors weight strategy "
                         f"{weights.get('strategy')!r} is not supported (channel, tensor)")
    if weights.get("symmetric") is False or weights.get("dynamic"):
        raise ValueError(f"{config_file}: compressed-tensors weights must be static and symmetric")
    acts = group.get("input_activations")
    static = False
    if acts is not None:
        if (acts.get("type"), acts.get("num_bits")) != ("float", 8):
            raise ValueError(f"{config_file}: compressed-tensors input_activations {acts!r} are "
                             "not 8-bit float")
        static = not acts.get("dynamic", False)
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise ValueError(f"{config_file}: compressed-tensors targets {targets!r} are not "
                         "supported (only ['Linear'])")
    _check_ignored(qc.get("ignore") or [], config_file, "ignore")
    return CheckpointQuant(method="fp8", layout="compressed-tensors", static_activations=static)


def _check_ignored(ignored: list[str], config_file: pathlib.Path, field: str) -> None:
    """Only the modules jaxpaged never quantizes may be left unquantized."""
    for name in ignored:
        if not any(name == m or name.endswith("." + m) or name == m.split(".")[-1]
                   for m in ALWAYS_UNQUANTIZED):
            raise ValueError(f"{config_file}: {field} entry {name!r} (an unquantized projection "
                             "in a quantized checkpoint) is not supported")


def resolve_quantization(requested: str | None, model_dir: pathlib.Path, *, kernel: str = "auto",
                         dummy: bool = False) -> tuple[QuantConfig | None, bool]:
    """(how the projections run, whether the checkpoint already holds their codes).

    ``requested`` (``EngineConfig.quantization``) None follows the checkpoint; a value that
    contradicts the checkpoint is refused. ``dummy`` weights ignore the checkpoint's files."""
    if requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {requested!r}")
    stored = None if dummy else checkpoint_quantization(model_dir)
    if stored is None:
        if requested == "compressed-tensors":
            raise ValueError(f"quantization='compressed-tensors' needs a compressed-tensors "
                             f"checkpoint; {model_dir} is not one")
        return (None if requested is None else QuantConfig(requested, kernel)), False
    names = {stored.method, "compressed-tensors"} if stored.layout == "compressed-tensors" \
        else {stored.method}
    if requested is not None and requested not in names:
        raise ValueError(f"quantization={requested!r} does not match the checkpoint's "
                         f"{stored.method!r} ({stored.layout}) weights in {model_dir}")
    if stored.static_activations:
        logger.info("%s: static input scales are not used; activations are quantized "
                    "dynamically per token where the fp8 x fp8 kernel runs", model_dir)
    return QuantConfig(stored.method, kernel), True
