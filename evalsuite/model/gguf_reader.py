"""gguf.GGUFReader with its metadata arrays read in bulk.

GGUFReader parses every key-value field into numpy views, one view (two for a string) per array
element. Gemma's vocabulary is three arrays of 262,144 entries (tokens, scores, token types), so
that parse took 23 s of a 40 s process start on the 270M (py-spy, 2 cores), longer than
dequantizing the weights. Here an array of numbers is one view of the file and an array of strings
is one pass over its length-prefixed bytes; the arrays land in `metadata` as Python lists, the same
values GGUFReader's `ReaderField.contents()` returns. Scalars, strings and nested arrays still go
through GGUFReader's own parser (there are a few dozen), and so do the tensor infos and tensors.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField


class BulkGGUFReader(GGUFReader):
    """`metadata`: every key-value pair decoded (GGUF.* header fields excluded); `fields` holds
    GGUFReader's parsed fields for all but the bulk-read arrays."""

    def __init__(self, path, mode="r"):
        self.metadata: dict[str, Any] = {}
        super().__init__(path, mode)

    def _build_fields(self, offs: int, count: int) -> int:
        # Overrides GGUFReader's private pass over the key-value section (gguf==0.19.0, pinned).
        for _ in range(count):
            orig_offs = offs
            klen, kdata = self._get_str(offs)
            offs += int(klen.nbytes + kdata.nbytes)
            key = str(bytes(kdata), encoding="utf-8")
            if key in self.metadata:  # GGUFReader's _push_field refuses these; the bulk path must too
                raise KeyError(f"Duplicate {key} already in list at offset {orig_offs}")
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            if raw_type[0] == GGUFValueType.ARRAY and self._get(offs, np.uint32)[0] != GGUFValueType.ARRAY:
                self.metadata[key], size = self._bulk_array(offs)
                offs += size
                continue
            size, parts, idxs, types = self._get_field_parts(offs, raw_type[0])
            field = ReaderField(orig_offs, key, [klen, kdata, raw_type, *parts], [i + 3 for i in idxs], types)
            self._push_field(field, skip_sum=True)
            self.metadata[key] = field.contents()
            offs += size
        return offs

    def _bulk_array(self, offs: int) -> tuple[list, int]:
        """The array at `offs` (element type, length, elements) as a list, and its size in bytes."""
        itype = GGUFValueType(int(self._get(offs, np.uint32)[0]))
        n = int(self._get(offs + 4, np.uint64)[0])
        start = offs + 12
        if itype == GGUFValueType.STRING:
            order = "<" if (sys.byteorder == "little") == (self.byte_order == "I") else ">"
            buf = memoryview(self.data)
            out, pos = [], start
            for _ in range(n):
                (slen,) = struct.unpack_from(order + "Q", buf, pos)
                out.append(str(buf[pos + 8:pos + 8 + slen], encoding="utf-8"))
                pos += 8 + slen
            if pos > len(buf):
                raise ValueError(f"array of {n} strings runs past the end of the file")
            return out, pos - offs
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:
            raise ValueError(f"Unknown/unhandled array element type {itype}")
        values = self._get(start, nptype, n)
        if len(values) != n:
            raise ValueError(f"array of {n} {itype.name} runs past the end of the file")
        return values.tolist(), start + int(values.nbytes) - offs
