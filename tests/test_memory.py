"""Conversion memory is bounded by a few tensors, not by the model."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, resource, sys
    from so8t_core.analysis import checkpoint_model
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.assemble.sequential import convert_sequential

    src, work = sys.argv[1], sys.argv[2]
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ckpt = Checkpoint.open(src)
    _, _, plan = checkpoint_model(ckpt)
    before = peak()
    result = convert_sequential(ckpt, "Q8_0", os.path.join(work, "m.gguf"), work)
    print(peak() - before, result.source.n_bytes, max(p.n_elements for p in plan) * 4)
""")


def test_peak_memory_of_a_conversion_is_a_few_tensors(make_fixture, tmp_path):
    # ~100M parameters (390 MB of float32 weights) in 3 shards; the largest tensor is 16 MB.
    src = make_fixture(layers=6, hidden=1024, heads=8, kv_heads=8, intermediate=4096, vocab=768, shards=3)
    out = subprocess.run([sys.executable, "-c", SCRIPT, src, str(tmp_path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    growth, model_bytes, largest = map(int, out.stdout.split())
    assert model_bytes > 380e6
    assert growth < 8 * largest, (growth, largest)
    assert growth < model_bytes / 3, (growth, model_bytes)
