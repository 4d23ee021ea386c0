"""A corpus of bad inputs, built from a tiny fixture: each is refused by the CLI in one line.

Every case must end with exit status 2, exactly one ``so8t-gguf: error: ...`` line on stderr
naming the file (or the tensor in the checkpoint) and the problem, with a hint; no traceback;
nothing under ``--output``; and, for the crafted pickles, no code run. Cases run through
``flows.cli.main`` in this process (the CLI's code path, without the start-up cost); the
``subprocess`` ones start the real ``so8t-gguf`` command, and ``limited`` ones run it under a
3 GiB address-space limit, so a giant allocation fails the case instead of the machine.

:data:`CASES` is the corpus, one row per bad input; ``fixed`` says what so8t-gguf did with the
input before it was refused properly (empty: it was refused cleanly from the start). A
benchmark script can import this module and count ``len(CASES)``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from support.chat_templates import FLOOD, NESTED_LOOPS, NOT_JINJA, SANDBOX_ESCAPE
from support.checkpoints import rewrite_tensor
from support.cli import BIN, assert_one_line_error
from support.lora import FIXTURE as LORA_FIXTURE
from support.lora import write_adapter
from support.reliability_record import record

ADDRESS_SPACE_LIMIT = 3 << 30  # for "limited" cases: far below any giant allocation, far above the CLI's needs


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, in words
    command: str  # the CLI command run on it: analyze | convert | inspect
    build: Callable[[Path, Callable[..., str]], str]  # (scratch dir, make_fixture) -> SOURCE or GGUF path
    expect: tuple[str, ...]  # fragments of the one-line error
    via: str = "in-process"  # or "subprocess", or "limited" (subprocess under ADDRESS_SPACE_LIMIT)
    fixed: str = ""  # what happened before the fix; empty when it was refused cleanly already
    pipeline: bool = False  # passes the preflight: the conversion (a Prefect run) finds it
    options: Callable[[Path, Callable[..., str]], tuple[str, ...]] | None = None  # more CLI options


ST = "model.safetensors"
THETA0 = "model.layers.0.self_attn.so8t_rotation_gate.theta"

# The builders (lambdas) call helpers defined below this table.
CASES: list[Case] = [
    # --- safetensors files: truncated, bit-flipped, lying headers ---------------------------------
    Case("truncated_data", "safetensors file cut 100 bytes short", "analyze",
         lambda t, fx: truncate(copy_fixture(fx, t), ST, -100), (ST, "past the end of the", "truncated"),
         via="subprocess"),
    Case("truncated_header", "safetensors file cut inside its header", "analyze",
         lambda t, fx: truncate(copy_fixture(fx, t), ST, 20), (ST, "truncated safetensors file")),
    Case("bitflip_header_length", "bit 50 of the header length flipped", "analyze",
         lambda t, fx: flip_bit(copy_fixture(fx, t), ST, 6, 2), (ST, "safetensors header claims")),
    Case("bitflip_offsets", "one bit flipped in a data_offsets digit", "analyze",
         lambda t, fx: flip_in_header(copy_fixture(fx, t), b'"data_offsets":[98304,196608]', 23, 0x01),
         (ST, "model.embed_tokens.weight", "needs 98304 bytes but its offsets span 88304")),
    Case("bitflip_dtype", "one bit flipped in a dtype (F32 -> F33)", "analyze",
         lambda t, fx: flip_in_header(copy_fixture(fx, t), b'"dtype":"F32"', 11, 0x01),
         (ST, "unknown dtype 'F33'")),
    Case("bitflip_json", "one bit flipped in a quote of the header JSON (not UTF-8 any more)", "analyze",
         lambda t, fx: flip_in_header(copy_fixture(fx, t), b'"lm_head.weight"', 0, 0x80),
         (ST, "safetensors header is not valid JSON")),
    Case("offsets_past_end", "the last tensor's byte range ends past the end of the file", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), grow_last_tensor), (ST, "past the end of the")),
    Case("overlapping_ranges", "two tensors share one byte range", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), overlap_two_tensors), (ST, "overlaps another tensor")),
    Case("dtype_lie", "F32 tensor declared F16 over the same bytes", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), set_entry("lm_head.weight", dtype="F16")),
         (ST, "'lm_head.weight'", "F16[384, 64] needs 49152 bytes but its offsets span 98304")),
    Case("shape_lie", "tensor shape halved over the same bytes", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), set_entry("lm_head.weight", shape=[384, 32])),
         (ST, "F32[384, 32] needs 49152 bytes")),
    Case("dtype_not_a_string", "a dtype that is a JSON list", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), set_entry("lm_head.weight", dtype=["F32"])),
         (ST, "unknown dtype ['F32']"), fixed="TypeError traceback (unhashable list)"),
    Case("header_nested_json", "safetensors header of 100000 nested JSON arrays", "analyze",
         lambda t, fx: write_raw_header(copy_fixture(fx, t), b"[" * 100_000 + b"]" * 100_000),
         (ST, "not valid JSON (nested too deeply)"), fixed="RecursionError traceback"),
    Case("name_lone_surrogate", 'a tensor name with a lone surrogate escape ("\\ud800")', "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), rename("lm_head.weight", "lm_head\ud800")),
         (ST, "name is not valid Unicode"),
         fixed="accepted by the parser; refused later as an unknown tensor, without naming the file"),
    Case("shard_is_a_folder", "model.safetensors is a folder", "analyze",
         lambda t, fx: replace_by_folder(copy_fixture(fx, t), ST), (ST, "is a folder, not a file"),
         fixed="IsADirectoryError traceback"),
    # --- the index and the shards -------------------------------------------------------------------
    Case("index_parent_path", "index weight_map entry '../model-00001-of-00002.safetensors'", "analyze",
         lambda t, fx: point_index(copy_fixture(fx, t, shards=2), "../model-00001-of-00002.safetensors"),
         ("model.safetensors.index.json", "outside the checkpoint folder")),
    Case("index_absolute_path", "index weight_map entry with an absolute path to a real shard", "analyze",
         lambda t, fx: point_index(copy_fixture(fx, t, shards=2), os.path.join(fx(shards=2), ST)),
         ("model.safetensors.index.json", "outside the checkpoint folder")),
    Case("missing_shard", "a shard named in the index is absent", "analyze",
         lambda t, fx: remove(copy_fixture(fx, t, shards=2), "model-00002-of-00002.safetensors"),
         ("model-00002-of-00002.safetensors", "missing shard listed in the index")),
    # --- config.json against the weights --------------------------------------------------------------
    Case("config_intermediate_mismatch", "config.json intermediate_size 96, tensors have 128", "analyze",
         lambda t, fx: edit_config(copy_fixture(fx, t), intermediate_size=96),
         ("mlp.", "has shape", "but config.json implies", "config.json and the weights disagree")),
    Case("config_layers_mismatch", "config.json says 3 layers, the weights have 2", "analyze",
         lambda t, fx: edit_config(copy_fixture(fx, t), num_hidden_layers=3),
         ("missing tensors model.layers.2.", "config.json describes another model")),
    Case("config_rope_not_an_object", 'config.json "rope_scaling": 5', "analyze",
         lambda t, fx: edit_config(copy_fixture(fx, t), rope_scaling=5),
         ("config.json: rope_scaling must be an object, got 5",), fixed="TypeError traceback (found by the fuzzer)"),
    Case("config_nested_json", "config.json of 100000 nested JSON arrays", "analyze",
         lambda t, fx: write_file(copy_fixture(fx, t), "config.json", b"[" * 100_000 + b"]" * 100_000),
         ("config.json", "not valid JSON (nested too deeply)"), fixed="RecursionError traceback"),
    # --- values ---------------------------------------------------------------------------------------
    Case("inf_in_weight", "an Inf in an MLP weight (found by the pipeline, not by the preflight)", "convert",
         lambda t, fx: with_value(copy_fixture(fx, t), "model.layers.1.mlp.gate_proj.weight", (128, 64), np.inf),
         (ST, "model.layers.1.mlp.gate_proj.weight", "1 NaN/Inf values"), via="subprocess", pipeline=True),
    Case("nan_in_theta", "a NaN in a rotation gate θ", "convert",
         lambda t, fx: with_value(copy_fixture(fx, t), THETA0, (8, 8, 8), np.nan), (ST, THETA0, "1 NaN/Inf values")),
    # --- SO8T rotation gates --------------------------------------------------------------------------
    Case("theta_wrong_shape", "θ declared [4, 8, 16] over the bytes of [8, 8, 8]", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), set_entry(THETA0, shape=[4, 8, 16])),
         (f"{THETA0} has shape [4, 8, 16]", "expected [8, 8, 8]")),
    Case("theta_2d", "θ declared as a 2-D [8, 64] matrix", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), set_entry(THETA0, shape=[8, 64])),
         (f"{THETA0} has shape [8, 64]", "expected [8, 8, 8]")),
    Case("rotation_not_orthogonal", "a precomputed R (…rotation_gate.rotation) that is not orthogonal", "convert",
         lambda t, fx: edit_header(copy_fixture(fx, t), rename(THETA0, THETA0[:-len("theta")] + "rotation")),
         ("so8t_rotation_gate.rotation does not give a rotation (matrix:", "orthogonal")),
    # --- pickles --------------------------------------------------------------------------------------
    Case("bin_pickle_runs_code", "pytorch_model.bin whose pickle would run `touch MARKER`", "analyze",
         lambda t, fx: bin_checkpoint(t, fx, malicious_pickle(t)),
         ("pytorch_model.bin", "refused to load", "GLOBAL posix.system"), via="subprocess",
         fixed="refused, no code run; the reason was torch's generic 'Weights only load failed. In PyTorch 2.6, ...'"),
    Case("bin_torch_save_runs_code", "torch.save'd (zip) pytorch_model.bin with a code-running object", "analyze",
         lambda t, fx: bin_checkpoint(t, fx, malicious_torch_zip(t)),
         ("pytorch_model.bin", "refused to load", "GLOBAL posix.system"),
         fixed="refused, no code run; the reason was torch's generic 'Weights only load failed. In PyTorch 2.6, ...'"),
    # --- huge declared sizes: refused without allocating them -----------------------------------------
    Case("huge_header_length", "safetensors header length 2**60", "analyze",
         lambda t, fx: write_file(copy_fixture(fx, t), ST, (1 << 60).to_bytes(8, "little") + b"{}"),
         (ST, "safetensors header claims 1152921504606846976 bytes"), via="limited"),
    Case("huge_tensor", "a tensor declaring 4 PiB ([2**25, 2**25] F32)", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), add_huge_tensor), (ST, "'huge'", "past the end of the"),
         via="limited"),
    Case("huge_shape_overflow", "a zero-size tensor whose other dimensions multiply past 2**63", "analyze",
         lambda t, fx: edit_header(copy_fixture(fx, t), add_entry("huge", "F32", [1 << 40, 1 << 40, 0])),
         (ST, "'huge'", "declares more than 2**63 bytes"),
         fixed="accepted by the parser (a shape numpy cannot hold); refused later as an unknown tensor, "
               "without naming the file"),
    Case("huge_bin_storage", "legacy-format pytorch_model.bin declaring a 64 GiB storage", "analyze",
         lambda t, fx: bin_checkpoint(t, fx, legacy_bin_declaring(1 << 34)),
         ("pytorch_model.bin", "a tensor storage declares a size the file does not hold"), via="limited",
         fixed="refused as 'not a plain tensor pickle', with torch's allocator error as the reason"),
    Case("huge_bin_storage_unlimited", "legacy-format pytorch_model.bin declaring a 4 TiB storage, no memory limit",
         "analyze", lambda t, fx: bin_checkpoint(t, fx, legacy_bin_declaring(1 << 40)),
         ("pytorch_model.bin", "a tensor storage declares a size the file does not hold"),
         fixed="torch reserved the declared size before the refusal; only a memory limit stopped it"),
    Case("huge_zip_bin_storage", "zip-format pytorch_model.bin declaring a 1 TiB storage", "analyze",
         lambda t, fx: bin_checkpoint(t, fx, zip_bin_declaring(t, 1 << 40)),
         ("pytorch_model.bin", "a tensor storage declares a size the file does not hold"),
         fixed="refused as 'not a plain tensor pickle', with torch's record-size error as the reason"),
    Case("huge_gguf_tensor_count", "GGUF header declaring 2**60 tensors", "inspect",
         lambda t, fx: small_gguf(t, {8: 1 << 60}), ("t.gguf", "corrupt GGUF file"), via="limited"),
    Case("huge_gguf_string", "GGUF metadata string declaring 2**62 bytes", "inspect",
         lambda t, fx: small_gguf(t, {56: 1 << 62}), ("t.gguf", "corrupt GGUF file"), via="limited"),
    Case("huge_gguf_array", "GGUF metadata array declaring 2**40 items in a 600-byte file", "inspect",
         lambda t, fx: small_gguf(t, {}, array_count=1 << 40),
         ("t.gguf", "corrupt GGUF file", "declares 1099511627776 items"), via="limited",
         fixed="hang: gguf-py reads past the end as empty arrays and loops 2**40 times (found by the fuzzer)"),
    Case("gguf_4m_empty_strings", "a 32 MB GGUF holding one array of 4,000,000 empty strings", "inspect",
         lambda t, fx: empty_strings_gguf(t, 4_000_000),
         ("strings.gguf", "corrupt GGUF file", "declares 4000000 items"),
         via="limited", fixed="inspect used 4 GB and minutes: gguf-py builds a numpy view per item, and the cap "
                              "was per array"),
    Case("gguf_array_past_end", "GGUF metadata array running past the end of the file", "inspect",
         lambda t, fx: small_gguf(t, {}, array_count=1 << 20), ("t.gguf", "corrupt GGUF file", "past the end"),
         fixed="refused, with an unrelated reason (IndexError: index 0 is out of bounds)"),
    # --- other files ----------------------------------------------------------------------------------
    Case("fake_gguf_json", 'a ".gguf" that is JSON', "inspect",
         lambda t, fx: write_file(str(t), "model.gguf", json.dumps({"format": "gguf", "tensors": {}}).encode()),
         ("model.gguf", "not a GGUF file", "looks like JSON")),
    Case("gguf_string_not_utf8", "a GGUF whose general.name holds a byte that is not UTF-8", "inspect",
         lambda t, fx: small_gguf(t, {}, replace=(b"fixture-name", b"\xffixture-name")),
         ("t.gguf", "corrupt GGUF file", "UnicodeDecodeError"), fixed="UnicodeDecodeError traceback from inspect"),
    Case("tokenizer_json_not_utf8", "tokenizer.json with a 0xff byte", "convert",
         lambda t, fx: corrupt_text(copy_fixture(fx, t), "tokenizer.json"), ("tokenizer.json", "not UTF-8"),
         via="subprocess", fixed="refused only at GGUF assembly, after every tensor was quantized"),
    Case("tokenizer_config_not_utf8", "tokenizer_config.json with a 0xff byte", "convert",
         lambda t, fx: corrupt_text(copy_fixture(fx, t), "tokenizer_config.json"),
         ("tokenizer_config.json", "not UTF-8"),
         fixed="refused only at GGUF assembly, after every tensor was quantized"),
    Case("symlink_outside_folder", "README.md a symbolic link to a file outside the checkpoint folder", "convert",
         lambda t, fx: link_outside(copy_fixture(fx, t), "README.md"),
         ("README.md", "symbolic link to a file outside the checkpoint folder"),
         fixed="followed the link and read the file (README.md front matter feeds general.* metadata)"),
    # --- chat templates: rendered within limits of time, output and memory, before any work --------
    Case("chat_template_nested_loops", "a chat template of two nested range(100000) loops", "convert",
         lambda t, fx: with_chat_template(copy_fixture(fx, t), NESTED_LOOPS),
         ("tokenizer_config.json", "the chat template does not render within"),
         fixed="published; `chat` hung (each range within the sandbox's cap of 100,000)"),
    Case("chat_template_sandbox_escape", "a chat template reaching for Python internals (__class__)", "convert",
         lambda t, fx: with_chat_template(copy_fixture(fx, t), SANDBOX_ESCAPE),
         ("tokenizer_config.json", "refused by Jinja's sandbox"),
         fixed="published; `chat` ended in the sandbox's SecurityError traceback"),
    Case("chat_template_flood", "a chat template writing 500 MB", "convert",
         lambda t, fx: with_chat_template(copy_fixture(fx, t), FLOOD),
         ("tokenizer_config.json", "renders more than"), fixed="published; `chat` built the 500 MB prompt"),
    Case("chat_template_not_jinja", "a chat template that is not Jinja", "convert",
         lambda t, fx: with_chat_template(copy_fixture(fx, t), NOT_JINJA),
         ("tokenizer_config.json", "not a valid Jinja2 template"),
         fixed="published with --no-validate; llama.cpp refused to load the file"),
    # --- names that become paths, credentials, links ---------------------------------------------------
    Case("name_parent_path", "--name ../../escape", "convert", lambda t, fx: fx(),
         ("--name ../../escape", "not a plain name"), options=lambda t, fx: ("--name", "../../escape"),
         fixed="published a release and latest.json two levels above the destination"),
    Case("name_absolute_path", "--name /some/dir/m", "convert", lambda t, fx: fx(),
         ("--name /some/dir/m", "not a plain name"), options=lambda t, fx: ("--name", "/some/dir/m"),
         fixed="wrote the GGUFs into /some/dir, then crashed"),
    Case("source_folder_name", "a source folder named 'my model' and no --name", "convert",
         lambda t, fx: str(Path(copy_fixture(fx, t)).rename(t / "my model")),
         ("the source folder's name my model", "not a plain name", "pass --name")),
    Case("output_credentials", "--output s3://KEY:SECRET@bucket/x", "convert", lambda t, fx: fx(),
         ("--output s3://bucket/x", "credentials in the URI are not accepted"),
         options=lambda t, fx: ("--output", "s3://AKIAKEY:SECRET@bucket/x"),
         fixed="refused only at publishing, after the whole conversion; the secret was in the flow run's "
               "parameters and a task run's name"),
    Case("lora_link_outside", "a LoRA adapter whose adapter_config.json links outside its folder", "convert",
         lambda t, fx: fx(**LORA_FIXTURE), ("adapter_config.json", "symbolic link to a file outside the adapter"),
         options=lambda t, fx: ("--lora", link_outside(adapter_for(t, fx(**LORA_FIXTURE)), "adapter_config.json",
                                                       keep=True)),
         fixed="followed the link and read the file"),
    Case("tokenizer_json_nested", "tokenizer.json of 100000 nested JSON arrays", "convert",
         lambda t, fx: write_file(copy_fixture(fx, t), "tokenizer.json", b"[" * 100_000 + b"]" * 100_000),
         ("tokenizer.json", "nested too deeply"), fixed="RecursionError traceback at GGUF assembly"),
]


# --- builders ---------------------------------------------------------------------------------------


def copy_fixture(make_fixture, tmp: Path, **spec) -> str:
    dst = tmp / "ckpt"
    shutil.copytree(make_fixture(**spec), dst)
    return str(dst)


def link_outside(folder: str, name: str, keep: bool = False) -> str:
    """Replace ``name`` in the checkpoint by a symbolic link to a file beside the folder (``keep``:
    with the file's own content)."""
    outside = os.path.join(os.path.dirname(folder), "not-part-of-the-checkpoint.txt")
    target = os.path.join(folder, name)
    if keep:
        shutil.copyfile(target, outside)
    else:
        with open(outside, "w") as f:
            f.write("aws_secret_access_key = not-for-publishing\n")
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.relpath(outside, folder), target)
    return folder


