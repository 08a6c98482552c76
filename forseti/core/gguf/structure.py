"""A bounded walk of a GGUF file's structure, before any reader trusts its counts.

``gguf.GGUFReader`` believes the counts a file states: a hostile array length makes it loop or
allocate practically without bound. This walk checks every count, length, type and offset
against the file's size and the policy format's limits first, and refuses with a reason.
"""

from __future__ import annotations

import contextlib
import math
import struct

from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from forseti.core.errors import ModelLoadError
from forseti.core.gguf import policy_format as fmt

WEIGHT_QTYPES = {
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.Q8_0,
}
_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}
_MAX_NAME = 1 << 10  # bytes in a key or tensor name
_MAX_STRING = 1 << 16  # bytes in a string value


def refuse(reason: str) -> ModelLoadError:
    return ModelLoadError(f"gguf policy refused: {reason}")


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise refuse(f"file ends inside {what} at byte {self.pos} (truncated?)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def string(self, what: str, limit: int) -> bytes:
        n = self.u64(f"{what} length")
        if n > limit:
            raise refuse(f"{what} is {n} bytes long; at most {limit} allowed")
        return self.take(n, what)


def _walk_value(cur: _Cursor, vtype: int, where: str, *, in_array: bool = False) -> None:
    try:
        t = GGUFValueType(vtype)
    except ValueError:
        raise refuse(f"{where}: unknown value type {vtype}") from None
    if t in _SCALAR_SIZES:
        cur.take(_SCALAR_SIZES[t], where)
    elif t == GGUFValueType.STRING:
        cur.string(where, _MAX_STRING)
    elif in_array:
        raise refuse(f"{where}: nested arrays are not part of the format")
    else:
        item = cur.u32(f"{where} item type")
        count = cur.u64(f"{where} length")
        if count > fmt.MAX_ARRAY:
            raise refuse(f"{where}: array of {count} items; at most {fmt.MAX_ARRAY} allowed")
        with contextlib.suppress(ValueError):
            size = _SCALAR_SIZES.get(GGUFValueType(item))
            if size is not None and count * size > len(cur.data) - cur.pos:
                raise refuse(f"{where}: array runs past the end of the file (truncated?)")
        for i in range(count):
            _walk_value(cur, item, f"{where}[{i}]", in_array=True)


def check_structure(data: bytes) -> None:
    """Every count, length and offset of the file fits the file and the format's limits."""
    cur = _Cursor(data)
    if len(data) < 4 or struct.unpack("<I", data[:4])[0] != GGUF_MAGIC:
        raise refuse("not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.u32("version")
    if version & 0xFFFF == 0:
        raise refuse("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise refuse(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > fmt.MAX_TENSORS:
        raise refuse(f"{n_tensors} tensors; a policy has at most {fmt.MAX_TENSORS}")
    if n_kv > fmt.MAX_KV:
        raise refuse(f"{n_kv} metadata keys; at most {fmt.MAX_KV} allowed")
    alignment = 32
    for _ in range(n_kv):
        name = cur.string("metadata key", _MAX_NAME).decode("utf-8", "replace")
        vtype = cur.u32(f"type of '{name}'")
        start = cur.pos
        _walk_value(cur, vtype, f"metadata '{name}'")
        if name == "general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = int(struct.unpack("<I", data[start : start + 4])[0])
            if alignment == 0 or alignment & (alignment - 1):
                raise refuse(f"general.alignment {alignment} is not a power of two")
    infos: list[tuple[str, int, int]] = []
    total = 0
    for _ in range(n_tensors):
        name = cur.string("tensor name", _MAX_NAME).decode("utf-8", "replace")
        n_dims = cur.u32(f"tensor '{name}' rank")
        if not 1 <= n_dims <= 2:
            raise refuse(f"tensor '{name}' has {n_dims} dimensions; policy tensors have 1 or 2")
        dims = [cur.u64(f"tensor '{name}' dims") for _ in range(n_dims)]
        if any(d < 1 or d > fmt.MAX_DIM for d in dims):
            raise refuse(f"tensor '{name}' dims {dims[::-1]} outside 1..{fmt.MAX_DIM}")
        raw_type = cur.u32(f"tensor '{name}' type")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise refuse(f"tensor '{name}' has unknown type {raw_type}") from None
        if qtype not in WEIGHT_QTYPES:
            raise refuse(f"tensor '{name}' is {qtype.name}; only F32, F16 and Q8_0 are served")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise refuse(f"tensor '{name}' rows of {dims[0]} do not split into {qtype.name} blocks")
        n = math.prod(dims)
        total += n
        if total > fmt.MAX_PARAMETERS * 2:
            raise refuse(f"tensors hold more than {fmt.MAX_PARAMETERS * 2} values")
        offset = cur.u64(f"tensor '{name}' offset")
        infos.append((name, offset, n // block * type_size))
    data_start = cur.pos + (-cur.pos % alignment)
    end = data_start
    for name, offset, nbytes in infos:
        if data_start + offset + nbytes > len(data):
            raise refuse(f"tensor '{name}' data runs past the end of the file (truncated?)")
        end = max(end, data_start + offset + nbytes)
    # The file ends after the last tensor, or after its padding: less is a cut, more is junk.
    padded = end + (-end % alignment)
    if infos and len(data) not in (end, padded):
        if len(data) < padded:
            raise refuse("file ends inside the padding after the last tensor (truncated?)")
        raise refuse(f"{len(data) - padded} unexpected bytes after the tensor data")
