"""What reading a GGUF builds is bounded by the file's size: a small file declaring millions of
metadata items is refused at once in one line, and a large array within the limits is read as one
view per array, not one object per item (gguf-py's reader built a numpy view per item: a 32 MB
file of 4,000,000 empty strings cost `inspect` 4 GB and minutes)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time

import pytest
from support.cli import assert_one_line_error
from support.reliability_record import record

from so8t_core.errors import ValidationError
from so8t_core.gguf_file import MAX_METADATA_ITEMS, read_gguf

STRING, ARRAY, UINT8 = 8, 9, 0


def kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", STRING, len(v)) + v


def kv_array_header(key: str, item_type: int, count: int) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", ARRAY, item_type, count)


def gguf_of_empty_strings(path, arrays: list[int]) -> str:
    """A GGUF with no tensors whose metadata is general.architecture and arrays of empty strings
    (``arrays``: their lengths). Each empty string takes 8 bytes: its length."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 + len(arrays)) + kv_string("general.architecture", "llama"))
        for i, n in enumerate(arrays):
            f.write(kv_array_header(f"x.strings{i}", STRING, n))
            f.write(bytes(8 * n))
    return str(path)


def peak_rss_mb(*cli_args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run the CLI in a fresh process; (its result, its peak RSS in MB, seconds). The peak is the
    process's own (VmHWM): getrusage's ru_maxrss counts the parent's memory at the fork too."""
    import tempfile

    code = ("import sys\nfrom flows.cli import main\nrc = main(sys.argv[2:])\n"
            "hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
            "open(sys.argv[1], 'w').write(hwm)\nsys.exit(rc)")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code, out.name, *cli_args], capture_output=True, text=True,
                              timeout=600)
        elapsed = time.monotonic() - started
        return proc, json.loads(open(out.name).read() or "0") / 1024, elapsed


def test_a_32_mb_file_of_4_million_empty_strings_is_refused_at_once_in_bounded_memory(tmp_path):
    path = gguf_of_empty_strings(tmp_path / "strings.gguf", [4_000_000])
    baseline, base_mb, _ = peak_rss_mb("inspect", gguf_of_empty_strings(tmp_path / "small.gguf", [3]))
    assert baseline.returncode == 0, baseline.stderr
    proc, mb, seconds = peak_rss_mb("inspect", path)
    record("resources", attack="a 32 MB GGUF of 4,000,000 empty strings (inspect)", refused=int(proc.returncode == 2),
           seconds=round(seconds, 1), peak_mb=round(mb), baseline_mb=round(base_mb))
    assert_one_line_error(proc, "strings.gguf", "corrupt GGUF file", "declares 4000000 items",
                          f"at most {MAX_METADATA_ITEMS} in all arrays")
    assert seconds < 30 and mb < base_mb + 64, (seconds, mb, base_mb)


def test_the_limit_is_over_all_arrays_of_a_file(tmp_path):
    half = MAX_METADATA_ITEMS // 2 + 1
    with pytest.raises(ValidationError, match=f"declares {half} items"):
        read_gguf(gguf_of_empty_strings(tmp_path / "two.gguf", [half, half]))


def test_a_large_array_within_the_limits_is_read_in_memory_bounded_by_the_file(tmp_path):
    """1.5 million items (a 12 MB file): read as one view and one offset per string; decoded, the
    list of 1.5 million (empty) strings is 12 MB more."""
    n = 1_500_000
    path = gguf_of_empty_strings(tmp_path / "many.gguf", [n])
    baseline, base_mb, _ = peak_rss_mb("inspect", gguf_of_empty_strings(tmp_path / "small.gguf", [3]))
    proc, mb, seconds = peak_rss_mb("inspect", "--json", path)
    record("resources", attack="a 12 MB GGUF of 1,500,000 empty strings, within the limits (inspect)",
           refused=int(proc.returncode != 0), seconds=round(seconds, 1), peak_mb=round(mb), baseline_mb=round(base_mb))
    assert proc.returncode == 0, proc.stderr
    assert mb < base_mb + 200, (mb, base_mb)  # gguf-py's reader: about 1.5 GB
    assert len(read_gguf(path).value("x.strings0")) == n


def test_arrays_of_arrays_and_arrays_past_the_end_are_refused(tmp_path):
    nested = tmp_path / "nested.gguf"
    nested.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv_array_header("x.nested", ARRAY, 1)
                       + struct.pack("<IQ", UINT8, 1) + b"\x01")
    with pytest.raises(ValidationError, match="arrays of arrays are not supported"):
        read_gguf(str(nested))
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv_array_header("x.s", STRING, 3)
                      + struct.pack("<Q", 0) * 2)
    with pytest.raises(ValidationError, match="past the end"):
        read_gguf(str(short))