def with_chat_template(folder: str, template: str) -> str:
    path = os.path.join(folder, "tokenizer_config.json")
    config = json.load(open(path))
    config["chat_template"] = template
    json.dump(config, open(path, "w"))
    return folder


def adapter_for(tmp: Path, source: str) -> str:
    return write_adapter(str(tmp / "adapter"), source)


def write_file(folder: str, name: str, data: bytes) -> str:
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    return os.path.join(folder, name) if name.endswith(".gguf") else folder


def replace_by_folder(folder: str, name: str) -> str:
    os.remove(os.path.join(folder, name))
    os.mkdir(os.path.join(folder, name))
    return folder


def remove(folder: str, name: str) -> str:
    os.remove(os.path.join(folder, name))
    return folder


def truncate(folder: str, name: str, size: int) -> str:
    path = os.path.join(folder, name)
    os.truncate(path, size if size >= 0 else os.path.getsize(path) + size)
    return folder


def flip_bit(folder: str, name: str, byte: int, bit: int) -> str:
    path = os.path.join(folder, name)
    data = bytearray(open(path, "rb").read())
    data[byte] ^= 1 << bit
    open(path, "wb").write(bytes(data))
    return folder


def flip_in_header(folder: str, anchor: bytes, offset: int, mask: int) -> str:
    """XOR ``mask`` into the byte ``offset`` bytes into the first occurrence of ``anchor``."""
    path = os.path.join(folder, ST)
    data = bytearray(open(path, "rb").read())
    data[data.index(anchor) + offset] ^= mask
    open(path, "wb").write(bytes(data))
    return folder


