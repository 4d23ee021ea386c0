"""--target-kld's search (so8t_core.quantize.target.search_kld) on made-up tensors and a made-up
KLD: the answer is within the bound, the next smaller budget tried was not, the number of files
measured is bounded, and the ends are handled (nothing meets the bound; the smallest already does).
tests/test_target_kld.py runs the real thing: files quantized, assembled and evaluated in llama.cpp."""

from __future__ import annotations

import math

import pytest
from gguf import GGMLQuantizationType as T

from so8t_core.quantize import target
from so8t_core.quantize.target import TensorOptions

TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
RELATIVE_NOISE = {T.Q2_K: 0.11, T.Q3_K: 0.034, T.Q4_K: 0.0095, T.Q5_K: 0.0025, T.Q6_K: 0.00066, T.Q8_0: 0.00004}


def tensors() -> list[TensorOptions]:
    """Eight layers of four weights with different sensitivities, and a norm that stays F32."""
    out = [target.fixed_tensor("blk.0.attn_norm.weight", (256,))]
    for layer in range(8):
        for i, (cls, shape) in enumerate((("attn_q", (256, 256)), ("attn_v", (64, 256)), ("ffn_up", (512, 256)),
                                          ("ffn_down", (256, 512))), start=1):
            weight = (1 + layer % 3) * i
            out.append(TensorOptions(f"blk.{layer}.{cls}.weight", shape, tuple(
                (t, target.tensor_nbytes(shape, t), weight * RELATIVE_NOISE[t]) for t in TYPES)))
    return out


def counted(measure):
    calls = []

    def f(types):
        calls.append(types)
        return measure(types)

    return f, calls


@pytest.mark.parametrize("max_kld", [0.05, 0.2, 0.9, 3.0])
def test_the_answer_is_within_and_the_next_smaller_budget_tried_is_not(max_kld):
    ts = tensors()
    measure, calls = counted(lambda types: target.predicted_damage(ts, types))
    found = target.search_kld(ts, max_kld, measure)
    assert found.types is not None and target.predicted_damage(ts, found.types) <= max_kld
    assert found.chosen.kld <= max_kld < found.next_smaller.kld
    assert found.chosen.bits_per_weight == target.bits_per_weight(ts, found.types)
    assert found.next_smaller.bits_per_weight < found.chosen.bits_per_weight
    # every budget tried below the answer was over the bound; none tried lies between the two
    below = [t for t in found.trials if t.tensor_bytes < found.chosen.tensor_bytes]
    assert below and all(t.kld > max_kld for t in below)
    assert max(below, key=lambda t: t.tensor_bytes) == found.next_smaller
    # bounded: the two ends and at most KLD_SEARCH_STEPS midpoints, no file measured twice
    assert len(calls) == len(found.trials) <= target.KLD_SEARCH_STEPS + 2
    assert len({t.tensor_bytes for t in found.trials}) == len(found.trials)
    # close to the best the allocator can do: within the resolution, or the steps ran out
    assert (found.chosen.bits_per_weight - found.next_smaller.bits_per_weight <= target.KLD_SEARCH_RESOLUTION
            or len(found.trials) == target.KLD_SEARCH_STEPS + 2)
    record = found.as_record()
    assert record["max_kld"] == max_kld and record["chosen"]["within"] and not record["next_smaller"]["within"]
    assert [t["kld_mean"] for t in record["trials"]] == [t.kld for t in found.trials]


def test_more_steps_find_a_smaller_file():
    ts = tensors()
    kld = lambda types: target.predicted_damage(ts, types)  # noqa: E731
    coarse = target.search_kld(ts, 0.2, kld, steps=2)
    fine = target.search_kld(ts, 0.2, kld, steps=20, resolution=0.0)
    assert fine.chosen.tensor_bytes < coarse.chosen.tensor_bytes and fine.chosen.kld <= 0.2
    # with no step limit the interval closes: no allocation lies between the answer and the one below
    between = target.allocate(ts, (fine.next_smaller.budget_bytes + fine.chosen.budget_bytes) // 2)
    assert between in (target.allocate(ts, fine.next_smaller.budget_bytes), fine.types)


def test_a_kld_not_falling_with_every_budget_still_gives_a_true_answer():
    """Measured KLD is noisy: the invariant, not monotonicity, makes the answer right."""
    ts = tensors()

    def bumpy(types):
        bpw = target.bits_per_weight(ts, types)
        return target.predicted_damage(ts, types) * (1.0 + 0.6 * math.sin(7.0 * bpw) ** 2)

    found = target.search_kld(ts, 0.3, bumpy)
    assert bumpy(found.types) == found.chosen.kld <= 0.3 < found.next_smaller.kld
    assert all(t.kld > 0.3 for t in found.trials if t.tensor_bytes < found.chosen.tensor_bytes)


def test_a_bound_not_even_the_largest_types_meet_measures_one_file():
    ts = tensors()
    measure, calls = counted(lambda types: target.predicted_damage(ts, types))
    found = target.search_kld(ts, 1e-6, measure)
    assert found.types is None and found.chosen is None and len(calls) == 1
    assert found.next_smaller.kld > 1e-6  # the largest, what the refusal names
    assert calls[0] == {t.name: min(t.options, key=lambda o: o[2])[0] for t in ts}
    nan = target.search_kld(ts, 1.0, lambda types: float("nan"))
    assert nan.types is None  # a KLD that is not a number meets no bound


def test_a_bound_the_smallest_types_meet_is_the_smallest_file():
    ts = tensors()
    found = target.search_kld(ts, 100.0, lambda types: target.predicted_damage(ts, types))
    assert found.next_smaller is None and len(found.trials) == 2
    assert found.types == {t.name: min(t.options, key=lambda o: o[1])[0] for t in ts}
    assert found.as_record()["next_smaller"] is None


def test_the_label_names_the_bound():
    assert target.kld_label(0.05) == "AUTO-KLD-0.05"
    assert target.kld_label(1) == "AUTO-KLD-1"
    assert target.kld_label(0.00002) == "AUTO-KLD-0.00002"


def test_what_cannot_be_searched_is_refused_in_one_line_before_any_work(make_fixture, tmp_path):
    from support.cli import assert_one_line_error, run

    src = make_fixture(layers=2, hidden=256, intermediate=512, seed=3)
    out = tmp_path / "out"
    assert_one_line_error(run("convert", src, "--output", str(out), "--target-kld", "0.1", "--eval-chunks", "0"),
                          "--target-kld 0.1", "--eval-chunks 0 turns off")
    assert_one_line_error(run("convert", src, "--target-kld", "0.1", "--dry-run"), "--dry-run",
                          "not with --target-kld")
    assert_one_line_error(run("convert", src, "--target-kld", "0"), "--target-kld 0", "greater than 0")
    assert not out.exists()
