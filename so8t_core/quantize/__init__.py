"""Stage 3, quantize: which type each tensor gets, and its bytes.

``mixes`` applies llama-quantize's mix rules (and the user's overrides) to give every tensor a
type; ``imatrix`` reads and writes importance matrices, ``calibration`` computes one on the user's
text in llama.cpp as llama-imatrix does; ``staging`` turns one planned tensor into its
quantized bytes, content-addressed on disk, with their error (``error_stats``); ``engines``
are the three quantizers that write those bytes (ggml, simd, torch), all bit-exact with
llama.cpp.

Layer rule: modules here import the foundation, ``source``, ``analysis`` and ``plan``, and
each other, nothing above.
"""
