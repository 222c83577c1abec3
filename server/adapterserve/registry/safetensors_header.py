"""The safetensors header, read and checked against the file without loading a tensor.

Format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data. Every field is
checked by type and range and every tensor's bytes must lie inside the file, so a
damaged or hostile file is refused here with a reason instead of failing later in a
reader (or in an engine).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself applies


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file; the message says why."""


def read_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype": str, "shape": [int], "data_offsets": [begin, end]}."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise HeaderError("is truncated (no header)")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise HeaderError(f"declares a header of {length} bytes (limit {MAX_HEADER_BYTES})")
        if 8 + length > size:
            raise HeaderError("is truncated (inside the header)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except RecursionError:
        raise HeaderError("has a header nested too deeply") from None
    except ValueError as exc:
        raise HeaderError(f"has a header that is not JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise HeaderError("has a header that is not a JSON object")
    data_bytes = size - 8 - length
    tensors: dict[str, dict] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _checked(key, meta)
        end = tensors[key]["data_offsets"][1]
        if end > data_bytes:
            raise HeaderError("is truncated")
    return tensors


def _checked(key: str, meta: object) -> dict:
    if not isinstance(meta, dict):
        raise HeaderError(f"describes tensor {key[:80]!r} with a non-object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise HeaderError(f"gives tensor {key[:80]!r} an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HeaderError(f"gives tensor {key[:80]!r} an invalid shape")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise HeaderError(f"gives tensor {key[:80]!r} invalid data offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]:
        raise HeaderError(f"gives tensor {key[:80]!r} offsets that do not match its shape and dtype")
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def element_count(header: dict[str, dict]) -> int:
    return sum(math.prod(meta["shape"]) for meta in header.values())


def safetensors_elements(folder: Path) -> int:
    """Elements of every tensor in the folder's safetensors files, from their headers."""
    return sum(element_count(read_header(file)) for file in sorted(Path(folder).glob("*.safetensors")))
