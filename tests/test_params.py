"""One definition of the convert parameters: ConvertParams is what the flow takes, what the
Prefect form shows and what the CLI's options are made of; nothing may drift from it."""

from __future__ import annotations

import argparse
import inspect

import pytest
from prefect.utilities.callables import parameter_schema

from flows.catalog import ModelEntry
from flows.cli import build_parser
from flows.convert import convert
from flows.convert_model import convert_model
from flows.params import Cli, ConvertParams, QuantMix, cli_spelling, from_cli
from so8t_core.constants import QUANT_TYPES
from so8t_core.errors import So8tError
from so8t_core.quantize.engines import ENGINES

CLI_ONLY = {"help", "json", "quiet", "verbose", "dry_run"}  # how the CLI shows a run (or its plan), not what it does


def convert_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["convert"]


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_the_cli_has_one_option_per_field_with_its_description_as_help():
    actions = {a.dest: a for a in convert_parser()._actions}
    assert set(actions) - CLI_ONLY == set(ConvertParams.model_fields)
    for field, info in ConvertParams.model_fields.items():
        spelling = cli_spelling(field)
        assert actions[field].help == (spelling.help or info.description), field
        if not spelling.positional:
            assert spelling.flag in actions[field].option_strings, field


def test_both_flows_take_convert_params_and_nothing_else():
    for flow in (convert, convert_model):
        parameters = inspect.signature(flow.fn).parameters
        assert list(parameters) == ["params"] and parameters["params"].annotation in ("ConvertParams", ConvertParams)


def test_the_form_is_convert_params():
    schema = parameter_schema(convert_model.fn).model_dump()
    form = resolve(schema, schema["properties"]["params"])
    assert set(form["properties"]) == set(ConvertParams.model_fields)
    quants = form["properties"]["quants"]
    assert quants["type"] == "array" and quants["minItems"] == 1
    assert resolve(schema, quants["items"])["enum"] == list(QUANT_TYPES)
    assert resolve(schema, form["properties"]["engine"])["enum"] == list(ENGINES)
    for field, info in ConvertParams.model_fields.items():
        assert form["properties"][field].get("description") == info.description, field
    # The flow the CLI runs gets the same form.
    direct = parameter_schema(convert.fn).model_dump()
    assert resolve(direct, direct["properties"]["params"])["properties"].keys() == form["properties"].keys()


def test_the_catalog_names_only_convert_params():
    assert set(ModelEntry.model_fields) - {"destination"} <= set(ConvertParams.model_fields)


def test_no_options_are_the_defaults_and_every_option_reaches_its_field():
    parse = convert_parser().parse_args
    assert from_cli(parse([])) == ConvertParams()
    argv = ["ckpt", "--output", "s3://b/x", "--quant", "q4_k_m", "Q8_0", "--no-validate", "--name", "m",
            "--engine", "simd", "--max-memory", "3.5", "--work-dir", "/w", "--split-max-size", "2G",
            "--split-max-tensors", "9", "--tensor-type", "attn_v=q8_0", "--tensor-type", "ffn=q5_k",
            "--output-tensor-type", "q6_k", "--token-embedding-type", "Q8_0", "--pure", "--allow-tokenizer-mismatch",
            "--imatrix", "im.gguf", "--calibration", "a.txt", "s3://b/chats.jsonl", "--calibration-ctx", "256",
            "--calibration-chunks", "40", "--eval-text", "s3://b/eval.txt", "--eval-ctx", "256", "--eval-chunks", "7",
            "--max-kld", "0.5", "--min-same-top", "0.8", "--target-bpw", "4.5", "--target-size", "700M",
            "--target-kld", "0.05",
            "--lora", "adapter", "--runner", "dask", "--dask-address", "tcp://h:8786"]
    p = from_cli(parse(argv))
    assert p.model_dump(mode="json") == {
        "source": "ckpt", "output": "s3://b/x", "quants": ["Q4_K_M", "Q8_0"], "run_validation": False, "name": "m",
        "engine": "simd", "max_memory_gb": 3.5, "work_dir": "/w", "split_max_size": "2G", "split_max_tensors": 9,
        "tensor_types": ["attn_v=q8_0", "ffn=q5_k"], "output_tensor_type": "Q6_K", "token_embedding_type": "Q8_0",
        "pure": True, "allow_tokenizer_mismatch": True, "imatrix": "im.gguf", "calibration": ["a.txt", "s3://b/chats.jsonl"],
        "calibration_ctx": 256, "calibration_chunks": 40, "eval_text": "s3://b/eval.txt", "eval_ctx": 256,
        "eval_chunks": 7, "max_kld": 0.5, "min_same_top": 0.8, "lora": "adapter", "runner": "dask",
        "dask_address": "tcp://h:8786", "target_bpw": 4.5, "target_size": "700M",
        "target_kld": 0.05}
    assert set(p.model_dump()) == set(ConvertParams.model_fields)  # the argv above sets every field
    assert p.split_max_bytes == 2_000_000_000 and p.quant_names == ["Q4_K_M", "Q8_0"]
    assert p.target_size_bytes == 700_000_000


