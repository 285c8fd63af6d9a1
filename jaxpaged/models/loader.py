"""Build a ready-to-run model from a directory: a converted jaxpaged checkpoint or an HF one."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.models.config import ModelConfig
from jaxpaged.converters.checkpoint import is_converted, restore_params
from jaxpaged.converters.gguf_model import gguf_params, gguf_source
from jaxpaged.converters.hf_to_params import params_from_hf
from jaxpaged.models.dummy_weights import dummy_params
from jaxpaged.models.llama import LlamaForCausalLM

JAX_DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
              "fp32": jnp.float32, "float32": jnp.float32}


def jax_dtype(name: str) -> jnp.dtype:
    if name not in JAX_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(JAX_DTYPES)}, got {name!r}")
    return jnp.dtype(JAX_DTYPES[name])


def abstract_model(cfg: ModelConfig, dtype: str, attn_impl: str) -> LlamaForCausalLM:
    """The model's structure with shapes and dtypes only (no memory)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=jax_dtype(dtype), attn_impl=attn_impl,
                                                   rngs=nnx.Rngs(0)))


LOAD_FORMATS = ("auto", "dummy")


def load_model(model_dir: str | pathlib.Path, *, dtype: str = "bf16", attn_impl: str = "auto",
               load_format: str = "auto", seed: int = 0) -> LlamaForCausalLM:
    """Loads weights from ``model_dir`` (converted or HF layout) into a ``LlamaForCausalLM``;
    ``load_format="dummy"`` needs only its config.json and makes random weights on the device."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    cfg = ModelConfig.from_dir(model_dir)
    graphdef, state = nnx.split(abstract_model(cfg, dtype, attn_impl))
    target = jax.tree.map(_device_struct, nnx.to_pure_dict(state))
    if load_format == "dummy":
        params = dummy_params(target, seed)
    elif is_converted(model_dir):
        params = unstack_layers(restore_params(model_dir, stack_layers(target)))
    elif (gguf := gguf_source(model_dir)) is not None:  # side files of a .gguf (resolve_model_path)
        params = _to_device(unstack_layers(gguf_params(gguf, dtype)), target)
    else:
        params = _to_device(unstack_layers(params_from_hf(model_dir, cfg, dtype)), target)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def stack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """Model tree (``layers`` keyed 0..L-1) -> checkpoint tree (each leaf stacked on a layer axis)."""
    layers = [tree["layers"][i] for i in range(len(tree["layers"]))]
    stacked = jax.tree.map(lambda *leaves: _stacked_struct(leaves), *layers)
    return {**tree, "layers": stacked}


def unstack_layers(tree: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint tree ([L, ...] leaves under ``layers``) -> model tree (``layers`` keyed 0..L-1).

    Each layer gets its own array: slicing a stacked array inside the model would make XLA copy
    every layer's weights out of the stack at every step."""
    num_layers = jax.tree.leaves(tree["layers"])[0].shape[0]
    layers = {i: jax.tree.map(lambda a: a[i], tree["layers"]) for i in range(num_layers)}
    return {**tree, "layers": layers}


def _stacked_struct(leaves: tuple[jax.ShapeDtypeStruct, ...]) -> jax.ShapeDtypeStruct:
    first = leaves[0]
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=first.sharding)


def _device_struct(leaf: Any) -> jax.ShapeDtypeStruct:
    device = jax.devices()[0]
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(device))


def _to_device(params: Any, target: Any) -> Any:
    def put(array, t):
        if tuple(array.shape) != tuple(t.shape):  # converter and model disagree: a bug, not input
            raise ValueError(f"parameter shape {array.shape} does not match the model's {t.shape}")
        return jax.device_put(array, t.sharding).astype(t.dtype)
    return jax.tree.map(put, params, target)
