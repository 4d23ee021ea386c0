"""llama.cpp as a test oracle: its own converter, and its own quantizer (llama-quantize).

``make test`` / ``make install`` extract ``convert_hf_to_gguf.py`` (with its ``conversion``
package and its vendored ``gguf-py``) from the llama-cpp-python sdist we build llama.cpp
from, into ``~/.cache/so8t-gguf/llama.cpp-<version>/`` (``$SO8T_LLAMA_CPP_SRC`` overrides).
:func:`convert_all_with_llama_cpp` runs it on Hugging Face folders in a subprocess, so the
vendored gguf-py (which the script puts on ``sys.path`` itself) is used there and only there;
the test process keeps the installed gguf.

The one hook: convert names a BPE pre-tokenizer only by the hash of the token ids of a check
text, so it refuses the fixtures' small random BPE tokenizers ("BPE pre-tokenizer was not
recognized"). With ``unknown_bpe_pre="gpt-2"`` an *unrecognized* hash (only that) is answered with
the given name instead of the exception; tokens, types, merges, special ids and every other key
are still convert's own.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from so8t_core.gguf_file import read_gguf

LLAMA_CPP_PYTHON = "0.3.36"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Runs convert_hf_to_gguf.py as __main__ once per job (argv[1]: JSON list of [its arguments, log file]),
# after the hook above, at most argv[2] at a time, each in a process forked from this one once it has
# imported what convert imports (torch, transformers, its conversion package: ~4 s of CPU a process):
# every conversion still starts from the same fresh state, as in a process of its own. Prints the
# exit statuses as JSON.
_DRIVER = """
import json, os, runpy, sys, traceback
src = os.environ["SO8T_ORACLE_SRC"]
sys.path[0] = src  # where the script's own directory would be: `conversion` and models/ resolve as usual
import gguf
if not gguf.__file__.startswith(os.path.join(src, "gguf-py", "")):
    sys.exit(f"oracle: imported gguf from {gguf.__file__}, not from the converter's own gguf-py")
import torch, conversion, sentencepiece, safetensors.torch  # noqa: F401
from transformers import AutoConfig, AutoTokenizer  # noqa: F401
import transformers.models.auto.tokenization_auto  # noqa: F401
pre = os.environ.get("SO8T_ORACLE_UNKNOWN_BPE_PRE")
if pre:
    from conversion.base import TextModel
    recognized = TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return recognized(self, tokenizer)
        except NotImplementedError:
            return pre
    TextModel.get_vocab_base_pre = get_vocab_base_pre
script = os.path.join(src, "convert_hf_to_gguf.py")
jobs, workers = json.loads(sys.argv[1]), int(sys.argv[2])
running, statuses = {}, [None] * len(jobs)

def reap():
    pid, status = os.wait()
    statuses[running.pop(pid)] = os.waitstatus_to_exitcode(status)

sys.stdout.flush()
sys.stderr.flush()
for i, (args, log) in enumerate(jobs):
    while len(running) >= workers:
        reap()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = [script, *args]
            runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    running[pid] = i
while running:
    reap()
