"""A catalog file as read: defaults, overrides, relative paths, staleness, and bad catalogs in one line."""


import pytest

from flows.catalog import CatalogModel, load_catalog, parse_catalog, quant_status
from so8t_core.constants import CONVERTER
from so8t_core.errors import CatalogError

URL = "s3://bucket/catalogs/nightly.yaml"


def test_catalog_defaults_overrides_and_relative_paths(tmp_path):
    text = """
destination: ../releases
quants: [q8_0, Q4_K_M]
run_validation: false
models:
  - name: a
    source: s3://ckpts/a
  - name: b
    source: ckpts/b
    quants: [F16, F16]
    destination: s3://other/models
    run_validation: true
    engine: ggml
"""
    a, b = parse_catalog(text, URL)
    assert a == CatalogModel(name="a", source="s3://ckpts/a", destination="s3://bucket/releases",
                             quants=("Q8_0", "Q4_K_M"), run_validation=False, engine="auto")
    assert b == CatalogModel(name="b", source="s3://bucket/catalogs/ckpts/b", destination="s3://other/models",
                             quants=("F16",), run_validation=True, engine="ggml")
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text(text)
    local = load_catalog(str(path))
    assert local[0].destination == str(tmp_path / "releases") and local[1].source == str(tmp_path / "sub/ckpts/b")


@pytest.mark.parametrize("text, fragments", [
    ("destination: /d\nmodels:\n  - name: a\n", ["models[0].source (model a): missing (required)"]),
    ("destination: /d\nmodels:\n  - {name: a, source: /s, quants: [Q8_0, Q9_9]}\n",
     ["models[0].quants[1] (model a): 'Q9_9' is not a quant mix", "choose from 'F32'", "'Q2_K'"]),
    ("destination: /d\nquants: [Q7]\nmodels:\n  - {name: a, source: /s}\n", ["quants[0]: 'Q7' is not a quant mix"]),
    ("destination: /d\nmodels:\n  - {name: a, source: /s, quant: [Q8_0]}\n",
     ["models[0].quant (model a): unknown field", "fields here: name, source, quants"]),
    ("destination: /d\nmodels:\n  - {name: a, source: /s, engine: cuda}\n", ["'cuda' is not a valid engine"]),
    ("destination: /d\nmodels: []\n", ["models: list should have at least 1 item"]),
    ("models:\n  - {name: a, source: /s}\n", ["models[0] (model a): no destination"]),
    ("destination: /d\nmodels:\n  - {name: a, source: /s}\n  - {name: a, source: /t}\n", ["appears twice"]),
    ("destination: /d\nmodels:\n  - {name: a/b, source: /s}\n",
     ["models[0].name (model a/b): 'a/b' is not a valid model name"]),
    ("destination: /d\nmodels: [\n", ["not valid YAML", "line 3"]),
    ("- a\n- b\n", ["must be a mapping"]),
    ("", ["empty"]),
])
def test_a_bad_catalog_is_one_line_naming_the_catalog_and_the_problem(text, fragments):
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, URL)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"catalog {URL}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_a_missing_catalog_is_one_line(tmp_path):
    with pytest.raises(CatalogError, match=r"^catalog .*/nope\.yaml: file not found \(hint: check the catalog URL\)$"):
        load_catalog(str(tmp_path / "nope.yaml"))


def test_what_makes_a_quant_stale():
    fp = "f" * 64
    entry = {"source_fingerprint": fp, "release": f"{fp[:16]}/Q8_0/", "gguf": "m-Q8_0.gguf"}
    manifest = {"source_fingerprint": fp, "converter": CONVERTER, "validation": {"passed": True}}
    assert quant_status(fp, entry, manifest, True) is None
    assert quant_status(fp, entry, {**manifest, "validation": None}, False) is None
    assert quant_status(fp, None, None, True) == "not published yet"
    assert quant_status("e" * 64, entry, manifest, True).startswith("source changed (ffffffffffffffff -> eeee")
    assert quant_status(fp, entry, None, True) == "release incomplete (no manifest.json)"
    assert quant_status(fp, entry, {**manifest, "converter": "so8t-gguf 0.0.1"}, True) == \
        f"converter changed (so8t-gguf 0.0.1 -> {CONVERTER})"
    assert quant_status(fp, entry, {**manifest, "validation": None}, True) == "published without validation"


def test_a_target_mix_is_a_release_of_its_own():
    text = """
destination: s3://b/releases
quants: [Q4_K_M, Q8_0]
target_bpw: 4.5
models:
  - name: a
    source: s3://ckpts/a
  - name: b
    source: s3://ckpts/b
    target_bpw: 3.25
  - name: c
    source: s3://ckpts/c
"""
    a, b, _ = parse_catalog(text, URL)
    assert a.releases == ("Q4_K_M", "Q8_0", "AUTO-4.50") and b.releases == ("Q4_K_M", "Q8_0", "AUTO-3.25")
    # only the target stale: the run still needs one mix (its release is republished unchanged)
    p = a.convert_params({"AUTO-4.50": "not published yet"}, "/w")
    assert p.quant_names == ["Q4_K_M"] and p.target_bpw == 4.5
    p = a.convert_params({"Q8_0": "source changed"}, "/w")
    assert p.quant_names == ["Q8_0"] and p.target_bpw == 0
    assert parse_catalog(text.replace("target_bpw: 4.5\n", ""), URL)[2].releases == ("Q4_K_M", "Q8_0")
    with pytest.raises(CatalogError, match="target_bpw"):
        parse_catalog(text.replace("target_bpw: 4.5", "target_bpw: -1"), URL)


def test_a_kld_target_is_a_release_named_by_its_bound():
    text = """
destination: s3://b/releases
quants: [Q8_0]
target_kld: 0.05
models:
  - name: a
    source: s3://ckpts/a
  - name: b
    source: s3://ckpts/b
    target_kld: 0.02
    target_bpw: 4.5
"""
    a, b = parse_catalog(text, URL)
    # the label is known before the run (the bits per weight the search finds are not)
    assert a.releases == ("Q8_0", "AUTO-KLD-0.05") and b.releases == ("Q8_0", "AUTO-4.50", "AUTO-KLD-0.02")
    p = b.convert_params({"AUTO-KLD-0.02": "not published yet"}, "/w")
    assert p.quant_names == ["Q8_0"] and p.target_kld == 0.02 and p.target_bpw == 0
    assert a.convert_params({"Q8_0": "source changed"}, "/w").target_kld == 0
    with pytest.raises(CatalogError, match="target_kld"):
        parse_catalog(text.replace("target_kld: 0.05", "target_kld: 0"), URL)