def read_safetensors(path: str) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw_header(folder: str, header: bytes, name: str = ST) -> str:
    _, body = read_safetensors(os.path.join(folder, name))
    open(os.path.join(folder, name), "wb").write(len(header).to_bytes(8, "little") + header + body)
    return folder


def edit_header(folder: str, edit: Callable[[dict], None], name: str = ST) -> str:
    """Rewrite a shard's header (any length), keeping its data bytes."""
    header, _ = read_safetensors(os.path.join(folder, name))
    edit(header)
    return write_raw_header(folder, json.dumps(header, separators=(",", ":")).encode(), name)


def set_entry(tensor: str, **fields) -> Callable[[dict], None]:
    return lambda header: header[tensor].update(fields)


def add_entry(tensor: str, dtype: str, shape: list[int]) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        header[tensor] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end]}
    return edit


def rename(old: str, new: str) -> Callable[[dict], None]:
    return lambda header: header.__setitem__(new, header.pop(old))


def grow_last_tensor(header: dict) -> None:
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    entry = header[name]  # [2, 64] F32 -> [4, 64]: consistent with its offsets, which end past the file
    entry["shape"][0] *= 2
    entry["data_offsets"][1] += entry["data_offsets"][1] - entry["data_offsets"][0]


def overlap_two_tensors(header: dict) -> None:
    header["model.layers.1.input_layernorm.weight"]["data_offsets"] = list(
        header["model.layers.0.input_layernorm.weight"]["data_offsets"])


