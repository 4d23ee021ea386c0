"""Our GGUF against llama.cpp's own convert_hf_to_gguf.py, on the same (baked) weights.

Each case is a fixture checkpoint converted twice: by llama.cpp's converter (the version
llama-cpp-python 0.3.36 vendors, run in a subprocess; see llama_cpp_oracle.py) and by our
library, called directly. Compared:

* tensors: the same names, and for each the same type, shape and bytes;
* metadata: every key convert writes is in ours, with the same value type and value
  (floats as float32), in the same relative order; and ours has no key convert lacks
  except our ``so8t.*`` provenance keys.

Not compared: the order of tensors in the file. Ours is the plan's order (non-block
tensors, then by block, sorted by name, as llama-quantize writes); convert writes them in
the order the safetensors files list them. llama.cpp looks tensors up by name.

An SO8T checkpoint is compared with convert's output for the same model baked by us into
a plain Hugging Face folder (o_proj folded, everything else as in the checkpoint, HF layout):
so the gates fold to exactly the tensors convert writes for the folded model.

All conversions run once per module, convert's in parallel (support.llama_cpp_oracle).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from support.llama_cpp_oracle import convert_all_with_llama_cpp, llama_cpp_dir

from so8t_core.analysis import checkpoint_model
from so8t_core.assemble.sequential import convert_sequential
from so8t_core.constants import quant_type
from so8t_core.gguf_file import read_gguf
from so8t_core.plan import materialize
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.testing.checkpoint_writer import write_checkpoint

pytestmark = pytest.mark.e2e  # runs llama.cpp's convert_hf_to_gguf.py

# The fixtures' tokenizer is a small random byte-level BPE with plain GPT-2 pre-tokenization.
# convert knows pre-tokenizers only by the hash of one vocabulary's token ids, so it refuses it;
# the oracle answers an unknown hash (only that) with this name, the one our tokenizer module picks
# from the tokenizer.json structure. tokenizer.ggml.pre is therefore not an independent check here.
FIXTURE_BPE_PRE = "gpt-2"

# Keys convert writes that ours may legitimately differ on: none. general.* comes from gguf-py's own
# gguf.Metadata over the same model card, config.json, generation_config.json and folder name (our
# --name is the output file name, like convert's --outfile; general.name follows the folder as in
# convert), so even general.name, basename, size_label... must be equal.
EXEMPT_KEYS: dict[str, str] = {}
OUR_KEY_PREFIX = "so8t."

MODEL_CARD = """---
license: apache-2.0
language:
- en
- "no"
tags:
- so8t
- test
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
datasets:
- HuggingFaceTB/smoltalk
pipeline_tag: text-generation
---
# Acme Tiny

