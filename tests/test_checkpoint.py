"""The lazy checkpoint reader: sharded input, exact tensors, strict headers, refused inputs."""

import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from so8t_core.errors import CheckpointError
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.fingerprint import fingerprint
from so8t_core.source.safetensors_format import parse_header


def raw_safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_sharded_checkpoint_reads_every_tensor_exactly(make_fixture):
    path = make_fixture(shards=3, layers=3)
    ckpt = Checkpoint.open(path)
    assert len(ckpt.shards) == 3 and ckpt.weight_format == "safetensors"
    expected = {}
    for shard in ckpt.shards:
        expected.update(load_file(shard))
    assert set(ckpt.tensors) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(ckpt.read(name), array)
        assert ckpt.tensors[name].file.endswith(
            json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"][name])


def test_reads_only_the_byte_range_of_one_tensor(make_fixture, monkeypatch):
    ckpt = Checkpoint.open(make_fixture(shards=2, layers=3))
    from so8t_core import storage

    reads = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, start=None, end=None: reads.append((start, end))
                        or real(uri, start, end))
    name = "model.layers.1.mlp.down_proj.weight"
    ckpt.read(name)
    e = ckpt.tensors[name]
    assert reads == [(e.start, e.end)]
    assert e.end - e.start == 64 * 128 * 4


def test_bfloat16_and_float16_decode_exactly(tmp_path):
    values = torch.randn(4, 8)
    from safetensors.torch import save_file as save_torch

    (tmp_path / "config.json").write_text("{}")
    save_torch({"a": values.to(torch.bfloat16), "b": values.to(torch.float16)}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint.open(str(tmp_path))
    np.testing.assert_array_equal(ckpt.read("a"), values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(ckpt.read("b"), values.to(torch.float16).float().numpy())


def test_fingerprint_is_stable_and_independent_of_sharding(make_fixture):
    one = fingerprint(Checkpoint.open(make_fixture(shards=1, seed=3)))
    three = fingerprint(Checkpoint.open(make_fixture(shards=3, seed=3)))
    other = fingerprint(Checkpoint.open(make_fixture(shards=1, seed=4)))
    assert one.fingerprint == three.fingerprint != other.fingerprint
    assert one.tensor_sha256 == three.tensor_sha256
    assert one.fingerprint == fingerprint(Checkpoint.open(make_fixture(shards=1, seed=3))).fingerprint


# --- header parser: every malformed header is refused with a one-line reason -----------------

GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("header, data_len, message", [
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, 8, "past the end"),
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "gap"),
    ({"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, 16, "needs 24 bytes"),
    ({"a": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, 16, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, 16, "invalid"),
    ({"a": {"dtype": "F32", "shape": [4]}}, 16, "exactly dtype, shape, data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "not described"),
    ({"__metadata__": {"k": 1}}, 0, "strings to strings"),
])
def test_bad_headers_are_refused(header, data_len, message):
    h = json.dumps(header).encode()
    with pytest.raises(CheckpointError, match=message) as exc:
        parse_header(h, 8 + len(h) + data_len, "x.safetensors")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("x.safetensors: ")


def test_duplicate_keys_and_non_json_headers_are_refused():
    dup = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], ' \
          b'"data_offsets": [0, 4]}}'
    with pytest.raises(CheckpointError, match="duplicate key"):
        parse_header(dup, 8 + len(dup) + 4, "x")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        parse_header(b"\xff\xfe{", 100, "x")


def _folder(tmp_path, files: dict[str, bytes], config: dict | None = None) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return str(tmp_path)


def test_truncated_and_lying_files_are_refused(tmp_path):
    good = raw_safetensors(GOOD, bytes(24))
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(_folder(tmp_path, {"model.safetensors": good[:-5]}))
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        Checkpoint.open(_folder(tmp_path, {"model.safetensors": good[:5]}))
    huge = struct.pack("<Q", 1 << 60) + b"{}"
    with pytest.raises(CheckpointError, match="claims"):  # no giant allocation attempted
        Checkpoint.open(_folder(tmp_path, {"model.safetensors": huge}))
    bitflip = bytearray(good)
    bitflip[8 + 5] ^= 0x40  # corrupt the JSON
    with pytest.raises(CheckpointError):
        Checkpoint.open(_folder(tmp_path, {"model.safetensors": bytes(bitflip)}))


def test_missing_config_and_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(raw_safetensors(GOOD, bytes(24)))
    with pytest.raises(CheckpointError, match="missing config.json"):
        Checkpoint.open(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        Checkpoint.open(str(empty))
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        Checkpoint.open(str(tmp_path / "nowhere"))


def test_index_cannot_point_outside_the_folder(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(raw_safetensors(GOOD, bytes(24)))
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    for target in ("../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."):
        index = {"weight_map": {"a": target}}
        folder = _folder(ckpt_dir, {"model.safetensors.index.json": json.dumps(index).encode()})
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            Checkpoint.open(folder)


def test_missing_shard_and_index_shard_disagreement(make_fixture, tmp_path):
    src = make_fixture(shards=2)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    os.remove(broken / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="missing shard") as exc:
        Checkpoint.open(str(broken))
    assert "model-00002-of-00002.safetensors" in str(exc.value)

    lying = tmp_path / "lying"
    shutil.copytree(src, lying)
    index = json.loads((lying / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="listed in the index is not in this shard"):
        Checkpoint.open(str(lying))


def test_nan_weights_are_refused_when_read(tmp_path):
    save_file({"w": np.array([1.0, np.nan, np.inf], dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="2 NaN/Inf values"):
        Checkpoint.open(str(tmp_path)).read("w")


def test_pytorch_bin_plain_state_dict_is_accepted(tmp_path):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint.open(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert ckpt.weight_format == "pytorch-bin"
    np.testing.assert_array_equal(ckpt.read("w"), state["w"].numpy())
    np.testing.assert_array_equal(ckpt.read("b"), np.ones(3, dtype=np.float32))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    _RunsCode.marker = str(tmp_path / "PWNED")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _RunsCode()}, f, protocol=2)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="refused to load") as exc:
        Checkpoint.open(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(exc.value)
    assert not os.path.exists(_RunsCode.marker)