print(json.dumps(statuses))
"""


def default_src() -> Path:
    return Path.home() / ".cache" / "so8t-gguf" / f"llama.cpp-{LLAMA_CPP_PYTHON}"  # the Makefile's $(CACHE)


def llama_cpp_dir() -> Path:
    """The vendored llama.cpp folder holding convert_hf_to_gguf.py; fails the test if it is missing."""
    root = Path(os.environ.get("SO8T_LLAMA_CPP_SRC") or default_src())
    for candidate in (root / "vendor" / "llama.cpp", root):
        if (candidate / "convert_hf_to_gguf.py").is_file() and (candidate / "gguf-py" / "gguf").is_dir():
            return candidate
    pytest.fail(f"llama.cpp's convert_hf_to_gguf.py is not at {root}/vendor/llama.cpp: run `make test` "
                f"(or `make install`), which extracts it from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist, "
                "or point SO8T_LLAMA_CPP_SRC at an extracted llama-cpp-python source tree", pytrace=False)


def convert_all_with_llama_cpp(jobs: list[tuple[str | os.PathLike, str | os.PathLike, str]], *,
                               unknown_bpe_pre: str | None = None, timeout: float = 900) -> list[str | AssertionError]:
    """Convert each ``(hf_dir, out_path, outtype)`` with llama.cpp's convert_hf_to_gguf.py, one
    conversion per CPU at a time; returns each GGUF's path, or the AssertionError (with the tail of
    convert's output) of a conversion that failed.

    ``unknown_bpe_pre``: tokenizer.ggml.pre for a BPE tokenizer whose hash convert does not know
    (see the module doc); None runs convert untouched.
    """
    if bad := [outtype for _, _, outtype in jobs if outtype not in OUTTYPES]:
        raise ValueError(f"outtype must be one of {OUTTYPES}, not {bad}")
    src = llama_cpp_dir()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
    # The script inserts its gguf-py at sys.path[1] unless NO_LOCAL_GGUF is set; PYTHONPATH says the same,
    # so the vendored gguf wins over the installed one in the subprocess whatever the script does.
    env["PYTHONPATH"] = str(src / "gguf-py")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["SO8T_ORACLE_SRC"] = str(src)
    env["SO8T_ORACLE_UNKNOWN_BPE_PRE"] = unknown_bpe_pre or ""
    logs = [f"{out_path}.convert.log" for _, out_path, _ in jobs]
    args = [[[str(hf_dir), "--outfile", str(out_path), "--outtype", outtype], log]
            for (hf_dir, out_path, outtype), log in zip(jobs, logs, strict=True)]
    cmd = [sys.executable, "-c", _DRIVER, json.dumps(args), str(max(1, os.cpu_count() or 1))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"the convert_hf_to_gguf.py driver failed (exit {proc.returncode}):\n"
                             + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))
    results: list[str | AssertionError] = []
    for (hf_dir, out_path, _), log, status in zip(jobs, logs, json.loads(proc.stdout.splitlines()[-1]), strict=True):
        if status == 0 and os.path.isfile(out_path):
            results.append(str(out_path))
        else:
            tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-30:])
            results.append(AssertionError(f"convert_hf_to_gguf.py failed (exit {status}) on {hf_dir}:\n{tail}"))
    return results


FIXTURES = {
    # rows of 256: K-quants apply; 8 layers so use_more_bits picks a non-trivial set
    "llama-256": dict(arch="llama", layers=8, hidden=256, heads=4, kv_heads=1, intermediate=512, vocab=512),
    # hidden 896, tied: most K-quants fall back; the tied embedding takes the output rule
    "qwen2-896-tied": dict(arch="qwen2", layers=2, hidden=896, heads=14, kv_heads=2, intermediate=256, tied=True),
    # fused attn_qkv follows the attn_v rules
    "phi3-256": dict(arch="phi3", layers=4, hidden=256, heads=4, kv_heads=4, intermediate=512),
    # mistral (a llama in GGUF) with GQA 8 (Q2_K's attn_v rule); qwen3 with head_dim ≠ hidden/heads
    "mistral-256": dict(arch="mistral", layers=3, hidden=256, heads=8, kv_heads=1, intermediate=512),
    "qwen3-256": dict(arch="qwen3", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=128, intermediate=256),
    # gemma2: tied (token_embd takes the output rule), sandwich norms, post-attention/FFN norms stay F32
    "gemma2-256": dict(arch="gemma2", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=256),
    "gemma3-256": dict(arch="gemma3", layers=2, hidden=256, heads=4, kv_heads=1, head_dim=128, intermediate=256),
    # mixture of experts, 3-D ffn_*_exps (MXFP4 in MXFP4_MOE, one importance row per expert), the layer read
    # from the name: Mixtral with 8 experts (the n_expert == 8 bumps of attn_v, attn_k, attn_output and
    # IQ3_M's ffn_down), Qwen2-MoE with 4 (n_expert >= 4) and its shared expert and gate (ffn_gate_inp_shexp,
    # a 1-row matrix llama.cpp quantizes and counts as an ffn_gate)
    "mixtral-256-8x": dict(arch="mixtral", layers=2, hidden=256, heads=4, kv_heads=2, intermediate=256, experts=8,
                           vocab=320),
    "qwen2moe-256": dict(arch="qwen2moe", layers=2, hidden=256, heads=4, kv_heads=4, intermediate=256,
                         expert_intermediate=256, shared_intermediate=256, vocab=320),
    # Qwen3-MoE: Qwen2-MoE's rules without the shared expert, with q/k norms; one layer keeps it cheap
    "qwen3moe-256": dict(arch="qwen3moe", layers=1, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=256,
                         expert_intermediate=256, experts=4, vocab=320),
}


def llama_imatrix_binary() -> Path:
    """llama.cpp's llama-imatrix, built from the pinned sources by `make llama-tools`, at
    $SO8T_LLAMA_IMATRIX (`make test` sets it). Skips the test when it is unset; fails it when it
    names no executable."""
    path = os.environ.get("SO8T_LLAMA_IMATRIX")
    if not path:
        pytest.skip("SO8T_LLAMA_IMATRIX is unset: `make test` builds llama-imatrix from the pinned llama.cpp "
                    "(`make llama-tools`) and sets it")
    if not os.access(path, os.X_OK):
        pytest.fail(f"SO8T_LLAMA_IMATRIX={path} is not an executable: run `make llama-tools`", pytrace=False)
    return Path(path)


def llama_imatrix(model: str, text_file: str, out: str, ctx: int, chunks: int | None = None, threads: int = 2,
                  parse_special: bool = False, timeout: float = 900) -> str:
    """Run llama-imatrix on ``model`` over ``text_file``; returns the imatrix GGUF's path."""
    cmd = [str(llama_imatrix_binary()), "-m", model, "-f", text_file, "-o", out, "-c", str(ctx), "-t", str(threads),
           "--no-ppl"]
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if parse_special:
        cmd.append("--parse-special")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not os.path.isfile(out):
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise AssertionError(f"llama-imatrix failed (exit {proc.returncode}):\n{tail}")
    return out