def add_huge_tensor(header: dict) -> None:
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["huge"] = {"dtype": "F32", "shape": [1 << 25, 1 << 25], "data_offsets": [end, end + (1 << 52)]}


def point_index(folder: str, target: str) -> str:
    path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(path))
    index["weight_map"]["model.norm.weight"] = target
    json.dump(index, open(path, "w"))
    return folder


def edit_config(folder: str, **changes) -> str:
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return folder


def with_value(folder: str, tensor: str, shape: tuple[int, ...], value: float) -> str:
    values = np.random.default_rng(0).standard_normal(shape)
    values.flat[7] = value
    rewrite_tensor(folder, tensor, values)
    return folder


def corrupt_text(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    data = bytearray(open(path, "rb").read())
    data[data.index(b'"', 10) + 1] = 0xFF  # inside a JSON string: valid JSON but for the byte
    open(path, "wb").write(bytes(data))
    return folder


class RunsCode:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def marker_of(tmp: Path) -> Path:
    return tmp / "PWNED"


def malicious_pickle(tmp: Path) -> bytes:
    return pickle.dumps({"w": RunsCode(str(marker_of(tmp)))}, protocol=2)


def malicious_torch_zip(tmp: Path) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": RunsCode(str(marker_of(tmp)))}, buf)
    return buf.getvalue()


def _patched_pickle(raw: bytes, numel: int) -> bytes:
    """The pickle of ``{"w": torch.arange(4.)}`` with its storage's element count replaced."""
    # BININT1 4, twice: the storage size in the persistent id, then the tensor's shape (4,).
    assert raw.count(b"K\x04") == 2
    return raw.replace(b"K\x04", b"\x8a\x08" + numel.to_bytes(8, "little"), 1)


def legacy_bin_declaring(numel: int) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    raw = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info; then the object's pickle
        pickle.load(raw)
    start = raw.tell()
    *_, (stop, _, at) = pickletools.genops(data[start:])  # read, not run: where the object's pickle ends
    assert stop.name == "STOP"
    end = start + at + 1
    return data[:start] + _patched_pickle(data[start:end], numel) + data[end:]


def zip_bin_declaring(tmp: Path, numel: int) -> bytes:
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, _patched_pickle(data, numel) if name.endswith("data.pkl") else data)
    return out.getvalue()


