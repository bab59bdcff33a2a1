"""Arrow columns of numbers and of vectors, written and read without copies.

Vectors (xyz, features, descriptors) are stored one row per value of a fixed-size binary column
holding the row's little-endian numbers: Parquet decodes it about 15x faster than a
fixed_size_list, which carries a repetition level per number. The field's metadata names the
dtype and width, so that other readers can decode it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

XYZ_DTYPE, FEATURE_DTYPE = np.dtype("<f8"), np.dtype("<f2")


def vector_field(name: str, dtype: np.dtype, width: int) -> pa.Field:
    return pa.field(name, pa.binary(dtype.itemsize * width),
                    metadata={"dtype": dtype.str, "width": str(width)})


def vector_column(values: np.ndarray, dtype: np.dtype, valid: np.ndarray | None = None) -> pa.FixedSizeBinaryArray:
    """(N, K) array -> N fixed-size binary values of K numbers each; `valid` (N,) bool: the rows
    that hold a value, the others null."""
    values = np.ascontiguousarray(values, dtype=dtype)
    validity = None if valid is None else pa.py_buffer(np.packbits(np.asarray(valid, bool), bitorder="little"))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(values.itemsize * values.shape[1]), len(values),
                                                [validity, pa.py_buffer(values)])


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def column_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column without nulls as one array, without a copy when it is one chunk; read from
    its buffer because Arrow's to_numpy imports pandas (0.7 s of a shard actor's first load)."""
    array = _one_array(column)
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(array.buffers()[1], dtype, count=len(array), offset=array.offset * dtype.itemsize)


def column_validity(column: pa.ChunkedArray) -> np.ndarray:
    """(N,) bool: the rows that are not null."""
    array = _one_array(column)
    if array.null_count == 0:
        return np.ones(len(array), bool)
    bits = np.unpackbits(np.frombuffer(array.buffers()[0], np.uint8), bitorder="little")
    return bits[array.offset:array.offset + len(array)].astype(bool)


def column_vectors(column: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    """vector_column's inverse: (N, K), without a copy when the column is one chunk."""
    array = _one_array(column)
    row_bytes = array.type.byte_width
    width = row_bytes // dtype.itemsize
    return np.frombuffer(array.buffers()[1], dtype, count=len(array) * width,
                         offset=array.offset * row_bytes).reshape(len(array), width)