def llama_quantize(src: str, dst: str, ftype: int, pure=False, output_type=None, embd_type=None, overrides=(),
                   imatrix: dict[str, np.ndarray] | None = None, check: bool = True) -> int:
    """llama_model_quantize, as llama-quantize calls it; ``imatrix``: tensor name → importance
    (normalized as llama-quantize's loader does). Returns its status; ``check``: assert it is 0."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.pure = pure
    if output_type is not None:
        params.output_tensor_type = int(output_type)
    if embd_type is not None:
        params.token_embedding_type = int(embd_type)
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides):
            arr[i].pattern, arr[i].type = pattern.encode(), int(qtype)
        arr[len(overrides)].pattern, arr[len(overrides)].type = None, llama_cpp.GGML_TYPE_COUNT  # terminator
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    keep = []  # the buffers the C struct points into, alive for the call
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(buf)
            entries[i].name, entries[i].size = name.encode(), buf.size
            entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(imatrix)].name = None  # terminator
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if check:
        assert status == 0, f"llama_model_quantize failed ({status}) for ftype {ftype}"
    return status


def assert_same_tensors(ours: str, theirs: str) -> dict:
    a, b = read_gguf(ours), read_gguf(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    types = {}
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type, (name, ta[name].tensor_type.name, t.tensor_type.name)
        assert np.ascontiguousarray(ta[name].data).tobytes() == np.ascontiguousarray(t.data).tobytes(), name
        types[name] = t.tensor_type.name
    assert a.value("general.file_type") == b.value("general.file_type")
    assert a.value("general.quantization_version") == b.value("general.quantization_version") == 2
    return types
