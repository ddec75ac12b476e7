"""Nested Python values <-> HDF5 groups and datasets, without pickle.

A value tree (dicts, lists, tuples, arrays, scalars, strings, None) maps onto
HDF5 one-to-one, so plain h5py sees ordinary datasets at ordinary paths::

    dict        -> group (links kept in insertion order)
    list/tuple  -> group with attribute hpctrain_type="list"/"tuple", members "0", "1", ...
    ndarray     -> dataset of the same dtype and shape (0-d arrays included)
    numpy scalar-> 0-d dataset, hpctrain_type="numpy_scalar"
    bool/int/float -> 0-d dataset (bool / int64 / float64), hpctrain_type="bool"/"int"/"float"
                   (ints beyond int64: UTF-8 decimal string, hpctrain_type="bigint")
    str         -> scalar UTF-8 string dataset, hpctrain_type="str"
    bytes       -> uint8 dataset, hpctrain_type="bytes"
    None        -> empty dataset, hpctrain_type="none"

Member names are the dict keys with ``%`` and ``/`` percent-escaped (``%25``,
``%2F``); the key ``"."`` is stored as ``%2E`` and the empty key as ``%``.
Reading back gives the same tree (types, dtypes, shapes, key order).
"""
import re

import h5py
import numpy as np

from hpctrain.errors import CheckpointError

TYPE_ATTR = "hpctrain_type"
# dtype kinds HDF5 stores natively: bool, signed/unsigned int, float, complex, bytes
ARRAY_KINDS = "biufcS"
STRING_DTYPE = h5py.string_dtype("utf-8")
_INT64 = np.iinfo(np.int64)


def escape(name):
    """HDF5 link name for the dict key ``name`` (a str)."""
    if not isinstance(name, str):
        raise TypeError(f"keys must be str, got {type(name).__name__} {name!r}")
    if name == "":
        return "%"
    out = name.replace("%", "%25").replace("/", "%2F")
    return "%2E" if out == "." else out


def unescape(link):
    """Inverse of ``escape``."""
    if link == "%":
        return ""
    return re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), link)


def check_array(value, where):
    """Raise TypeError unless ``value`` is an ndarray HDF5 stores natively."""
    if value.dtype.kind not in ARRAY_KINDS:
        raise TypeError(f"{where}: arrays of dtype {value.dtype} cannot be stored "
                        f"(supported kinds: bool, int, uint, float, complex, bytes)")


def write(parent, link, value, where):
    """Create ``parent[link]`` holding ``value``; ``where`` names it in errors."""
    if isinstance(value, dict):
        grp = parent.create_group(link, track_order=True)
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be str, got {type(key).__name__} {key!r}")
            write(grp, escape(key), item, f"{where}/{key}")
        return grp
    if isinstance(value, (list, tuple)):
        grp = parent.create_group(link, track_order=True)
        grp.attrs[TYPE_ATTR] = "tuple" if isinstance(value, tuple) else "list"
        for i, item in enumerate(value):
            write(grp, str(i), item, f"{where}/{i}")
        return grp
    if isinstance(value, np.ndarray):
        check_array(value, where)
        return parent.create_dataset(link, data=value)
    if isinstance(value, np.generic):
        check_array(np.asarray(value), where)
        return _typed(parent, link, value, "numpy_scalar")
    if isinstance(value, (bool, np.bool_)):
        return _typed(parent, link, np.bool_(value), "bool")
    if isinstance(value, int):
        if _INT64.min <= value <= _INT64.max:
            return _typed(parent, link, np.int64(value), "int")
        return _typed(parent, link, str(value), "bigint", dtype=STRING_DTYPE)
    if isinstance(value, float):
        return _typed(parent, link, np.float64(value), "float")
    if isinstance(value, str):
        return _typed(parent, link, value, "str", dtype=STRING_DTYPE)
    if isinstance(value, bytes):
        return _typed(parent, link, np.frombuffer(value, dtype=np.uint8), "bytes")
    if value is None:
        return _typed(parent, link, h5py.Empty("i1"), "none")
    raise TypeError(f"{where}: cannot store a value of type {type(value).__name__} "
                    f"(supported: dict, list, tuple, ndarray, numpy scalar, bool, int, float, "
                    f"str, bytes, None)")


def _typed(parent, link, data, kind, dtype=None):
    ds = parent.create_dataset(link, data=data, dtype=dtype)
    ds.attrs[TYPE_ATTR] = kind
    return ds


def kind_of(obj):
    """The ``hpctrain_type`` attribute of a group or dataset ("" when absent)."""
    kind = obj.attrs.get(TYPE_ATTR, "")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def is_row_array(obj):
    """True for a plain (untyped) dataset with at least one dimension."""
    return isinstance(obj, h5py.Dataset) and not kind_of(obj) and obj.ndim >= 1


def where(obj):
    """``file:/path`` of an HDF5 object, for messages (the file without its directory)."""
    import os
    return f"{os.path.basename(obj.file.filename)}:{obj.name}"


def check_storage(ds, at=None):
    """Raise CheckpointError unless dataset ``ds``'s declared size is stored in its file.

    hpctrain writes every dataset whole and without filters, so a dataset that declares
    more bytes than the file stores for it (a crafted header asking for a huge array), or
    that uses filters (whose output size is unbounded), is refused before it is read.
    """
    if ds.shape is None or ds.size == 0:
        return
    at = at or where(ds)
    if ds.id.get_create_plist().get_nfilters():
        raise CheckpointError(f"{at}: stored with HDF5 filters (compression), which hpctrain "
                              f"checkpoints never use")
    declared = int(ds.size) * ds.dtype.itemsize
    stored = ds.id.get_storage_size()
    if stored < declared:
        raise CheckpointError(f"{at}: declares {ds.dtype}{list(ds.shape)} ({declared} bytes) "
                              f"but the file stores {stored} bytes of it")


def read(obj):
    """The value tree stored at the group or dataset ``obj`` (inverse of ``write``).

    Raises:
        CheckpointError: naming ``file:/path`` of a member that is not a value tree.
    """
    kind = kind_of(obj)
    if isinstance(obj, h5py.Group):
        if kind in ("list", "tuple"):
            if sorted(obj) != sorted(str(i) for i in range(len(obj))):
                raise CheckpointError(f"{where(obj)}: {kind} members must be named "
                                      f"0..{len(obj) - 1}")
            items = [read(obj[str(i)]) for i in range(len(obj))]
            return tuple(items) if kind == "tuple" else items
        if kind:
            raise CheckpointError(f"{where(obj)}: unknown group type {kind!r}")
        return {unescape(link): read(obj[link]) for link in obj}
    if not isinstance(obj, h5py.Dataset):
        raise CheckpointError(f"{where(obj)}: not a group or dataset")
    check_storage(obj)
    if not kind:
        if obj.dtype.kind not in ARRAY_KINDS:
            raise CheckpointError(f"{where(obj)}: arrays of dtype {obj.dtype} are not part of "
                                  f"a checkpoint")
        return obj[...]
    readers = {
        "numpy_scalar": lambda: obj[()],
        "bool": lambda: bool(obj[()]),
        "int": lambda: int(obj[()]),
        "float": lambda: float(obj[()]),
        "bigint": lambda: int(obj.asstr()[()]),
        "str": lambda: obj.asstr()[()],
        "bytes": lambda: obj[...].tobytes(),
        "none": lambda: None,
    }
    if kind not in readers:
        raise CheckpointError(f"{where(obj)}: unknown dataset type {kind!r}")
    try:
        return readers[kind]()
    except (TypeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{where(obj)}: not a valid {kind} ({exc})") from None
