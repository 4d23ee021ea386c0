"""Fuzzing the parsers of untrusted input: every outcome is a result or an So8tError.

Hypothesis mutates small valid inputs (and builds headers from scratch) for the safetensors
header parser, the GGUF reader and the checkpoint reader (with the preflight the CLI runs
before a conversion). Anything else (another exception type, a hang, a giant allocation) is
a bug. Each example runs under an alarm and with its Python/numpy allocations traced.

Bounded for CI (a few seconds each, derandomized so a run is reproducible). For a longer,
random search: ``SO8T_FUZZ_SCALE=50 SO8T_FUZZ_RANDOM=1 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from so8t_core.errors import So8tError
from so8t_core.source.safetensors_format import DTYPE_SIZES, FLOAT_DTYPES, decode_float, header_length, parse_header

SCALE = float(os.environ.get("SO8T_FUZZ_SCALE", "1"))
SECONDS_PER_EXAMPLE = 10  # a hang, not a slow example
MAX_TRACED_BYTES = 256 << 20  # "no giant allocations": far above what these tiny inputs need


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    derandomize=not os.environ.get("SO8T_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(BaseException):  # not an Exception: no `except Exception` in the code under test swallows it
    pass


def _alarm(signum, frame):
    raise Hang(f"no result after {SECONDS_PER_EXAMPLE} s")


@contextmanager
def only_results_or_so8t_errors():
    """Run one example: So8tError is an allowed outcome; a hang or a giant allocation is not."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_EXAMPLE)
    try:
        yield
    except So8tError as exc:
        assert "\n" not in str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
    assert peak < MAX_TRACED_BYTES, f"allocated {peak} bytes"


# --- mutations of valid bytes ---------------------------------------------------------------------

def mutations(size: int, hot: int) -> st.SearchStrategy:
    """Edits of a ``size``-byte input, most of them in its first ``hot`` bytes (the header)."""
    pos = st.one_of(st.integers(0, max(hot - 1, 0)), st.integers(0, max(size - 1, 0)))
    edit = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("u64"), pos, st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**60, 2**63, 2**64 - 1])),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16)),
        st.tuples(st.just("truncate"), pos, st.just(0)),
    )
    return st.lists(edit, min_size=1, max_size=4)


def apply(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for op, pos, arg in edits:
        pos = min(pos, len(out))
        if op == "flip" and pos < len(out):
            out[pos] ^= 1 << arg
        elif op == "set" and pos < len(out):
            out[pos] = arg
        elif op == "u64":
            out[pos:pos + 8] = arg.to_bytes(8, "little")
        elif op == "insert":
            out[pos:pos] = arg
        elif op == "delete":
            del out[pos:pos + arg]
        elif op == "truncate":
            del out[pos:]
    return bytes(out)


# --- safetensors header parser ----------------------------------------------------------------------

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


VALID_ST = safetensors_bytes({
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    "c": {"dtype": "F16", "shape": [], "data_offsets": [32, 34]},
    "d": {"dtype": "I8", "shape": [0, 5], "data_offsets": [34, 34]},
    "e": {"dtype": "F64", "shape": [1, 1], "data_offsets": [34, 42]},
}, bytes(range(42)))


def parse_safetensors(data: bytes) -> None:
    """What read_safetensors_header and Checkpoint.read do with a file's bytes."""
    n = header_length(data[:8], len(data), "fuzz.safetensors")
    header = parse_header(data[8:8 + n], len(data), "fuzz.safetensors")
    for t in header.tensors.values():
        assert header.data_start <= t.start <= t.end <= len(data)
        raw = data[t.start:t.end]
        if t.dtype in FLOAT_DTYPES:
            assert decode_float(raw, t.dtype, t.shape, "fuzz").shape == t.shape


@fuzz_settings(300)
@given(mutations(len(VALID_ST), int.from_bytes(VALID_ST[:8], "little") + 8))
def test_fuzz_safetensors_mutated(edits):
    with only_results_or_so8t_errors():
        parse_safetensors(apply(VALID_ST, edits))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
dims = st.one_of(st.integers(0, 8), st.integers(-1, 2**70), json_values)
entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(sorted(DTYPE_SIZES)), st.sampled_from(["F33", "", "f32"]), json_values),
    "shape": st.one_of(st.lists(dims, max_size=4), st.lists(st.integers(0, 3), max_size=70), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-1, 2**65), min_size=2, max_size=2),
                              st.lists(st.integers(0, 256), min_size=2, max_size=2), json_values),
}, optional={"extra": json_values})
headers = st.dictionaries(st.one_of(st.text(max_size=12), st.just("__metadata__")),
                          st.one_of(entries, json_values), max_size=5)


@fuzz_settings(300)
@given(headers, st.integers(0, 512))
def test_fuzz_safetensors_generated_headers(header, data_len):
    with only_results_or_so8t_errors():
        parse_safetensors(safetensors_bytes(header, bytes(data_len)))


@fuzz_settings(100)
@given(st.binary(max_size=256))
def test_fuzz_safetensors_random_bytes(data):
    with only_results_or_so8t_errors():
        parse_safetensors(data)


