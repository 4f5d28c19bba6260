"""The bulk metadata reader decodes every GGUF key-value type to what gguf.GGUFReader decodes."""

import gguf
import numpy as np
import pytest

from evalsuite.model.gguf_reader import BulkGGUFReader
from evalsuite.model.weights import WeightsError, load_gguf


def _every_kind_of_value(path, endianess):
    w = gguf.GGUFWriter(str(path), "gemma3", endianess=endianess)
    w.add_uint32("t.u32", 7)
    w.add_int64("t.i64", -5)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁world")
    w.add_array("t.strings", ["", "a", "▁the", "<0x0A>", "日本"] * 3)
    w.add_array("t.ints", [0, 3, -2**31, 2**31 - 1])  # int32 by GGUFWriter's choice
    w.add_array("t.floats", [0.1, -1e30, 3.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])  # nested arrays go through GGUFReader's own parser
    w.add_tensor("x", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_bulk_reader_decodes_what_gguf_reader_decodes(tmp_path, endianess):
    path = tmp_path / "kinds.gguf"
    _every_kind_of_value(path, endianess)
    reference = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    bulk = BulkGGUFReader(str(path))
    assert bulk.metadata == reference
    # the flat arrays took the bulk path (no parsed fields), the nested one GGUFReader's
    assert not {"t.strings", "t.ints", "t.floats", "t.bools"} & set(bulk.fields) and "t.nested" in bulk.fields
    assert {k: type(v) for k, v in bulk.metadata.items()} == {k: type(v) for k, v in reference.items()}
    assert bulk.metadata["t.strings"][-1] == "日本" and bulk.metadata["t.floats"][0] == np.float32(0.1)
    assert [t.name for t in bulk.tensors] == ["x"]
    assert bulk.tensors[0].data.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_kv_section_cut_inside_an_array(tmp_path):
    path = tmp_path / "kinds.gguf"
    _every_kind_of_value(path, gguf.GGUFEndian.LITTLE)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data.index(b"t.strings") + 60])  # inside the string array's elements
    with pytest.raises(WeightsError, match="cut.gguf: not a readable GGUF file"):
        load_gguf(cut)



def test_a_duplicate_key_is_refused_as_gguf_reader_refuses_it(tmp_path):
    path = tmp_path / "kinds.gguf"
    _every_kind_of_value(path, gguf.GGUFEndian.LITTLE)
    dup = tmp_path / "dup.gguf"
    dup.write_bytes(path.read_bytes().replace(b"t.bool\x07", b"t.ints\x07"))  # a scalar, then an array of that key
    with pytest.raises(KeyError, match="Duplicate t.ints"):
        gguf.GGUFReader(str(dup))
    with pytest.raises(WeightsError, match="dup.gguf: not a readable GGUF file .*Duplicate t.ints"):
        load_gguf(dup)
