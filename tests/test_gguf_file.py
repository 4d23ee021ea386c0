"""GGUF writer and reader mirror each other, and llama.cpp reads what the writer writes."""

import gguf
import numpy as np
import pytest

from so8t_core.errors import ValidationError
from so8t_core.gguf_file import (
    GGUFKV,
    TensorInfo,
    gguf_size,
    kv_array,
    kv_bool,
    kv_f32,
    kv_str,
    kv_u32,
    read_gguf,
    tensor_nbytes,
    write_gguf,
)
from so8t_core.quantize.engines import dequantize, quantize


def test_round_trip_of_metadata_and_tensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((3, 64)).astype(np.float32),
              "b.weight": rng.standard_normal((2, 32)).astype(np.float32),
              "c.bias": rng.standard_normal(5).astype(np.float32)}
    types = {"a.weight": gguf.GGMLQuantizationType.Q8_0, "b.weight": gguf.GGMLQuantizationType.F16,
             "c.bias": gguf.GGMLQuantizationType.F32}
    data = {n: quantize(a, types[n]) for n, a in arrays.items()}
    kvs = [kv_str("general.name", "round trip ✓"), kv_u32("x.count", 7), kv_f32("x.eps", 1e-5),
           kv_bool("x.flag", True), kv_array("x.ids", [3, 1, 2], gguf.GGUFValueType.UINT32),
           kv_array("x.names", ["a", "ß", ""], gguf.GGUFValueType.STRING),
           GGUFKV("x.i64", -5, gguf.GGUFValueType.INT64)]
    infos = [TensorInfo(n, a.shape, types[n], tensor_nbytes(a.shape, types[n])) for n, a in arrays.items()]
    path = str(tmp_path / "t.gguf")
    write_gguf(path, "testarch", kvs, infos, lambda t: data[t.name])

    g = read_gguf(path)
    assert g.value("general.architecture") == "testarch"
    assert list(g.metadata)[:1] == ["general.architecture"]
    assert g.value("general.name") == "round trip ✓" and g.value("x.count") == 7
    assert g.value("x.eps") == pytest.approx(1e-5) and g.value("x.flag") is True
    assert g.value("x.ids") == [3, 1, 2] and g.value("x.names") == ["a", "ß", ""] and g.value("x.i64") == -5
    assert [t.name for t in g.tensors] == list(arrays)
    for name, array in arrays.items():
        t = g.tensor(name)
        assert t.tensor_type == types[name] and g.numpy_shape(t) == array.shape
        assert np.ascontiguousarray(t.data).tobytes() == data[name]
        np.testing.assert_array_equal(g.dequantized(t), dequantize(data[name], types[name], array.shape))
    # every tensor's data offset is aligned to 32 bytes, as ggml requires
    assert all(t.data_offset % 32 == 0 for t in g.tensors)


def test_the_size_of_a_file_is_known_before_it_is_written(tmp_path, make_fixture):
    """gguf_size mirrors write_gguf byte for byte: keys of every value type, odd lengths that need
    padding, no architecture (an imatrix file); and a model's whole file from its plan alone."""
    kvs = [kv_str("general.name", "ß" * 7), kv_u32("x.count", 7), kv_f32("x.eps", 1e-5), kv_bool("x.flag", True),
           kv_array("x.names", ["a", "ß", ""], gguf.GGUFValueType.STRING),
           GGUFKV("x.i64", -5, gguf.GGUFValueType.INT64), kv_array("x.ids", [3, 1, 2], gguf.GGUFValueType.UINT8)]
    infos = [TensorInfo("a.weight", (3, 32), gguf.GGMLQuantizationType.Q8_0, 102),
             TensorInfo("c", (5,), gguf.GGMLQuantizationType.F32, 20)]
    for arch in ("testarch", None):
        path = tmp_path / f"{arch}.gguf"
        write_gguf(str(path), arch, kvs, infos, lambda t: bytes(t.nbytes))
        assert gguf_size(arch, kvs, infos) == path.stat().st_size

    from so8t_core.analysis import checkpoint_model
    from so8t_core.assemble.model import model_file_size
    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.constants import quant_type
    from so8t_core.source.checkpoint import Checkpoint

    ckpt = Checkpoint.open(make_fixture())
    made = convert_sequential(ckpt, "F32", str(tmp_path / "m-F32.gguf"), str(tmp_path / "staging"), name="m")
    _, _, plan = checkpoint_model(ckpt)
    tensors = [(p.gguf_name, tuple(p.shape), gguf.GGMLQuantizationType.F32) for p in plan]
    assert any(s.bake_error for s in made.staged)  # a baked SO8T model: so8t.max_bake_error is in the file
    assert model_file_size(ckpt, quant_type("F32"), "m", tensors) == made.files[0].size


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "t.gguf"
    info = TensorInfo("a.weight", (2, 32), gguf.GGMLQuantizationType.F32, 256)
    with pytest.raises(AssertionError):
        write_gguf(str(path), "x", [], [info], lambda t: b"short")
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("content, message", [
    (b'{"general.architecture": "so8t"}', "looks like JSON"),
    (b"PK\x03\x04not a gguf", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00\xff\xff", "corrupt GGUF file"),
])
def test_reader_refuses_fake_and_corrupt_files(tmp_path, content, message):
    path = tmp_path / "fake.gguf"
    path.write_bytes(content)
    with pytest.raises(ValidationError, match=message) as exc:
        read_gguf(str(path))
    assert "\n" not in str(exc.value)
