"""Stage 6, publish: releases on any fsspec destination.

``release`` publishes a release atomically (staging prefix, read-back, manifest last) and
moves ``latest.json``; what goes in it: the model card (``model_card``), per-tensor statistics
as Parquet (``stats``), plots (``plots``), and the run's report (``report``: summary and tables).

Layer rule: modules here import ``validate`` and what is below it, nothing above.
"""
