"""Which rank owns a (table, id): the routing hash of the sharded embedding.

The owner of id ``key`` of table ``table_id`` among ``world_size`` ranks is::

    mix64(z)  = splitmix64 finaliser:
                z ^= z >> 30; z *= 0xBF58476D1CE4E5B9
                z ^= z >> 27; z *= 0x94D049BB133111EB
                z ^= z >> 31                              (all mod 2^64)
    salt(t)   = mix64((t + 1) * 0x9E3779B97F4A7C15 mod 2^64)
    owner     = mix64(uint64(key) ^ salt(table_id)) mod world_size

``uint64(key)`` is the two's-complement bit pattern of the int64 id. The salt
makes tables route independently (id 7 of two tables lands on different ranks),
and mixing after the xor spreads consecutive or strided ids evenly. Any tool can
reproduce the placement from this formula; ``owner_of_reference`` is the plain
NumPy version, and ``owner_of`` (the Cython kernel) agrees with it bit for bit.
"""
import numpy as np

from hpctrain._kernels import sparse_ops

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _as_keys(keys):
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.dtype.kind not in "iu":
        raise ValueError(f"keys must be a 1-D integer array, got {keys.dtype}{list(keys.shape)}")
    return np.ascontiguousarray(keys, dtype=np.int64)


def _check_world(world_size):
    if int(world_size) < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return int(world_size)


def mix64_reference(z):
    """splitmix64's finaliser on a uint64 array (NumPy wraps multiplication mod 2^64)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def route_salt_reference(table_id):
    """``salt(table_id) = mix64((table_id + 1) * 0x9E3779B97F4A7C15)``."""
    with np.errstate(over="ignore"):
        t = np.uint64(np.int64(table_id).astype(np.uint64) + np.uint64(1)) * _GAMMA
    return mix64_reference(t)


def owner_of_reference(table_id, keys, world_size):
    """Plain NumPy owner ranks (int32[n]); the definition ``owner_of`` must match."""
    keys = _as_keys(keys)
    world_size = _check_world(world_size)
    z = keys.view(np.uint64) ^ route_salt_reference(table_id)
    return (mix64_reference(z) % np.uint64(world_size)).astype(np.int32)


def owner_of(table_id, keys, world_size):
    """Owner rank of every id of table ``table_id`` among ``world_size`` ranks.

    Args:
        table_id: the table's integer id (``TableSpec.table_id``).
        keys: int64[n] ids.
        world_size: number of ranks holding shards.

    Returns:
        int32[n] ranks in ``[0, world_size)`` (see the module docstring for the hash).
    """
    return sparse_ops.route(_as_keys(keys), int(table_id), _check_world(world_size))
