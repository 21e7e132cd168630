"""serialization.serialize_into writes the same bytes as TFF's serializer."""

import collections

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization

from dpfl_tff import serialization

_STATE_TYPE = tff.FederatedType(
    tff.StructWithPythonType(
        [
            ("weights", tff.StructWithPythonType([tff.TensorType(np.float32, (3, 2)), tff.TensorType(np.float32, (2,))],
                                                 list)),
            ("step", tff.TensorType(np.int64)),
            ("empty", tff.StructWithPythonType([], tuple)),
        ],
        collections.OrderedDict,
    ),
    tff.SERVER,
)
_GROUP_TYPE = tff.FederatedType(
    tff.StructWithPythonType(
        [("orders", tff.TensorType(np.int32, (None, None))), ("lengths", tff.TensorType(np.int32, (None,)))],
        collections.OrderedDict,
    ),
    tff.CLIENTS,
)

_STATE = collections.OrderedDict(weights=[np.arange(6, dtype=np.float32).reshape(3, 2), np.ones(2, np.float32)],
                                 step=np.int64(4), empty=())
_GROUPS = [collections.OrderedDict(orders=np.zeros((2, 3), np.int32), lengths=np.array([3, 1], np.int32)),
           collections.OrderedDict(orders=np.zeros((0, 0), np.int32), lengths=np.zeros(0, np.int32))]


def _both(value, type_spec):
    theirs, _ = value_serialization.serialize_value(value, type_spec)
    ours = executor_pb2.Value()
    serialization.serialize_into(value, type_spec, ours)
    return theirs.SerializeToString(deterministic=True), ours.SerializeToString(deterministic=True)


@pytest.mark.parametrize(
    "value,type_spec",
    [
        (_STATE, _STATE_TYPE),
        (_GROUPS, _GROUP_TYPE),
        (np.float32(2.5), tff.TensorType(np.float32)),  # scalars: TFF's repeated-field encoding
        ([1.0, 2.0], tff.TensorType(np.float32, (2,))),  # a list converted by TFF
        (np.array(["a", "bc"], dtype=object), tff.TensorType(np.str_, (2,))),
    ],
    ids=["state", "groups", "scalar", "list-as-tensor", "strings"],
)
def test_same_bytes_as_tff(value, type_spec):
    theirs, ours = _both(value, type_spec)
    assert ours == theirs and len(ours) > 0


def test_wrong_struct_length_is_refused():
    with pytest.raises(TypeError):
        serialization.serialize_into([np.ones(2, np.float32)], _STATE_TYPE.member.weights, executor_pb2.Value())


def test_wrong_dtype_falls_back_to_tff_error():
    with pytest.raises((TypeError, ValueError)):
        serialization.serialize_into(np.ones(2, np.float64).astype(np.int64), tff.TensorType(np.float32, (2,)),
                                     executor_pb2.Value())


def _same_value(a, b):
    """Equal as values and as Python/NumPy types (Structs compared by names and elements)."""
    from tensorflow_federated.python.common_libs import structure

    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, structure.Struct):
        assert structure.name_list_with_nones(a) == structure.name_list_with_nones(b)
        for x, y in zip(structure.iter_elements(a), structure.iter_elements(b)):
            _same_value(x[1], y[1])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_value(x, y)
    else:
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).shape == np.asarray(b).shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "value,type_spec",
    [
        (_STATE, _STATE_TYPE),
        (_GROUPS, _GROUP_TYPE),
        (np.float32(2.5), tff.TensorType(np.float32)),
        (np.array([[1, 2]], np.int64), tff.TensorType(np.int64, (None, 2))),
        (np.array(["a", "bc"], dtype=object), tff.TensorType(np.str_, (2,))),
        (b"abc", tff.TensorType(np.str_)),
    ],
    ids=["state", "groups", "scalar", "unknown-dim", "strings", "string-scalar"],
)
def test_deserialize_reads_what_tff_reads(value, type_spec):
    proto, _ = value_serialization.serialize_value(value, type_spec)
    _same_value(serialization.deserialize(proto, type_spec), value_serialization.deserialize_value(proto, type_spec)[0])
