"""Names that become paths, and URIs with credentials, refused before any work: the CLI, the
parameters a Python caller builds, the Prefect form's schema and the catalog follow one rule each
(storage.check_name; storage.refuse_credentials)."""

from __future__ import annotations

import os
import shutil

import jsonschema
import pytest
from prefect.utilities.callables import parameter_schema
from support.cli import PROGRESS_LINE
from support.reliability_record import record

from flows.catalog import parse_catalog, requantize_catalog
from flows.cli import main
from flows.convert import convert
from flows.params import URI_FIELDS, URI_LIST_FIELDS, ConvertParams, check_inputs, release_name
from so8t_core import storage
from so8t_core.errors import CatalogError, So8tError

KEY, SECRET = "AKIANAMESTEST0000001", "name-test-secret-never-shown"


def error_lines(stderr: str) -> list[str]:
    """What the CLI said on stderr but its progress lines ("checking the inputs")."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]


@pytest.mark.parametrize("name", ["m", "smollm2-135m-so8t-demo", "Model_2.5", "a" * 128])
def test_plain_names_pass(name):
    assert storage.check_name(name, "--name") == name


@pytest.mark.parametrize("name", ["", ".", "..", "../../escape", "a/b", "/abs/m", "a\\b", ".hidden", "-flag",
                                  "a b", "naïve", "a\x00b", "a" * 129, "m\n"])
def test_names_that_are_paths_or_odd_are_refused_in_one_line(name):
    with pytest.raises(So8tError) as err:
        storage.check_name(name, "--name")
    assert "\n" not in err.value.one_line() and "not a plain name" in err.value.one_line()


def test_member_names_stay_in_their_folder(tmp_path):
    assert storage.member(str(tmp_path), "x.gguf") == str(tmp_path / "x.gguf")
    assert storage.member("s3://b/r", "x.gguf") == "s3://b/r/x.gguf"
    for bad in ("../x", "a/b", ".x"):
        with pytest.raises(So8tError):
            storage.member(str(tmp_path), bad)
    os.symlink(tmp_path.parent, tmp_path / "link")
    with pytest.raises(So8tError, match="resolves outside its folder"):
        storage.member(str(tmp_path), "link")


def ckpt_named(make_fixture, tmp_path, folder: str) -> str:
    path = tmp_path / folder
    shutil.copytree(make_fixture(), path)
    return str(path)


@pytest.mark.parametrize("name", ["../../escape", "/some/dir/m", "a/b"])
def test_the_cli_refuses_a_name_that_is_a_path_before_any_work(name, make_fixture, tmp_path, capsys):
    """Before: ../../escape published a release two levels above DEST, /some/dir/m wrote GGUFs
    there and crashed, a/b crashed with a traceback after the whole conversion."""
    dest = tmp_path / "a" / "b" / "dest"
    status = main(["convert", make_fixture(), "--output", str(dest), "--name", name, "--no-validate",
                   "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    written = list(tmp_path.iterdir())  # no destination, no work folder, nothing above them
    record("paths", attack=f"--name {name}", refused=int(status == 2), outside=len(written))
    assert status == 2 and len(error_lines(err)) == 1 and "not a plain name" in err and "Traceback" not in err
    assert written == []


def test_a_source_folder_whose_name_is_no_plain_name_needs_name(make_fixture, tmp_path, capsys):
    source = ckpt_named(make_fixture, tmp_path, "my model")
    status = main(["convert", source, "--output", str(tmp_path / "out"), "--no-validate",
                   "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    record("paths", attack="a source folder named 'my model'", refused=int(status == 2),
           outside=int((tmp_path / "out").exists() or (tmp_path / "work").exists()))
    assert status == 2 and "the source folder's name my model: not a plain name" in err and "pass --name" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    assert release_name(ConvertParams(source=source, name="my-model")) == "my-model"
    assert release_name(ConvertParams(source=None)) == "smollm2-135m-so8t-demo"
    assert release_name(ConvertParams(source="s3://bucket/ckpts/fx/")) == "fx"


def test_the_flow_checks_the_name_again_for_python_callers(tmp_path):
    """Python can build parameters without their validation (model_construct): the flow's own
    check refuses the name before a run does any work."""
    params = ConvertParams.model_construct(**{**ConvertParams().model_dump(), "name": "../../escape",
                                              "output": str(tmp_path / "out")})
    with pytest.raises(So8tError, match="not a plain name"):
        check_inputs(params)


def test_a_name_differing_only_in_case_from_a_published_model_is_refused(make_fixture, tmp_path, capsys):
    """On case-insensitive storage (macOS, Windows, many shares) Model and model are one folder."""
    out = tmp_path / "out"
    (out / "Fx").mkdir(parents=True)
    status = main(["convert", make_fixture(), "--output", str(out), "--name", "fx", "--no-validate",
                   "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    record("paths", attack="--name fx beside a model Fx (case-insensitive storage)", refused=int(status == 2),
           outside=int(sorted(p.name for p in out.iterdir()) != ["Fx"]))
    assert status == 2 and "already holds the model Fx" in err and "use --name Fx" in err
    assert sorted(p.name for p in out.iterdir()) == ["Fx"]


# --- Credentials in URIs ------------------------------------------------------------------------

CREDENTIALED = f"s3://{KEY}:{SECRET}@bucket/x"


@pytest.mark.parametrize("field", URI_FIELDS + URI_LIST_FIELDS)
def test_credentials_in_any_uri_are_refused_when_the_parameters_are_made(field):
    value = CREDENTIALED.replace("s3://", "tcp://") if field == "dask_address" else CREDENTIALED
    value = ["s3://bucket/fine.txt", value] if field in URI_LIST_FIELDS else value
    with pytest.raises(So8tError) as err:
        ConvertParams(**{field: value})
    text = err.value.one_line() + repr(err.value)
    assert "credentials in the URI are not accepted" in text and SECRET not in text and KEY not in text


@pytest.mark.parametrize("option", ["SOURCE", "--output", "--lora", "--imatrix", "--calibration", "--work-dir"])
def test_the_cli_refuses_credentials_in_any_uri_in_one_line(option, tmp_path, capsys):
    argv = ["convert", "ckpt", "--output", str(tmp_path / "out")]
    argv = ["convert", CREDENTIALED, "--output", str(tmp_path)] if option == "SOURCE" else argv + [option, CREDENTIALED]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert len(error_lines(out.err)) == 1 and "credentials in the URI are not accepted" in out.err
    assert SECRET not in out.err + out.out and KEY not in out.err + out.out


def test_the_form_refuses_credentials_before_a_run_is_created():
    """A deployment's run is created from the form's values after the server checks them against the
    schema: a credentialed URI never reaches a run's stored parameters."""
    for flow, wrap in ((convert, lambda v: {"params": v}), (requantize_catalog, lambda v: v)):
        schema = parameter_schema(flow.fn).model_dump()
        fields = URI_FIELDS if flow is convert else ("catalog", "work_dir")
        for field in fields + (URI_LIST_FIELDS if flow is convert else ()):
            value = CREDENTIALED.replace("s3://", "tcp://") if field == "dask_address" else CREDENTIALED
            good = value.replace(f"{KEY}:{SECRET}@", "")
            value, good = ([value], [good]) if field in URI_LIST_FIELDS else (value, good)
            base = {} if flow is convert else {"catalog": "s3://b/c.yaml"}
            jsonschema.validate(wrap({**base, field: good}), schema)
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(wrap({**base, field: value}), schema)


def test_a_catalog_with_credentials_or_names_clashing_by_case_is_refused():
    with pytest.raises(CatalogError) as err:
        parse_catalog(f"destination: /d\nmodels:\n  - {{name: a, source: '{CREDENTIALED}'}}\n", "c.yaml")
    assert "credentials in the URI are not accepted" in str(err.value) and SECRET not in str(err.value)
    with pytest.raises(CatalogError) as err:
        parse_catalog(f"models:\n  - {{name: a, source: /s, destination: '{CREDENTIALED}'}}\n", "c.yaml")
    assert SECRET not in str(err.value)
    with pytest.raises(CatalogError, match="appears twice"):
        parse_catalog("destination: /d\nmodels:\n  - {name: Foo, source: /s}\n  - {name: foo, source: /t}\n",
                      "c.yaml")
