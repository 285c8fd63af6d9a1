"""Build a ready-to-run model from a directory: a converted jaxpaged checkpoint or an HF one."""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpaged.models.config import ModelConfig
from jaxpaged.converters.checkpoint import is_converted, restore_params
from jaxpaged.converters.gguf_model import gguf_params, gguf_source
from jaxpaged.converters.hf_to_params import params_from_hf
from jaxpaged.converters.quantized_params import quantize_on_device
from jaxpaged.models.dummy_weights import dummy_params
from jaxpaged.models.linear import QuantConfig
from jaxpaged.models.llama import LlamaForCausalLM
from jaxpaged.models.sharding import param_shardings
from jaxpaged.models.tensor_parallel import TP_AXIS, TensorParallel, replicate_kv_heads

JAX_DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
              "fp32": jnp.float32, "float32": jnp.float32}


def jax_dtype(name: str) -> jnp.dtype:
    if name not in JAX_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(JAX_DTYPES)}, got {name!r}")
    return jnp.dtype(JAX_DTYPES[name])


def abstract_model(cfg: ModelConfig, dtype: str, attn_impl: str,
                   quant: QuantConfig | None = None,
                   tensor_parallel: TensorParallel | None = None) -> LlamaForCausalLM:
    """The model's structure with shapes and dtypes only (no memory); under tensor parallelism
    the sharded model (``TensorParallel.sharded_config``) over its mesh."""
    mesh = None
    if tensor_parallel is not None:
        cfg, mesh = tensor_parallel.sharded_config(cfg), tensor_parallel.mesh
    return nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=jax_dtype(dtype), attn_impl=attn_impl,
                                                   mesh=mesh, rngs=nnx.Rngs(0), quant=quant))


def _target(cfg: ModelConfig, dtype: str, attn_impl: str, quant: QuantConfig | None):
    graphdef, state = nnx.split(abstract_model(cfg, dtype, attn_impl, quant))
    return graphdef, state, jax.tree.map(_device_struct, nnx.to_pure_dict(state))


LOAD_FORMATS = ("auto", "dummy")


def load_model(model_dir: str | pathlib.Path, *, dtype: str = "bf16", attn_impl: str = "auto",
               load_format: str = "auto", seed: int = 0, quant: QuantConfig | None = None,
               checkpoint_quantized: bool = False,
               tensor_parallel: TensorParallel | None = None) -> LlamaForCausalLM:
    """Loads weights from ``model_dir`` (converted or HF layout) into a ``LlamaForCausalLM``;
    ``load_format="dummy"`` needs only its config.json and makes random weights on the device.

    ``quant``: the projections run quantized; ``checkpoint_quantized``: the checkpoint already
    holds their codes and scales (else they are quantized here, on the device, one tensor at a
    time). With ``tensor_parallel`` each weight goes straight into its shards
    (``models.sharding``): host arrays are cut per device, a converted checkpoint is restored
    sharded."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    cfg = ModelConfig.from_dir(model_dir)
    if tensor_parallel is not None:
        if quant is not None:
            raise ValueError(f"quantization={quant.method!r} with tensor_parallel_size="
                             f"{tensor_parallel.size} is not supported yet (quantized weights "
                             "run on one device)")
        graphdef, state = nnx.split(abstract_model(cfg, dtype, attn_impl,
                                                   tensor_parallel=tensor_parallel))
        params = _load_sharded(model_dir, cfg, dtype, load_format, seed,
                               nnx.to_pure_dict(state), tensor_parallel)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)
    graphdef, state, target = _target(cfg, dtype, attn_impl, quant)
    if quant is not None and not checkpoint_quantized and load_format != "dummy":
        # read unquantized, quantize each projection once it is on the device
        _, _, plain = _target(cfg, dtype, attn_impl, None)
        params = _read_params(model_dir, cfg, dtype, plain, on_device=False)
        params = quantize_on_device(params, quant.method, _put, target)
    elif load_format == "dummy":
        params = dummy_params(target, seed)
    else:
        params = _read_params(model_dir, cfg, dtype, target, on_device=True,
                              quantized=checkpoint_quantized)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _read_params(model_dir: pathlib.Path, cfg: ModelConfig, dtype: str, target: Any, *,
                 on_device: bool, quantized: bool = False) -> Any:
    """The checkpoint's parameter tree (model layout): on the device like ``target``, or, where
    the checkpoint is read on the host, as host arrays when ``on_device`` is False."""
    if is_converted(model_dir):
        return unstack_layers(restore_params(model_dir, stack_layers(target)))
    if (gguf := gguf_source(model_dir)) is not None:  # side files of a .gguf (resolve_model_path)
        host = unstack_layers(gguf_params(gguf, dtype))
    else:
        host = unstack_layers(params_from_hf(model_dir, cfg, dtype, quantized=quantized))
    return _to_device(host, target) if on_device else host


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
    sharding = first.sharding
    if isinstance(sharding, NamedSharding):  # the layer axis is not split
        sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)


def _device_struct(leaf: Any) -> jax.ShapeDtypeStruct:
    device = jax.devices()[0]
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(device))


def _put(array: Any, t: jax.ShapeDtypeStruct) -> jax.Array:
    if tuple(array.shape) != tuple(t.shape):  # converter and model disagree: a bug, not input
        raise ValueError(f"parameter shape {array.shape} does not match the model's {t.shape}")
    return jax.device_put(array, t.sharding).astype(t.dtype)


def _to_device(params: Any, target: Any) -> Any:
    return jax.tree.map(_put, params, target)


# ----- tensor parallel -----

_QKV_NAMES = ("wqkv", "bqkv")  # rewritten for replicated KV heads (replicate_kv_heads)


def _load_sharded(model_dir: pathlib.Path, cfg: ModelConfig, dtype: str, load_format: str,
                  seed: int, abstract: dict[str, Any], tp: TensorParallel) -> dict[str, Any]:
    """The sharded model's parameters, each placed straight into its shards."""
    shardings = param_shardings(abstract, tp)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    replicas = tp.kv_replicas(cfg)
    if load_format == "dummy":
        return dummy_params(target, seed)
    if is_converted(model_dir):
        return _restore_sharded(model_dir, target, replicas, tp)
    if (gguf := gguf_source(model_dir)) is not None:
        host = gguf_params(gguf, dtype)
    else:
        host = params_from_hf(model_dir, cfg, dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, array, t: _host_to_shards(array, t, replicas if _is_qkv(path) else 1),
        unstack_layers(host), target)


