"""Checkpoints to try the pipeline on, not part of it: the embedded demo (``demo``: SmolLM2-135M
with seeded SO8T gates), tiny random fixtures of every base architecture (``fixtures``), their
tokenizers (``tokenizers``, trained on ``fixture_corpus.txt``) and the folder writer they share
(``checkpoint_writer``).

Layer rule: the top of the library: modules here may import anything in ``so8t_core``; nothing
in the pipeline stages imports them.
"""
