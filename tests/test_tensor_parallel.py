"""Tensor parallelism on fake CPU devices (conftest.py starts jax with 8): the sharded model
against the HF goldens, each weight really in its shards (checked against the HF tensors), one
all-reduce per row-parallel projection in the compiled program, the converted checkpoint restored
sharded, and the splits that cannot work refused naming both numbers."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxpaged.converters.checkpoint import convert
from jaxpaged.converters.tiny import TINY_SPECS
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.loader import load_model
from jaxpaged.models.tensor_parallel import TensorParallel, replicate_kv_heads
from model_testing import _forward, generate
from test_model_vs_hf import LOGITS_RTOL, goldens, relative_error


def sharded(model_dir, size: int):
    """The fp32 model over ``size`` fake devices."""
    return load_model(model_dir, dtype="fp32", attn_impl="reference",
                      tensor_parallel=TensorParallel.create(size))


def params_of(model) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}


def test_the_fake_devices_are_there():
    assert jax.device_count() >= 8, "conftest.py must start jax with 8 CPU devices"


# GQA split and replicated (2 KV heads over 4 devices), MHA, MQA with tied embeddings replicated
# over 8, biases with replicated KV heads.
@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("llama-gqa", 2), ("llama-gqa", 4), ("llama-mha", 4),
                                        ("llama-tied", 8), ("llama-bias", 4)])
def test_sharded_model_matches_hf_goldens(name, size, tiny_checkpoint):
    model = sharded(tiny_checkpoint(name), size)
    for prompt_ids, hf_logits, hf_greedy in goldens(name)[::2]:  # the 7- and 38-token prompts
        result = generate(model, prompt_ids, max_new_tokens=len(hf_greedy))
        assert relative_error(result.prompt_logits, hf_logits) < LOGITS_RTOL
        assert result.token_ids == hf_greedy.tolist()


def test_each_weight_lives_in_its_shards(tiny_checkpoint):
    """llama-gqa over 4 devices: 2 KV heads, each copied to 2 devices with 2 of its 4 queries."""
    spec, size = TINY_SPECS["llama-gqa"], 4
    model = sharded(tiny_checkpoint("llama-gqa"), size)
    params = params_of(model)
    h, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    vocab = model.config.vocab_size
    per_device = {  # name -> (spec, one device's shape)
        "['embed']": (("tp", None), (vocab // size, h)),
        "['lm_head']": ((None, "tp"), (h, vocab // size)),
        "['final_norm']['weight']": ((None,), (h,)),
        "['layers'][0]['input_norm']['weight']": ((None,), (h,)),
        "['layers'][0]['attn']['wqkv']": ((None, "tp", None, None), (h, 1, 2 + 2, d)),
        "['layers'][0]['attn']['wo']": (("tp", None), (spec.num_attention_heads * d // size, h)),
        "['layers'][0]['mlp']['w_gate_up']": ((None, None, "tp"), (h, 2, inter // size)),
        "['layers'][0]['mlp']['w_down']": (("tp", None), (inter // size, h)),
    }
    for name, (partition, shape) in per_device.items():
        array = params[name]
        assert tuple(array.sharding.spec) == partition, name
        assert len(array.sharding.device_set) == size, name
        assert {s.data.shape for s in array.addressable_shards} == {shape}, name
    for name, array in params.items():  # every weight is placed by a rule, none left whole
        assert len(array.sharding.device_set) == size, name

    # Device j holds query heads 2j, 2j + 1 and the K/V of KV head j // 2, as HF has them.
    hf = load_file(tiny_checkpoint("llama-gqa") / "model.safetensors")
    q = hf["model.layers.0.self_attn.q_proj.weight"].reshape(-1, d, h)  # [Hq, D, hidden]
    k = hf["model.layers.0.self_attn.k_proj.weight"].reshape(-1, d, h)  # [Hkv, D, hidden]
    v = hf["model.layers.0.self_attn.v_proj.weight"].reshape(-1, d, h)
    for shard in params["['layers'][0]['attn']['wqkv']"].addressable_shards:
        j = shard.index[1].start
        local = np.asarray(shard.data)[:, 0].transpose(1, 2, 0)  # [G' + 2, D, hidden]
        np.testing.assert_array_equal(local[:2], q[2 * j:2 * j + 2])
        np.testing.assert_array_equal(local[2], k[j // 2])
        np.testing.assert_array_equal(local[3], v[j // 2])


@pytest.mark.slow
def test_dummy_weights_are_drawn_into_their_shards(tiny_checkpoint):
    model = load_model(tiny_checkpoint("llama-gqa"), dtype="fp32", load_format="dummy",
                       tensor_parallel=TensorParallel.create(2))
    params = params_of(model)
    wqkv = params["['layers'][0]['attn']['wqkv']"]
    assert tuple(wqkv.sharding.spec) == (None, "tp", None, None)
    assert {s.data.shape[1] for s in wqkv.addressable_shards} == {1}
    assert all(len(a.sharding.device_set) == 2 for a in params.values())


def test_replicating_kv_heads_keeps_query_order():
    rng = np.random.default_rng(0)
    qkv = rng.normal(size=(3, 2, 4 + 2, 5)).astype(np.float32)  # [hidden, Hkv=2, G=4 + 2, D]
    out = replicate_kv_heads(qkv, 2)  # [hidden, 4, 2 + 2, D]
    queries = qkv[:, :, :4].reshape(3, 8, 5)  # HF order h = kv * G + g
    np.testing.assert_array_equal(out[:, :, :2].reshape(3, 8, 5), queries)
    for j in range(4):
        np.testing.assert_array_equal(out[:, j, 2:], qkv[:, j // 2, 4:])
    np.testing.assert_array_equal(np.asarray(replicate_kv_heads(jnp.asarray(qkv), 2)), out)


def test_one_all_reduce_per_row_parallel_projection(tiny_checkpoint):
    """O and down: one all-reduce each per layer, plus the vocab-split embedding lookup; no
    weight is gathered."""
    model = sharded(tiny_checkpoint("llama-gqa"), 2)
    cfg = model.config
    kv = KVCache.zeros(num_layers=cfg.num_layers, num_blocks=3, block_size=16,
                       num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    t = 8
    hlo = _forward.lower(graphdef, state, kv, jnp.zeros(t, jnp.int32),
                         jnp.arange(t, dtype=jnp.int32), jnp.arange(1, 3, dtype=jnp.int32)[None],
                         t, 16).compile().as_text()
    collectives = re.findall(r"= (\S+) (all-reduce|all-gather|all-to-all|reduce-scatter|"
                             r"collective-permute)(?:-start)?\(", hlo)
    assert sorted(op for _, op in collectives) == ["all-reduce"] * (2 * cfg.num_layers + 1)
    assert {shape.split("{")[0] for shape, _ in collectives} == {f"f32[{t},{cfg.hidden_size}]"}


def test_converted_checkpoint_restores_sharded(tiny_checkpoint, tmp_path):
    """orbax restores into the shards; replicated KV heads are rewritten on the devices."""
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "converted", dtype="fp32")
    for size in (2, 4):
        direct = params_of(sharded(tiny_checkpoint("llama-gqa"), size))
        restored = params_of(sharded(tmp_path / "converted", size))
        assert direct.keys() == restored.keys()
        for name, array in restored.items():
            assert array.sharding == direct[name].sharding, name
            np.testing.assert_array_equal(np.asarray(array), np.asarray(direct[name]), name)


def _config(**fields) -> ModelConfig:
    base = dict(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64,
                intermediate_size=128, num_layers=1, num_heads=8, num_kv_heads=2, head_dim=8,
                rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False,
                mlp_bias=False, bos_token_id=None, eos_token_ids=())
    return ModelConfig(**{**base, **fields})


@pytest.mark.parametrize("fields, size, message", [
    (dict(num_heads=4, num_kv_heads=4), 8, "num_attention_heads=4 is not divisible by "
                                            "tensor_parallel_size=8"),
    (dict(num_heads=12, num_kv_heads=6), 4, "num_key_value_heads=6 is not divisible by "
                                             "tensor_parallel_size=4"),
    (dict(num_heads=24, num_kv_heads=3), 8, "tensor_parallel_size=8 is not a multiple of "
                                            "num_key_value_heads=3"),
    (dict(intermediate_size=130), 4, "intermediate_size=130 is not divisible by "
                                     "tensor_parallel_size=4"),
])
def test_impossible_splits_name_both_numbers(fields, size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TensorParallel.create(size).check(_config(**fields))


def test_sharded_config_replicates_kv_heads_up_to_the_devices():
    tp = TensorParallel.create(8)
    assert dataclasses.astuple(tp.sharded_config(_config()))[5:7] == (8, 8)  # Hq, Hkv
    assert tp.kv_heads_per_device(_config()) == 1
    assert TensorParallel.create(2).sharded_config(_config()) == _config()
    assert TensorParallel.create(1) is None


def test_more_devices_than_the_host_has_is_refused():
    with pytest.raises(ValueError, match=f"tensor_parallel_size=64 needs 64 devices, this host "
                                         f"has {jax.local_device_count()}"):
        TensorParallel.create(64)


@pytest.mark.slow
def test_pallas_kernels_lower_per_shard_for_cuda():
    """On two abstract H100s the Pallas kernels (RoPE + K/V write, ragged attention) lower
    inside the shard_map's manual computation on each device's half of the heads."""
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec, use_abstract_mesh

    from jaxpaged.models.attention import PagedAttention
    from jaxpaged.models.attention_metadata import AttentionMetadata
    from test_kernel_lowering import H100, TRITON_CALL

    mesh = AbstractMesh((2,), ("tp",), abstract_device=H100)
    t, hkv, g, d, pages, page = 64, 8, 4, 128, 100, 16

    def step(qkv, cos, sin, k, v, slots, tables, lens, starts):
        pool = KVCache(k=k, v=v, num_layers=1, num_blocks=pages)
        md = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=lens,
                               query_start_loc=starts, max_query_len=t)
        out, pool = PagedAttention("pallas", mesh)(qkv, cos, sin, pool, 0, md, sm_scale=0.1)
        return out, pool.k, pool.v

    def sds(shape, dtype, spec=()):
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=NamedSharding(mesh, PartitionSpec(*spec)))
    pool = sds((pages, page, hkv, d), jnp.bfloat16, (None, None, "tp"))
    args = (sds((t, hkv, g + 2, d), jnp.bfloat16, (None, "tp")), sds((t, d), jnp.float32),
            sds((t, d), jnp.float32), pool, pool, sds((t,), jnp.int32), sds((4, 8), jnp.int32),
            sds((4,), jnp.int32), sds((5,), jnp.int32))
    with use_abstract_mesh(mesh):
        text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "sdy.manual_computation" in text
    assert text.count(TRITON_CALL) == 2
    assert f"tensor<{pages}x{page}x{hkv // 2}x{d}xbf16>" in text  # one device's pool
    assert f"tensor<{t}x{hkv // 2}x{g + 2}x{d}xbf16>" in text  # one device's QKV


def test_llm_refuses_impossible_splits_and_replicas_before_loading(tiny_checkpoint):
    from jaxpaged import LLM

    model = str(tiny_checkpoint("llama-mha"))  # 4 heads
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by "
                                         "tensor_parallel_size=8"):
        LLM(model, tensor_parallel_size=8)
    with pytest.raises(ValueError, match="tensor_parallel_size=16 needs 16 devices"):
        LLM(model, tensor_parallel_size=16)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported by "
                                         r"jaxpaged \(pipeline parallel stages"):
        LLM(model, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="data_parallel_size=2 is not supported by jaxpaged "
                                         r"\(one LLM is one engine.*--data-parallel-size N"):
        LLM(model, data_parallel_size=2)


def test_pool_is_sized_per_device_from_its_kv_heads():
    """8 KV heads over 4 devices: a block costs a quarter per device, so a per-device budget
    (vLLM's kv_cache_memory_bytes) holds four times the blocks, and the total sums the devices."""
    from jaxpaged.runner.kv_sizing import plan_kv_cache

    cfg = _config(num_heads=8, num_kv_heads=8)
    tp = TensorParallel.create(4)
    sizes = dict(dtype=jnp.float32, block_size=16, max_model_len=64, max_num_seqs=4,
                 gpu_memory_utilization=0.9, activation_bytes=0, kv_cache_memory_bytes=2**20)
    whole = plan_kv_cache(cfg, **sizes)
    split = plan_kv_cache(cfg, **sizes, num_devices=4,
                          kv_heads_per_device=tp.kv_heads_per_device(cfg))
    assert split.bytes_per_block * 4 == whole.bytes_per_block
    assert split.num_blocks == 4 * whole.num_blocks
    assert split.total_bytes == 4 * split.num_blocks * split.bytes_per_block


@pytest.mark.slow
def test_kv_scale_calibration_runs_sharded_and_agrees(tiny_checkpoint):
    from jaxpaged.runner.kv_calibration import calibrate_kv_scales, calibration_token_ids

    path = tiny_checkpoint("llama-gqa")
    single = load_model(path, dtype="fp32", attn_impl="reference")
    token_ids = calibration_token_ids(None, single.config.vocab_size, 64)
    expected = calibrate_kv_scales(single, token_ids, block_size=16)
    scales = calibrate_kv_scales(sharded(path, 4), token_ids, block_size=16)
    np.testing.assert_allclose(scales.k, expected.k, rtol=1e-5)
    np.testing.assert_allclose(scales.v, expected.v, rtol=1e-5)