def _is_qkv(path) -> bool:
    return getattr(path[-1], "key", None) in _QKV_NAMES


def _host_to_shards(array: np.ndarray, target: jax.ShapeDtypeStruct,
                    replicas: int) -> jax.Array:
    """A host array into ``target``'s shards: each device receives only its slice."""
    array = replicate_kv_heads(np.asarray(array), replicas)
    if tuple(array.shape) != tuple(target.shape):  # converter and model disagree: a bug
        raise ValueError(f"parameter shape {array.shape} does not match the model's "
                         f"{target.shape}")
    dtype = np.dtype(target.dtype)
    return jax.make_array_from_callback(target.shape, target.sharding,
                                        lambda index: np.asarray(array[index], dtype))


def _restore_sharded(model_dir: pathlib.Path, target: dict[str, Any], replicas: int,
                     tp: TensorParallel) -> dict[str, Any]:
    """orbax restores every tensor into its shards. With replicated KV heads the checkpoint's
    QKV tensors (fewer KV heads than devices) are restored split over their hidden axis instead,
    then rewritten on the devices into the replicated layout."""
    stored = dict(target)
    if replicas > 1:
        stored["layers"] = {i: {**layer, "attn": {
            name: _stored_qkv(value, replicas, tp) if name in _QKV_NAMES else value
            for name, value in layer["attn"].items()}} for i, layer in target["layers"].items()}
    params = unstack_layers(restore_params(model_dir, stack_layers(stored)))
    return jax.tree_util.tree_map_with_path(
        lambda path, p, t: _reshard(p, t, replicas if _is_qkv(path) else 1), params, target)


def _stored_qkv(t: jax.ShapeDtypeStruct, replicas: int,
                tp: TensorParallel) -> jax.ShapeDtypeStruct:
    """The checkpoint's shape of one layer's replicated QKV tensor, split over hidden (wqkv
    [hidden, Hkv, G + 2, D]) or replicated (bqkv [Hkv, G + 2, D], or a hidden size that does
    not divide)."""
    *lead, heads, g2, d = t.shape
    shape = (*lead, heads // replicas, (g2 - 2) * replicas + 2, d)
    split = len(shape) == 4 and shape[0] % tp.size == 0
    return jax.ShapeDtypeStruct(shape, t.dtype,
                                sharding=tp.sharding(TP_AXIS) if split else tp.replicated)


def _reshard(array: jax.Array, target: jax.ShapeDtypeStruct, replicas: int) -> jax.Array:
    if replicas == 1:
        return jax.device_put(array, target.sharding)
    return jax.jit(replicate_kv_heads, static_argnums=1,
                   out_shardings=target.sharding)(array, replicas)
