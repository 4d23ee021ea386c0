"""Storage helpers every stage shares: the per-process pinned-file cache, the local output file check."""

import pickle
from dataclasses import dataclass

import cloudpickle
import pytest

from so8t_core import storage
from so8t_core.errors import InputChangedError, StorageError, UnsupportedError


@dataclass
class Loaded:
    uri: str
    sha256: str


def test_a_pinned_file_is_read_once_and_a_changed_one_is_an_error(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"first")
    reads = []

    def load(uri):
        reads.append(uri)
        return Loaded(uri, storage.sha256_of(uri))

    cached = storage.Pinned(load, "the test file")
    sha = storage.sha256_of(str(path))
    assert cached(str(path), sha) is cached(str(path), sha) and len(reads) == 1
    path.write_bytes(b"second")
    with pytest.raises(InputChangedError, match="the test file changed during the run"):
        cached(str(path), "0" * 64)


def test_a_pinned_cache_travels_to_another_process_as_its_recipe():
    """Dask pickles the quantize task with the caches it uses: each worker gets an empty one."""
    from so8t_core.quantize.imatrix import load_imatrix, load_imatrix_cached

    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(load_imatrix_cached))
        assert copy.load is load_imatrix and copy.what == "the imatrix file" and copy is not load_imatrix_cached


def test_a_local_output_file_is_checked_before_any_work(tmp_path):
    assert storage.local_output_file(str(tmp_path / "sub" / "m.onnx"), ".onnx", "the ONNX file") == \
        str(tmp_path / "sub" / "m.onnx")
    assert (tmp_path / "sub").is_dir() and list((tmp_path / "sub").iterdir()) == []  # the probe is gone
    with pytest.raises(UnsupportedError, match="the ONNX file is written to a local path only"):
        storage.local_output_file("s3://bucket/m.onnx", ".onnx", "the ONNX file")
    with pytest.raises(UnsupportedError, match="must end in .gguf"):
        storage.local_output_file(str(tmp_path / "m.bin"), ".gguf", "the adapter GGUF")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(StorageError, match="is a folder"):
        storage.local_output_file(str(tmp_path / "dir.gguf"), ".gguf", "the adapter GGUF")
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        storage.local_output_file(str(tmp_path / "a-file" / "m.gguf"), ".gguf", "the adapter GGUF")
