"""Read a GGUF file: its metadata and raw tensor views, in one pass over the header.

Why our own reader: gguf-py's `GGUFReader` wraps every element of every metadata array (49,152
vocabulary strings and 48,900 merges in SmolLM2's file) in its own numpy memmap view: ~2.5 s of
a ~5 s model load on our 2-core CPU. Reading the same bytes with `struct` takes ~0.1 s.
`dequantize` turns Q8_0 and Q4_1 blocks into floats with whole-tensor numpy ops and hands other
types to gguf-py. Tests compare both with gguf-py: fields, tensor bytes and dequantised values.

Layout (GGUF v2/v3, little-endian): b"GGUF", u32 version, u64 tensor count, u64 key/value count;
the key/value pairs (string key, u32 value type, value); one info per tensor (string name,
u32 n_dims, u64 dims fastest-first, u32 ggml type, u64 offset into the data section); padding
to `general.alignment` (default 32); the data section. A string is a u64 byte length + UTF-8.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file we can read; the message names the file and what is wrong."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: not a readable GGUF file ({problem})")


@dataclass
class GGUFTensor:
    name: str
    type: GGMLQuantizationType
    dims: tuple[int, ...]  # as GGUF lists them: fastest-varying first (columns, rows)
    data: np.ndarray  # raw bytes, shaped (rows..., bytes per row): what gguf.quants.dequantize takes


class _Cursor:
    """Reads values off a buffer, front to back."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error(f"a string of {n} bytes runs past the end")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY:  # numbers: one numpy read (e.g. 49,152 token types)
                a = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=n, offset=self.pos)
                self.pos += a.nbytes
                return a.copy()
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        return self.scalar(_SCALAR[vtype])


def read_gguf_file(path: str | os.PathLike) -> tuple[dict, list[GGUFTensor]]:
    """(metadata {key: value}, tensors) of a GGUF file. Tensor data are views into a read-only
    memory map of the file: nothing is copied until a tensor is dequantised."""
    path = str(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFError(path, "empty file") from None
    r = _Cursor(memoryview(buf))
    try:
        if bytes(r.buf[:4]) != b"GGUF":
            raise GGUFError(path, f"no GGUF magic at the start: {bytes(r.buf[:4])!r}")
        r.pos = 4
        version = r.scalar("<I")
        if version not in (2, 3):
            raise GGUFError(path, f"GGUF version {version}; medlora reads versions 2 and 3")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = r.string()
            dims = tuple(r.scalar("<Q") for _ in range(r.scalar("<I")))
            infos.append((name, r.scalar("<I"), dims, r.scalar("<Q")))
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise GGUFError(path, f"truncated or corrupt header at byte {r.pos}: {e}") from None
    align = int(meta.get("general.alignment", 32))
    start = (r.pos + align - 1) // align * align
    tensors = []
    for name, type_id, dims, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(path, f"tensor {name}: unknown ggml type {type_id}") from None
        if not dims or dims[0] % block:
            raise GGUFError(path, f"tensor {name}: {dims[0] if dims else 0} columns is not a multiple of "
                                  f"{qtype.name}'s block of {block}")
        row_bytes, rows = dims[0] // block * block_bytes, int(np.prod(dims[1:], dtype=np.int64))
        end = start + offset + rows * row_bytes
        if end > len(buf):
            raise GGUFError(path, f"truncated: tensor {name} ends at byte {end}, the file has {len(buf)} bytes")
        data = np.frombuffer(buf, dtype=np.uint8, count=rows * row_bytes, offset=start + offset)
        tensors.append(GGUFTensor(name, qtype, dims, data.reshape(*reversed(dims[1:]), row_bytes)))
    return meta, tensors


def dequantize(t: GGUFTensor) -> np.ndarray:
    """fp32 values shaped (rows..., columns). Q8_0 and Q4_1 (the bundled file's types) in a few
    whole-tensor numpy ops (gguf-py loops over row groups: ~0.6 s more per load); other types
    through gguf-py. Tests check both agree bit for bit."""
    if t.type == GGMLQuantizationType.Q8_0:  # per 32 weights: fp16 scale d, 32 int8 q; w = d * q
        blocks = t.data.reshape(-1, 34)
        out = blocks[:, :2].view(np.float16).astype(np.float32) * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif t.type == GGMLQuantizationType.Q4_1:  # fp16 scale d, fp16 min m, 16 bytes of 4-bit q (low nibbles first)
        blocks = t.data.reshape(-1, 20)
        d, m = (blocks[:, i:i + 2].view(np.float16).astype(np.float32) for i in (0, 2))
        q = np.concatenate([blocks[:, 4:] & 0x0F, blocks[:, 4:] >> 4], axis=1).astype(np.float32)
        out = d * q + m
    else:
        from gguf.quants import dequantize as gguf_dequantize

        out = gguf_dequantize(t.data, t.type).astype(np.float32)
    return out.reshape(tuple(reversed(t.dims)))
