"""lora-gguf and validate --lora on the command line: one line for what they refuse."""

import os

from support.cli import run
from support.lora import FIXTURE, write_adapter


def test_cli_writes_the_adapter_and_refuses_in_one_line(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    adapter = write_adapter(tmp_path / "adapter", src)
    out = run("lora-gguf", adapter, "--base", src, "--output", str(tmp_path / "a.gguf"))
    assert out.returncode == 0, out.stderr
    assert "a.gguf" in out.stdout and "adapter.lora.alpha 8" in out.stdout and "q_proj" in out.stdout

    # Its pairs name a module the model does not have (c_fc is GPT-2's MLP): nothing to adapt.
    from safetensors.numpy import load_file, save_file

    bad = write_adapter(tmp_path / "bad", src, modules=("self_attn.q_proj",), layers=(0,))
    path = os.path.join(bad, "adapter_model.safetensors")
    save_file({k.replace("self_attn.q_proj", "mlp.c_fc"): v for k, v in load_file(path).items()}, path)
    out = run("lora-gguf", bad, "--base", src, "--output", str(tmp_path / "b.gguf"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "target no weight" in lines[0], out.stderr
    assert not (tmp_path / "b.gguf").exists()


def test_validate_lora_needs_both_files_and_an_adapter_gguf(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    out = run("validate", str(tmp_path / "m.gguf"), "--reference", src, "--lora", str(tmp_path / "a.gguf"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--lora-reference" in lines[0], out.stderr
