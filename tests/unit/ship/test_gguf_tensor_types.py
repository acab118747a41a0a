"""The K-quant report's tensor-type count (ship/gguf_writer._tensor_types) steps over the key-value section by hand
instead of letting gguf's GGUFReader build every value (seconds on Phi-4-mini's vocabulary): checked here against
GGUFReader on a file with every kind of key, arrays of strings and of numbers among them."""

import numpy as np

from qlora_phi3.ship.gguf_writer import _tensor_types


def test_tensor_types_match_gguf_s_own_reader(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_string("general.name", "probe")
    w.add_uint8("k.u8", 1), w.add_int16("k.i16", -2), w.add_uint32("k.u32", 3), w.add_int64("k.i64", -4)
    w.add_float32("k.f32", 0.5), w.add_float64("k.f64", 0.25), w.add_bool("k.bool", True)
    w.add_array("k.strings", ["a", "bb", "ccc"] * 50)
    w.add_array("k.ints", list(range(300)))
    w.add_array("k.floats", [0.5] * 7)
    w.add_tensor("a", np.ones((4, 32), dtype=np.float32))
    w.add_tensor("b", np.ones((2, 32), dtype=np.float16))
    w.add_tensor("c", np.ones((3, 32), dtype=np.float32))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("q", gguf.quants.quantize(np.ones((2, 64), dtype=np.float32), q8), raw_dtype=q8)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    expected: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        expected[t.tensor_type.name] = expected.get(t.tensor_type.name, 0) + 1
    assert _tensor_types(path) == expected == {"F32": 2, "F16": 1, "Q8_0": 1}
