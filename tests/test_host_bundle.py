"""host_bundle: a pytree of host arrays through one byte buffer and back, inside jit."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from jaxpaged.runner.host_bundle import bundle, unbundle, unbundle_shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Inputs:
    ids: np.ndarray
    table: np.ndarray
    scale: np.ndarray
    mask: np.ndarray
    key: np.ndarray
    small: np.ndarray
    none_field: np.ndarray | None
    static_flag: bool = dataclasses.field(metadata=dict(static=True))


def _example(rng: np.random.Generator, rows: int) -> _Inputs:
    return _Inputs(ids=rng.integers(-5, 1000, 7).astype(np.int32),
                   table=rng.integers(0, 99, (rows, 3)).astype(np.int32),
                   scale=rng.standard_normal(5).astype(np.float32),
                   mask=rng.random(3) < 0.5,  # 3 bytes: the next leaf starts 4-byte aligned
                   key=rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32),
                   small=rng.integers(-100, 100, 5).astype(np.int16),
                   none_field=None, static_flag=True)


@functools.partial(jax.jit, static_argnames=("layout",))
def _roundtrip(buffer, layout):
    return unbundle(buffer, layout)


@pytest.mark.parametrize("rows", [1, 4])
def test_bundle_roundtrip_inside_jit_keeps_values_dtypes_and_static_fields(rows):
    tree = _example(np.random.default_rng(rows), rows)
    buffer, layout = bundle(tree)
    assert buffer.dtype == np.uint8 and buffer.ndim == 1 and buffer.size % 4 == 0
    out = _roundtrip(buffer, layout)
    assert out.static_flag is True and out.none_field is None
    for name in ("ids", "table", "scale", "mask", "key", "small"):
        got, want = np.asarray(getattr(out, name)), getattr(tree, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_same_structure_gives_equal_hashable_layouts_and_other_shapes_do_not():
    a = bundle(_example(np.random.default_rng(0), 2))[1]
    b = bundle(_example(np.random.default_rng(1), 2))[1]
    c = bundle(_example(np.random.default_rng(0), 3))[1]
    assert a == b and hash(a) == hash(b)
    assert a != c


def test_tuples_of_arrays_and_scalars_roundtrip():
    tree = (np.arange(4, dtype=np.int32), np.float32(2.5), np.array([True]))
    buffer, layout = bundle(tree)
    rows, value, flag = _roundtrip(buffer, layout)
    np.testing.assert_array_equal(rows, tree[0])
    assert float(value) == 2.5 and np.asarray(value).shape == ()
    assert bool(flag[0])


def test_eight_byte_items_and_mismatched_buffers_are_refused():
    with pytest.raises(ValueError, match="int64"):
        bundle((np.zeros(2, np.int64),))
    buffer, layout = bundle((np.zeros(3, np.int32),))
    with pytest.raises(ValueError, match="does not match"):
        unbundle(np.zeros(buffer.size + 4, np.uint8), layout)


def test_unbundle_shapes_gives_each_leaf_its_shape_without_a_buffer():
    inputs = _example(np.random.default_rng(3), rows=4)
    _, layout = bundle(inputs)
    shapes = unbundle_shapes(layout)
    assert shapes.table == (4, 3) and shapes.ids == (7,) and shapes.none_field is None
    assert shapes.static_flag is True