# --- GGUF reader ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_gguf(scratch) -> bytes:
    import gguf

    from so8t_core.gguf_file import (
        GGUFKV,
        TensorInfo,
        kv_array,
        kv_bool,
        kv_f32,
        kv_str,
        kv_u32,
        tensor_nbytes,
        write_gguf,
    )
    from so8t_core.quantize.engines import quantize

    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((2, 32)).astype(np.float32),
              "b.bias": rng.standard_normal(4).astype(np.float32)}
    types = {"a.weight": gguf.GGMLQuantizationType.Q8_0, "b.bias": gguf.GGMLQuantizationType.F32}
    data = {n: quantize(a, types[n]) for n, a in arrays.items()}
    kvs = [kv_str("general.name", "fuzz"), kv_u32("x.count", 7), kv_f32("x.eps", 1e-5), kv_bool("x.flag", True),
           kv_array("x.ids", [3, 1, 2], gguf.GGUFValueType.UINT32),
           kv_array("x.names", ["a", "ß", ""], gguf.GGUFValueType.STRING),
           GGUFKV("x.i64", -5, gguf.GGUFValueType.INT64)]
    infos = [TensorInfo(n, a.shape, types[n], tensor_nbytes(a.shape, types[n])) for n, a in arrays.items()]
    path = str(scratch / "valid.gguf")
    write_gguf(path, "llama", kvs, infos, lambda t: data[t.name])
    return open(path, "rb").read()


@fuzz_settings(200)
@given(data=st.data())
def test_fuzz_gguf_reader(valid_gguf, scratch, data):
    from so8t_core.gguf_file import read_gguf
    from so8t_core.validate.inspection import inspect_gguf, render_inspection

    edits = data.draw(mutations(len(valid_gguf), len(valid_gguf) - 160))  # the last 160 bytes: tensor data
    path = str(scratch / "mutated.gguf")
    with open(path, "wb") as f:
        f.write(apply(valid_gguf, edits))
    with only_results_or_so8t_errors():
        render_inspection(inspect_gguf(path))
        g = read_gguf(path)
        for t in g.tensors:
            g.dequantized(t)


# --- checkpoint reader and preflight ----------------------------------------------------------------

CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer_config.json")
CONFIG_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
               "max_position_embeddings", "tie_word_embeddings", "so8t", "so8t_integrated")
config_values = st.one_of(json_values, st.integers(-1, 300), st.sampled_from([0, 1, 2, 3, 8, 16, 32, 64, 128, 384]),
                          st.fixed_dictionaries({"version": st.sampled_from([1, 2]),
                                                 "rotation": st.sampled_from(["cayley", "expm", "x"]),
                                                 "position": st.sampled_from(["pre_o_proj", "post_o_proj", 1])}))


def read_everything(folder: str) -> None:
    from so8t_core.analysis import preflight
    from so8t_core.source.checkpoint import Checkpoint

    ckpt = Checkpoint.open(folder, cache_dir=os.path.join(folder, ".cache"))
    for name, entry in ckpt.tensors.items():
        if entry.dtype in FLOAT_DTYPES:
            ckpt.read(name)
            if entry.shape:
                ckpt.read_rows(name, 0, min(2, entry.shape[0]))
    preflight(folder)


class Files(dict):
    """File name -> bytes of a checkpoint folder (short repr: Hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return f"<checkpoint files {sorted(self)}>"


@pytest.fixture(scope="module")
def fixture_files(make_fixture) -> Files:
    src = make_fixture()
    return Files({name: open(os.path.join(src, name), "rb").read() for name in os.listdir(src)})


def checkpoint_folder(files: dict[str, bytes]) -> str:
    folder = tempfile.mkdtemp(prefix="fuzz-ckpt-")
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return folder


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_checkpoint_bytes(fixture_files, data):
    name = data.draw(st.sampled_from(CHECKPOINT_FILES))
    original = fixture_files[name]
    hot = int.from_bytes(original[:8], "little") + 8 if name.endswith(".safetensors") else len(original)
    files = dict(fixture_files, **{name: apply(original, data.draw(mutations(len(original), hot)))})
    folder = checkpoint_folder(files)
    try:
        with only_results_or_so8t_errors():
            read_everything(folder)
    finally:
        shutil.rmtree(folder)


@fuzz_settings(60)
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), config_values, min_size=1, max_size=3))
def test_fuzz_checkpoint_config(fixture_files, changes):
    config = json.loads(fixture_files["config.json"])
    config.update(changes)
    folder = checkpoint_folder(dict(fixture_files, **{"config.json": json.dumps(config).encode()}))
    try:
        with only_results_or_so8t_errors():
            read_everything(folder)
    finally:
        shutil.rmtree(folder)


# --- what the fuzzer found, kept as plain regression tests ------------------------------------------

def _with_dims(gguf_bytes: bytes, ne0: int, ne1: int) -> bytes:
    """The valid GGUF with tensor a.weight's dimensions (ggml order: ne0 = row length) replaced."""
    at = gguf_bytes.index(b"a.weight") + len(b"a.weight")
    assert gguf_bytes[at:at + 4] == (2).to_bytes(4, "little")  # n_dims
    return gguf_bytes[:at + 4] + struct.pack("<QQ", ne0, ne1) + gguf_bytes[at + 20:]


def test_gguf_tensor_with_a_zero_dimension_reads_as_empty(valid_gguf, scratch):
    from so8t_core.gguf_file import read_gguf

    path = scratch / "zero.gguf"
    path.write_bytes(_with_dims(valid_gguf, 32, 0))
    g = read_gguf(str(path))
    assert g.dequantized(g.tensor("a.weight")).shape == (0, 32)