def bin_checkpoint(tmp: Path, make_fixture, weights: bytes) -> str:
    folder = tmp / "bin-ckpt"
    folder.mkdir()
    shutil.copy(os.path.join(make_fixture(), "config.json"), folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(weights)
    return str(folder)


def small_gguf(tmp: Path, u64_at: dict[int, int], replace: tuple[bytes, bytes] | None = None,
               array_count: int | None = None) -> str:
    """A valid tiny GGUF, then: the uint64 at each offset overwritten (8: tensor count; 56: the
    length of the first value, general.architecture's string), ``replace`` applied, the item
    count of its array ``x.ids`` set."""
    import gguf

    from so8t_core.gguf_file import TensorInfo, kv_array, kv_str, write_gguf

    a = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = str(tmp / "t.gguf")
    write_gguf(path, "llama", [kv_str("general.name", "fixture-name"),
                               kv_array("x.ids", [3, 1, 2], gguf.GGUFValueType.UINT8)],
               [TensorInfo("w", (2, 32), gguf.GGMLQuantizationType.F32, a.nbytes)], lambda t: a.tobytes())
    data = bytearray(open(path, "rb").read())
    assert data[24:32] == (20).to_bytes(8, "little") and data[32:52] == b"general.architecture"
    for offset, value in u64_at.items():
        data[offset:offset + 8] = value.to_bytes(8, "little")
    if array_count is not None:  # key, then value type (ARRAY), item type (UINT8), item count
        at = data.index(b"x.ids") + len(b"x.ids") + 8
        assert data[at - 8:at] == b"\x09\x00\x00\x00\x00\x00\x00\x00"
        data[at:at + 8] = array_count.to_bytes(8, "little")
    if replace:
        data = bytearray(bytes(data).replace(*replace))
    open(path, "wb").write(bytes(data))
    return path


def empty_strings_gguf(tmp: Path, n: int) -> str:
    """A GGUF with no tensors and one metadata array of ``n`` empty strings (8 bytes each: the length)."""
    import struct

    key = b"x.strings"
    path = tmp / "strings.gguf"
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key)
        f.write(struct.pack("<IIQ", 9, 8, n) + bytes(8 * n))
    return str(path)