@pytest.mark.parametrize("argv, words", [
    (["--name", "a/b"], ["--name a/b", "not a plain name"]),
    (["--name", "../../escape"], ["--name ../../escape", "not a plain name"]),
    (["--split-max-size", "lots"], ["--split-max-size lots", "not a size"]),
    (["--split-max-tensors", "-1"], ["--split-max-tensors -1", "greater than or equal to 0"]),
    (["--max-memory", "-1"], ["--max-memory -1", "greater than or equal to 0"]),
    (["--calibration-ctx", "8"], ["--calibration-ctx 8", "greater than or equal to 16"]),
    (["--min-same-top", "40"], ["--min-same-top 40", "less than or equal to 1"]),
    (["--quant", "Q8_K"], ["--quant Q8_K", "not a file type"]),
    (["--output-tensor-type", "q7"], ["--output-tensor-type", "not a tensor type"]),
    (["--target-bpw", "-1"], ["--target-bpw -1", "greater than or equal to 0"]),
    (["--target-size", "big"], ["--target-size big", "not a size"]),
    (["--target-kld", "-0.1"], ["--target-kld -0.1", "greater than or equal to 0"]),
    (["--target-kld", "0"], ["--target-kld 0", "must be greater than 0"]),
])
def test_a_value_the_fields_refuse_is_one_line_naming_the_option(argv, words):
    with pytest.raises(So8tError) as err:
        from_cli(convert_parser().parse_args(argv))
    line = err.value.one_line()
    assert "\n" not in line and all(w in line for w in words), line


def test_names_and_types_are_case_insensitive_on_the_form_too():
    p = ConvertParams(quants=["q4_k_m", "Q8_0"], engine="simd", name="", output_tensor_type="q8_0")
    assert p.quant_names == ["Q4_K_M", "Q8_0"] and p.name == "" and p.output_tensor_type.value == "Q8_0"
    assert p.quants[0] is QuantMix.Q4_K_M
    for bad in ({"quants": ["Q9_9"]}, {"quants": []}, {"engine": "cuda"}, {"quant": ["Q8_0"]},
                {"split_max_size": "lots"}, {"name": "a/b"}):
        with pytest.raises(ValueError):
            ConvertParams(**bad)


def test_llama_quantizes_aliases_name_their_mixes_on_the_cli_the_form_and_in_a_catalog():
    from flows.catalog import parse_catalog

    argv = ["--quant", "q4_k", "Q5_K", "q3_K"]
    assert from_cli(convert_parser().parse_args(argv)).quant_names == ["Q4_K_M", "Q5_K_M", "Q3_K_M"]
    assert ConvertParams(quants=["q4_k", "Q4_K_M"]).quant_names == ["Q4_K_M"]
    (model,) = parse_catalog("destination: /d\nquants: [q4_k, q8_0]\nmodels:\n  - {name: a, source: /s}\n",
                             "/c.yaml")
    assert model.quants == ("Q4_K_M", "Q8_0")


def test_a_source_after_quant_is_taken_for_a_mix_and_the_hint_says_so(tmp_path, monkeypatch):
    def refused(argv):
        with pytest.raises(So8tError) as err:
            from_cli(convert_parser().parse_args(argv))
        return err.value.one_line()

    line = refused(["--quant", "Q8_0", "q4_k", "models/my-so8t"])
    assert line.startswith("--quant models/my-so8t: not a quant mix; --quant takes every word after it")
    assert "(hint: put SOURCE before --quant: so8t-gguf convert models/my-so8t --quant Q8_0 q4_k)" in line
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()  # a bare folder name, there in the working folder
    assert "so8t-gguf convert ckpt --quant Q8_0)" in refused(["--quant", "ckpt"])
    assert "unknown or not yet supported quant type" in refused(["--quant", "Q9"])  # a typo is a typo


def test_json_and_quiet_exclude_each_other(capsys):
    from flows.cli import build_parser

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["convert", "--json", "--quiet"])
    assert exit.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_markers_are_where_a_plain_flag_will_not_do():
    spelled = {f for f, info in ConvertParams.model_fields.items() if any(isinstance(m, Cli) for m in info.metadata)}
    plain = set(ConvertParams.model_fields) - spelled
    assert all(cli_spelling(f).flag == "--" + f.replace("_", "-") for f in plain)


def test_the_form_has_plain_fields_with_defaults_and_human_labels():
    """Prefect's form shows an optional (``X | None``) field as a type toggle ("Property is type
    None") that needs a click before typing: every field is a plain one with a default, a leaf
    of the form (no anyOf), labelled, with help text that Markdown shows as written."""
    schema = parameter_schema(convert_model.fn).model_dump()
    form = resolve(schema, schema["properties"]["params"])
    assert not form.get("required")
    for field, prop in form["properties"].items():
        assert "anyOf" not in prop and "null" not in str(prop.get("type")), field
        assert "default" in prop, field
        title = prop["title"]
        assert title[0].isupper() and "_" not in title and title != field, field
        assert not set("<>*`") & set(prop["description"]), field  # HTML and Markdown markup
    assert len({p["title"] for p in form["properties"].values()}) == len(form["properties"])


def test_a_form_left_alone_or_cleared_is_the_defaults():
    """What a form sends for fields the user leaves alone or clears, and what Python callers pass
    for "not given" (None), all mean the default."""
    cleared = {"source": "", "name": " ", "work_dir": "", "split_max_size": "", "imatrix": "", "lora": "",
               "dask_address": "", "max_memory_gb": 0, "output_tensor_type": "default", "token_embedding_type": ""}
    assert ConvertParams(**cleared) == ConvertParams() == ConvertParams(**{k: None for k in cleared})
    assert ConvertParams(output_tensor_type="Default").output_tensor_type == ConvertParams().output_tensor_type
    parse = convert_parser().parse_args
    assert from_cli(parse(["--output-tensor-type", "default", "--max-memory", "0"])) == ConvertParams()
