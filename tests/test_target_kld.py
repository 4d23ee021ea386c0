"""convert --target-kld in a real Prefect run on a small fixture: the search quantizes, assembles
and evaluates candidate files in llama.cpp (the evaluate stage's statistic, against the run's F32
file on the evaluation text); the AUTO-KLD-<K> release is within K, the next smaller budget it tried
was not (both read from its manifest, and the published file evaluated again), and the card shows
the search. Then a bound no budget meets: one line, exit status 2, that release not published, the
others published. One conversion and one re-run on its caches feed every assertion."""

from __future__ import annotations

import glob
import json

import pytest
from support.published import release

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.constants import bits_per_weight
from so8t_core.errors import ValidationError
from so8t_core.gguf_file import read_gguf
from so8t_core.publish.release import LATEST_NAME
from so8t_core.validate.perplexity import evaluate_file

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

MAX_KLD = 0.1
LABEL = "AUTO-KLD-0.1"
UNMET = 1e-7  # not even every weight in Q8_0 is that close to F32
N_CTX, N_CHUNKS = 128, 2


@pytest.fixture(scope="module")
def run(make_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("target-kld")
    src = make_fixture(layers=2, hidden=256, intermediate=512, seed=3)

    def params(k: float) -> ConvertParams:
        return ConvertParams(source=src, output=str(root / "out"), work_dir=str(root / "work"), name="fx",
                             quants=["Q8_0"], run_validation=False, target_kld=k, eval_ctx=N_CTX,
                             eval_chunks=N_CHUNKS)

    result = convert(params(MAX_KLD))
    with pytest.raises(ValidationError) as unmet:
        convert(params(UNMET))
    return root, result, unmet.value


def manifest(root) -> dict:
    return json.loads((release(root / "out", "fx", LABEL) / "manifest.json").read_text())


def test_the_release_is_within_the_bound_and_the_next_smaller_budget_tried_was_not(run):
    root, result, _ = run
    assert set(result["releases"]) == {"Q8_0", LABEL}
    m = manifest(root)
    search = m["recipe"]["search"]
    assert m["recipe"]["target"] == {"kld": MAX_KLD} and search["max_kld"] == MAX_KLD
    chosen, below = search["chosen"], search["next_smaller"]
    assert below is not None, search  # the bound sits inside the range: a real search, not an end
    assert chosen["kld_mean"] <= MAX_KLD < below["kld_mean"]
    assert below["bits_per_weight"] < chosen["bits_per_weight"]
    # no budget tried between them, and every one tried below the answer was over the bound
    tried_below = [t for t in search["trials"] if t["tensor_bytes"] < chosen["tensor_bytes"]]
    assert tried_below and all(not t["within"] and t["kld_mean"] > MAX_KLD for t in tried_below)
    assert max(tried_below, key=lambda t: t["tensor_bytes"]) == below
    assert 3 <= len(search["trials"]) <= 8
    # the published file is the chosen one: its size, and the evaluate stage's record of it
    folder = release(root / "out", "fx", LABEL)
    g = read_gguf(str(folder / f"fx-{LABEL}.gguf"))
    assert sum(t.n_bytes for t in g.tensors) == chosen["tensor_bytes"]
    assert bits_per_weight(chosen["tensor_bytes"], sum(int(t.n_elements) for t in g.tensors)) == \
        pytest.approx(chosen["bits_per_weight"], abs=1e-4)
    assert m["evaluation"]["statistics"]["kld_mean"] == chosen["kld_mean"]
    assert m["evaluation"]["settings"]["max_chunks"] == N_CHUNKS


def test_the_published_file_measures_the_same_kld_again(run):
    root, _, _ = run
    (base,) = glob.glob(str(root / "work" / "evaluation" / "*.kld"))
    stats = evaluate_file(str(release(root / "out", "fx", LABEL) / f"fx-{LABEL}.gguf"), base)
    assert stats.kld_mean == pytest.approx(manifest(root)["recipe"]["search"]["chosen"]["kld_mean"], rel=1e-9)
    assert stats.kld_mean <= MAX_KLD


def test_the_card_shows_the_bound_and_the_budgets_tried(run):
    root, _, _ = run
    card = (release(root / "out", "fx", LABEL) / "README.md").read_text()
    search = manifest(root)["recipe"]["search"]
    assert f"the smallest file whose mean KLD on the evaluation text is at most {MAX_KLD:g}" in card
    assert "| bits per weight | tensor bytes | mean KLD | within |" in card
    for t in search["trials"]:
        assert f"| {t['bits_per_weight']:.3f} | {t['tensor_bytes']:,} | {t['kld_mean']:.4g} |" in card
    assert f"measured {search['next_smaller']['kld_mean']:.4g} (over {MAX_KLD:g})" in card


def test_a_bound_no_budget_meets_is_one_line_and_only_that_release_is_left_out(run):
    root, _, error = run
    line = error.one_line()
    assert "\n" not in line and error.exit_code == 2
    label = f"AUTO-KLD-{UNMET:.10f}".rstrip("0")
    assert f"target not met ({label}: --target-kld {UNMET:g} not met: even the largest types" in line
    assert f"not published: {label}; published: Q8_0" in line and "raise --target-kld" in line
    latest = json.loads((root / "out" / "fx" / LATEST_NAME).read_text())
    assert label not in json.dumps(latest) and not list((root / "out" / "fx").glob(f"*/{label}"))
    assert "Q8_0" in json.dumps(latest)