# --- running a case ---------------------------------------------------------------------------------


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_cli(args: list[str], limited: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}  # as from a user's shell
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=_limit_address_space if limited else None)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.e2e] if c.pipeline else [])
                                  for c in CASES])
def test_bad_input_is_refused_in_one_line(case: Case, make_fixture, tmp_path, capsys):
    target = case.build(tmp_path, make_fixture)
    out, work = tmp_path / "out", tmp_path / "work"
    args = [case.command, target]
    if case.command == "convert":
        args += ["--no-validate", "--output", str(out), "--work-dir", str(work)]
    args += case.options(tmp_path, make_fixture) if case.options else ()
    started = time.monotonic()
    if case.via == "in-process":
        from flows.cli import main

        capsys.readouterr()
        rc = main(args)
        captured = capsys.readouterr()
        proc = subprocess.CompletedProcess(args, rc, captured.out, captured.err)
    else:
        proc = run_cli(args, limited=case.via == "limited", timeout=60 if case.via == "limited" else 300)
    elapsed = time.monotonic() - started

    if case.id.startswith("chat_template"):
        record("resources", attack=f"convert: {case.what}", refused=int(proc.returncode == 2),
               seconds=round(elapsed, 1))
    assert_one_line_error(proc, *case.expect)
    assert not out.exists() or not any(out.iterdir()), "something was published"
    assert not marker_of(tmp_path).exists(), "the checkpoint ran code"
    if case.via == "limited":  # refused up front, not after grinding through a huge size
        assert elapsed < 30, elapsed


def test_a_good_checkpoint_passes_under_the_same_limit(make_fixture):
    """The address-space limit leaves the CLI room to work: the limited cases fail for their input."""
    proc = run_cli(["analyze", make_fixture()], limited=True)
    assert proc.returncode == 0, proc.stderr
    assert "rotation gates on 2 layers" in proc.stdout


def test_a_hugging_face_cache_snapshot_of_symlinks_is_read(make_fixture, tmp_path):
    """The cache's layout: snapshots/<rev>/<file> links to ../../blobs/<name>; links stay allowed there."""
    repo = tmp_path / "models--org--fx"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in Path(make_fixture()).iterdir():
        shutil.copyfile(path, blobs / path.name)
        os.symlink(os.path.join("..", "..", "blobs", path.name), snapshot / path.name)
    from flows.cli import main

    assert main(["analyze", str(snapshot)]) == 0


def test_corpus_is_well_formed():
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.via in ("in-process", "subprocess", "limited") for c in CASES)
    assert all(c.command in ("analyze", "convert", "inspect") for c in CASES)