A test model card: its front matter becomes general.* keys.
"""
GENERATION_CONFIG = (b'{"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 40, '
                     b'"repetition_penalty": 1.1}\n')
# Folder name with all of gguf.Metadata's heuristics at work: basename, a size that is not the
# model's (so it lands in finetune), a version, a finetune word.
MODEL_CARD_FOLDER = "Acme-Tiny-7B-v0.2-Instruct"

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
YARN_ROPE = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32.0,
             "beta_slow": 1.0, "attention_factor": 1.2}

# name -> (FixtureSpec arguments, outtypes). All plain (so8t=False) unless named so8t-*.
CASES: dict[str, tuple[dict, tuple[str, ...]]] = {
    "llama": (dict(arch="llama"), ("f32",)),
    "mistral": (dict(arch="mistral"), ("f32",)),
    # Qwen2-0.5B's width: 14 heads of 64; one layer and a small MLP keep it light.
    "qwen2-896": (dict(arch="qwen2", hidden=896, heads=14, kv_heads=2, layers=1, intermediate=128), ("f32",)),
    "qwen3-head-dim": (dict(arch="qwen3", head_dim=32), ("f32",)),  # attention width 128 ≠ hidden 64
    "phi3": (dict(arch="phi3"), ("f32",)),
    "phi3-longrope": (dict(arch="phi3", longrope=True), ("f32",)),
    "llama-tied": (dict(tied=True), ("f32",)),
    "llama-vocab-padding": (dict(tokenizer_vocab=300), ("f32",)),
    "llama3-rope": (dict(extra_config={"rope_scaling": LLAMA3_ROPE}), ("f32",)),
    "qwen2-yarn": (dict(arch="qwen2", extra_config={"rope_scaling": YARN_ROPE}), ("f32",)),
    "llama-model-card": (dict(), ("f32",)),
    # Rows of 80 are not whole Q8_0 blocks (32): those tensors fall back to F16, ffn_down (96) does not.
    "llama-quant": (dict(hidden=80, heads=4, kv_heads=2, intermediate=96, vocab=320), ("f16", "bf16", "q8_0")),
    "so8t-pre-cayley": (dict(so8t=True), ("f32",)),
    "so8t-post-expm-bias": (dict(so8t=True, rotation="expm", position="post_o_proj", attention_bias=True,
                                 layers=3, gated_layers=(0, 2), tied=True), ("f32",)),
    # Gemma 2: sandwich norms written +1, soft-capping and sliding-window keys, lm_head dropped (tied),
    # SentencePiece without a dummy prefix; head_dim 32 makes the attention width 128 ≠ hidden 64.
    "gemma2": (dict(arch="gemma2", head_dim=32), ("f32",)),
    "so8t-gemma2-pre": (dict(arch="gemma2", so8t=True), ("f32",)),
    "so8t-gemma2-post": (dict(arch="gemma2", so8t=True, position="post_o_proj", layers=3, gated_layers=(1,)),
                         ("f32",)),
    # BF16 weights: the +1 of the norms in float32, as convert adds it (not in BF16)
    "gemma2-bf16": (dict(arch="gemma2", dtype="bfloat16"), ("f32",)),
    # Gemma 3: q/k norms (+1 too), two RoPE bases (global, sliding), the global layers' linear scaling and
    # final soft-capping when set, lm_head dropped (tied); SentencePiece or a byte-level BPE.
    "gemma3": (dict(arch="gemma3", head_dim=32), ("f32",)),
    "gemma3-bpe-scaled": (dict(arch="gemma3", tokenizer="bpe", layers=6, extra_config={
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "final_logit_softcapping": 30.0}), ("f32",)),
    "so8t-gemma3-post": (dict(arch="gemma3", so8t=True, position="post_o_proj", rotation="expm"), ("f32",)),
    # Mixture of experts: one tensor per expert and projection in the checkpoint, stacked into
    # ffn_{gate,up,down}_exps; the router (ffn_gate_inp); expert counts and widths; the size label "4x…".
    "mixtral": (dict(arch="mixtral"), ("f32",)),
    "qwen2moe": (dict(arch="qwen2moe", expert_intermediate=32, shared_intermediate=96), ("f32",)),
    "qwen3moe": (dict(arch="qwen3moe", head_dim=32, experts=8, experts_used=2), ("f32",)),
    "so8t-mixtral-post": (dict(arch="mixtral", so8t=True, position="post_o_proj"), ("f32",)),
    "so8t-qwen2moe-pre": (dict(arch="qwen2moe", so8t=True, expert_intermediate=32), ("f32",)),
}


def plain_spec(kwargs: dict) -> dict:
    return {"so8t": False, **kwargs}


def baked_folder(ckpt: Checkpoint, dest: str) -> str:
    """The SO8T checkpoint as the plain model it stands for: every planned tensor materialized, in
    Hugging Face layout (no llama.cpp Q/K permutation, which convert applies itself), gates folded."""
    _, _, plan = checkpoint_model(ckpt)
    tensors = {}
    for item in plan:
        if item.transform == "constant":
            continue  # computed from config.json (RoPE factors): convert generates it too
        if item.transform.startswith("bake"):
            tensors[item.source], _ = materialize(item, ckpt.read, ckpt.uri)
        else:
            tensors.update({name: ckpt.read(name) for name in item.sources or (item.source,)})
    config = {k: v for k, v in ckpt.config.items() if k != "so8t"}
    src = ckpt.uri
    files = {n: open(os.path.join(src, n), "rb").read() for n in sorted(os.listdir(src))
             if not n.endswith((".safetensors", ".safetensors.index.json")) and n != "config.json"}
    return write_checkpoint(dest, config, tensors, files, n_shards=1, dtype="float32")


def convert_ours(src: str, out: str, quant: str, work: str) -> str:
    """Our conversion, as the flow runs it but in-process (no Prefect)."""
    convert_sequential(Checkpoint.open(src), quant, out, work)
    return out


@pytest.fixture(scope="module")
def converted(make_fixture, tmp_path_factory):
    """case -> outtype -> (llama.cpp's GGUF, ours), or the exception that conversion raised."""
    llama_cpp_dir()  # fail up front, with the hint, when the converter is not there
    root = tmp_path_factory.mktemp("parity")
    work = str(root / "staging")
    jobs, ours = [], {}
    for case, (kwargs, outtypes) in CASES.items():
        src = make_fixture(**plain_spec(kwargs))
        oracle_src = src
        if case == "llama-model-card":
            src = shutil.copytree(src, root / case / MODEL_CARD_FOLDER)
            (src / "README.md").write_text(MODEL_CARD, encoding="utf-8")
            (src / "generation_config.json").write_bytes(GENERATION_CONFIG)
            src = oracle_src = str(src)
        elif case.startswith("so8t-"):
            # Same folder name as the SO8T checkpoint, so general.name & co. are comparable.
            oracle_src = baked_folder(Checkpoint.open(src), str(root / case / "baked" / os.path.basename(src)))
        for outtype in outtypes:
            out = root / case / f"{outtype}"
            out.mkdir(parents=True, exist_ok=True)
            ours[case, outtype] = convert_ours(src, str(out / "ours.gguf"), outtype.upper(), work)
            jobs.append((case, outtype, oracle_src, str(out / "llama-cpp.gguf")))

    results = convert_all_with_llama_cpp([(src, out, outtype) for _, outtype, src, out in jobs],
                                         unknown_bpe_pre=FIXTURE_BPE_PRE)
    theirs = dict(zip([(c, o) for c, o, _, _ in jobs], results, strict=True))
    return {key: (theirs[key], ours[key]) for key in ours}


def pair(converted, case: str, outtype: str = "f32"):
    theirs, ours = converted[case, outtype]
    if isinstance(theirs, Exception):
        raise theirs
    return read_gguf(theirs), read_gguf(ours)


def as_float32(value):
    if isinstance(value, float):
        return np.float32(value)
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    return value


def tensor_differences(theirs, ours) -> list[str]:
    t_by_name = {t.name: t for t in theirs.tensors}
    o_by_name = {t.name: t for t in ours.tensors}
    problems = []
    if set(t_by_name) != set(o_by_name):
        problems.append(f"tensor names: only llama.cpp {sorted(set(t_by_name) - set(o_by_name))}, "
                        f"only ours {sorted(set(o_by_name) - set(t_by_name))}")
    for name in sorted(set(t_by_name) & set(o_by_name)):
        t, o = t_by_name[name], o_by_name[name]
        if t.tensor_type != o.tensor_type:
            problems.append(f"{name}: type {o.tensor_type.name}, llama.cpp {t.tensor_type.name}")
        elif list(t.shape) != list(o.shape):
            problems.append(f"{name}: shape {list(o.shape)}, llama.cpp {list(t.shape)}")
        elif bytes(t.data) != bytes(o.data):
            problems.append(f"{name}: bytes differ")
    return problems


def metadata_differences(theirs, ours) -> list[str]:
    problems = []
    t_fields = {k: f for k, f in theirs.reader.fields.items() if not k.startswith("GGUF.")}
    o_fields = {k: f for k, f in ours.reader.fields.items() if not k.startswith("GGUF.")}
    for key, field in t_fields.items():
        if key in EXEMPT_KEYS:
            continue
        if key not in o_fields:
            problems.append(f"{key}: missing (llama.cpp: {str(field.contents())[:80]})")
            continue
        if o_fields[key].types != field.types:
            problems.append(f"{key}: type {[t.name for t in o_fields[key].types]}, "
                            f"llama.cpp {[t.name for t in field.types]}")
        mine, expected = o_fields[key].contents(), field.contents()
        if as_float32(mine) != as_float32(expected):
            problems.append(f"{key}: {str(mine)[:80]!r}, llama.cpp {str(expected)[:80]!r}")
    shared_theirs = [k for k in t_fields if k in o_fields]
    shared_ours = [k for k in o_fields if k in t_fields]
    if shared_ours != shared_theirs:
        first = next(i for i, (a, b) in enumerate(zip(shared_ours, shared_theirs)) if a != b)
        problems.append(f"key order differs from position {first}: ours {shared_ours[first:first + 3]}, "
                        f"llama.cpp {shared_theirs[first:first + 3]}")
    return problems


F32_CASES = [c for c, (_, outtypes) in CASES.items() if "f32" in outtypes]


@pytest.mark.parametrize("case", F32_CASES)
def test_tensors_match_llama_cpp(converted, case):
    theirs, ours = pair(converted, case)
    problems = tensor_differences(theirs, ours)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", F32_CASES)
def test_metadata_matches_llama_cpp(converted, case):
    theirs, ours = pair(converted, case)
    problems = metadata_differences(theirs, ours)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", F32_CASES)
def test_no_keys_beyond_llama_cpp_but_ours(converted, case):
    theirs, ours = pair(converted, case)
    extra = [k for k in ours.reader.fields if k not in theirs.reader.fields and not k.startswith(OUR_KEY_PREFIX)]
    assert not extra, f"keys llama.cpp's converter does not write: {extra}"


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_quantized_file_type_tensor_types_and_bytes(converted, outtype):
    theirs, ours = pair(converted, "llama-quant", outtype)
    problems = tensor_differences(theirs, ours) + metadata_differences(theirs, ours)
    assert not problems, "\n".join(problems)
    assert ours.value("general.file_type") == quant_type(outtype).file_type
    types = {t.name: t.tensor_type.name for t in ours.tensors}
    assert all(types[n] == "F32" for n in types if "norm" in n)
    if outtype == "q8_0":  # both kinds present: whole Q8_0 rows and the F16 fallback
        assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "F16"


def test_model_card_keys_are_really_there(converted):
    """The model-card case is only worth its name if general.* really came from the card and folder."""
    theirs, ours = pair(converted, "llama-model-card")
    for key in ("general.license", "general.tags", "general.languages", "general.base_model.0.name",
                "general.dataset.0.name", "general.basename", "general.finetune", "general.version",
                "general.sampling.temp", "general.sampling.penalty_repeat"):
        assert key in theirs.reader.fields and key in ours.reader.fields, key
    assert ours.value("general.name") == "Acme Tiny 7B v0.2 Instruct"


def test_so8t_fixture_really_is_baked(converted, make_fixture):
    """The SO8T cases compare baked o_proj tensors, not copies: the gates change them."""
    theirs, ours = pair(converted, "so8t-pre-cayley")
    ckpt = Checkpoint.open(make_fixture(so8t=True))
    unbaked = ckpt.read("model.layers.0.self_attn.o_proj.weight")
    assert not np.array_equal(ours.dequantized(ours.tensor("blk.0.attn_output.weight")), unbaked)
    assert ours.value("so8t.baked_layers") == [0, 1]


def test_missing_converter_fails_with_the_way_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SO8T_LLAMA_CPP_SRC", str(tmp_path / "nowhere"))
    with pytest.raises(pytest.fail.Exception, match=r"make test.*make install"):
        llama_cpp_dir()


def test_missing_hyperparameters_take_transformers_defaults_as_llama_cpp_does():
    from so8t_core.source.architectures import model_spec

    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 300}
    qwen3 = model_spec({"architectures": ["Qwen3ForCausalLM"], **base}, "x")
    assert qwen3.head_dim == 128 and qwen3.attention_width == 512  # Qwen3Config's default, not 64 // 4
    llama = model_spec({"architectures": ["LlamaForCausalLM"], **base}, "x")
    assert (llama.head_dim, llama.rms_norm_eps, llama.context_length, llama.rope_theta) == (16, 1e-6, 2048, 10000.0)


def test_the_defaults_table_matches_the_installed_transformers():
    import transformers

    from so8t_core.source.architectures import HF_CONFIG_DEFAULTS

    for arch, defaults in HF_CONFIG_DEFAULTS.items():
        cfg = getattr(transformers, arch).config_class(hidden_size=64, num_attention_heads=4)
        for key, value in defaults.items():
            actual = getattr(cfg, key, None)
            if key == "rope_theta" and actual is None:
                actual = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
            assert actual == (16 if value == "hidden/heads" else value), (arch, key, actual)
        assert getattr(cfg, "head_dim", None) is None or "head_dim" in defaults, arch
