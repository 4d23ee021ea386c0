"""so8t-gguf against llama.cpp, in one run, on one machine, at equal threads.

    .venv/bin/python benchmarks/vs_llama_cpp.py [--threads N] [--skip-e2e] [--work DIR]

(a) Quantization throughput per type on the weights of a 135M-parameter F32 GGUF: our engines
    (``simd``: our SIMD C kernels, the default on CPU; ``ggml``: libggml through ctypes;
    both threaded over rows; ``torch``: the vectorized port)
    against llama.cpp's quantizer as llama-quantize runs it (``llama_model_quantize`` on a
    GGUF holding just that matrix, so its file I/O is included: that is how it is used).
(b) End to end, Hugging Face safetensors → Q4_K_M GGUF, on a generated ~1.1B-parameter llama
    checkpoint (TinyLlama's shape, bf16, 2 shards, SmolLM2's real tokenizer): ``so8t-gguf
    convert --quant Q4_K_M --no-validate`` against llama.cpp's path, ``convert_hf_to_gguf.py
    --outtype f16`` then ``llama_model_quantize(Q4_K_M)``. Wall time and peak RSS of each
    process tree (children included).

Prints Markdown tables for docs/benchmarks.md. Takes ~10-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TYPES = ["Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FTYPE_FOR = {"Q8_0": 7, "Q4_0": 2, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}
TINYLLAMA = dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632)


def best_of(fn, n=3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def wide_f32(work: str, **spec) -> str:
    """An F32 GGUF of a plain (ungated) fixture with wide rows, built once under ``work``."""
    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.testing.fixtures import FixtureSpec, build_fixture

    src = os.path.join(work, "wide")
    if not os.path.exists(os.path.join(src, "config.json")):
        build_fixture(src, FixtureSpec(**spec, so8t=False))
    f32 = os.path.join(work, "wide-F32.gguf")
    if not os.path.exists(f32):
        convert_sequential(Checkpoint.open(src), "F32", f32, os.path.join(work, "staging"))
    return f32


def throughput(threads: int, work: str) -> list[dict]:
    """Quantize every weight of a 135M-parameter F32 GGUF (rows of 2048/8192) to one type.

    llama.cpp: ``llama_model_quantize`` with ``pure`` (every weight gets the type), i.e.
    llama-quantize reading and writing files. Ours: the same tensors read from the same
    memory-mapped F32 file, quantized by the engine and written to one output file.
    """
    import gguf
    import llama_cpp

    from so8t_core.gguf_file import read_gguf
    from so8t_core.llama_runtime import captured_llama_log

    f32 = wide_f32(work, layers=2, hidden=2048, heads=16, kv_heads=16, intermediate=8192, vocab=768)
    g = read_gguf(f32)
    weights = [(t, g.numpy_shape(t)) for t in g.tensors if len(t.shape) == 2]
    n_elements = sum(int(np.prod(s)) for _, s in weights)
    llama_cpp.llama_backend_init()
    from so8t_core.quantize.engines import quantize
    from so8t_core.quantize.engines import simd as simd_engine

    engines = ["simd", "ggml", "torch"] if simd_engine.available() else ["ggml", "torch"]
    rows = []
    for t in TYPES:
        qtype = gguf.GGMLQuantizationType[t]

        def theirs():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread, params.pure = FTYPE_FOR[t], threads, True
            with captured_llama_log():  # llama-quantize's per-tensor log lines
                assert llama_cpp.llama_model_quantize(f32.encode(), os.path.join(work, "q.gguf").encode(),
                                                      ctypes.byref(params)) == 0
        ref = best_of(theirs)
        row = {"type": t, "llama.cpp s": ref}
        for engine in engines:
            def ours():
                with open(os.path.join(work, "ours.bin"), "wb") as out:
                    for tensor, shape in weights:
                        x = np.asarray(tensor.data).reshape(shape)
                        out.write(quantize(x, qtype, engine, n_threads=threads))
            row[f"{engine} engine s"] = best_of(ours, n=1 if engine == "torch" else 3)
            row[f"llama.cpp / {engine}"] = ref / row[f"{engine} engine s"]
        row[f"M weights/s ({engines[0]})"] = n_elements / row[f"{engines[0]} engine s"] / 1e6
        rows.append(row)
    return rows


def run_measured(cmd: list[str], env=None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, largest process of the tree) of a command."""
    t0 = time.perf_counter()
    wrapper = [sys.executable, "-c", "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(rc)", *cmd]
    proc = subprocess.run(wrapper, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK")][-1]
    return wall, int(peak.split()[1]) / 1024


def build_1b(dest: str) -> str:
    """A TinyLlama-shaped llama checkpoint: random bf16 weights, SmolLM2's tokenizer, 2 shards."""
    if os.path.exists(os.path.join(dest, "config.json")):
        return dest
    from so8t_core.testing.checkpoint_writer import write_checkpoint
    from so8t_core.testing.tokenizers import smollm2_gguf_path, smollm2_tokenizer_files

    s = TINYLLAMA
    vocab = 49152
    rng = np.random.default_rng(0)
    hd = s["hidden"] // s["heads"]

    def lin(o, i):
        return (rng.standard_normal((o, i), dtype=np.float32) * 0.02)

    t = {"model.embed_tokens.weight": lin(vocab, s["hidden"])}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = lin(s["hidden"], s["hidden"])
        t[p + "self_attn.k_proj.weight"] = lin(s["kv_heads"] * hd, s["hidden"])
        t[p + "self_attn.v_proj.weight"] = lin(s["kv_heads"] * hd, s["hidden"])
        t[p + "self_attn.o_proj.weight"] = lin(s["hidden"], s["hidden"])
        t[p + "mlp.gate_proj.weight"] = lin(s["intermediate"], s["hidden"])
        t[p + "mlp.up_proj.weight"] = lin(s["intermediate"], s["hidden"])
        t[p + "mlp.down_proj.weight"] = lin(s["hidden"], s["intermediate"])
        t[p + "input_layernorm.weight"] = np.ones(s["hidden"], np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(s["hidden"], np.float32)
    t["model.norm.weight"] = np.ones(s["hidden"], np.float32)
    t["lm_head.weight"] = lin(vocab, s["hidden"])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
              "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
              "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": vocab,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    return write_checkpoint(dest, config, t, smollm2_tokenizer_files(smollm2_gguf_path()), n_shards=2)


def end_to_end(threads: int, work: str) -> list[dict]:
    import llama_cpp

    src = build_1b(os.path.join(work, "tinyllama-shape-1.1b"))
    from so8t_core.source.checkpoint import Checkpoint

    n_params = sum(e.n_elements for e in Checkpoint.open(src).tensors.values())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    ours_out = os.path.join(work, "ours")
    wall_ours, rss_ours = run_measured([os.path.join(os.path.dirname(sys.executable), "so8t-gguf"), "convert", src,
                                        "--quant", "Q4_K_M", "--no-validate", "--output", ours_out,
                                        "--work-dir", tempfile.mkdtemp(dir=work), "--engine", "auto"], env)
    converter = os.path.join(os.environ.get("SO8T_LLAMA_CPP_SRC", os.path.expanduser(
        "~/.cache/so8t-gguf/llama.cpp-0.3.36")), "vendor", "llama.cpp", "convert_hf_to_gguf.py")
    f16 = os.path.join(work, "llama-f16.gguf")
    genv = {**env, "PYTHONPATH": os.path.join(os.path.dirname(converter), "gguf-py")}
    genv.pop("NO_LOCAL_GGUF", None)
    wall_conv, rss_conv = run_measured([sys.executable, converter, src, "--outtype", "f16", "--outfile", f16], genv)
    quant_script = ("import ctypes, sys, llama_cpp; llama_cpp.llama_backend_init(); "
                    "p = llama_cpp.llama_model_quantize_default_params(); p.ftype = 15; p.nthread = int(sys.argv[3]); "
                    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), "
                    "ctypes.byref(p)))")
    wall_q, rss_q = run_measured([sys.executable, "-c", quant_script, f16, os.path.join(work, "llama-q4km.gguf"),
                                  str(threads)], env)
    del llama_cpp
    return [
        {"path": "so8t-gguf convert (one process, Prefect included)", "wall s": wall_ours, "peak RSS MiB": rss_ours},
        {"path": "llama.cpp convert_hf_to_gguf.py --outtype f16", "wall s": wall_conv, "peak RSS MiB": rss_conv},
        {"path": "llama.cpp llama-quantize Q4_K_M", "wall s": wall_q, "peak RSS MiB": rss_q},
        {"path": "llama.cpp total", "wall s": wall_conv + wall_q, "peak RSS MiB": max(rss_conv, rss_q)},
        {"path": f"ratio ours / llama.cpp ({n_params / 1e9:.2f}B parameters)",
         "wall s": wall_ours / (wall_conv + wall_q), "peak RSS MiB": rss_ours / max(rss_conv, rss_q)},
    ]


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "so8t-bench"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'unknown'}), "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; threads: {args.threads}\n")
    if not args.skip_throughput:
        print("(a) quantizing every weight of a 135M-parameter F32 GGUF (pure), best of 3\n")
        print(table(throughput(args.threads, args.work)))
    if not args.skip_e2e:
        print("\n(b) Hugging Face safetensors → Q4_K_M GGUF\n")
        print(table(end_to_end(args.threads, args.work)))
    print(f"\nself peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
