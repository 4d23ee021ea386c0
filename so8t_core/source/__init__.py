"""Stage 1, fetch: reading a checkpoint and knowing what it is.

Checkpoint folders at any fsspec URI (``checkpoint``; legacy ``.bin`` shards through
``legacy_bin``; the safetensors header parser ``safetensors_format``), their content
fingerprint (``fingerprint``), the base architectures (``architectures``), the SO8T parts
(``so8t``: gates and heads; ``rotation``: the SO(8) math), PEFT LoRA adapters (``lora``)
and the tokenizer's GGUF metadata (``tokenizer``).

Layer rule: modules here import the foundation (``so8t_core.errors``, ``refs``, ``storage``, ``llama_runtime``,
``constants``, ``metrics``, ``gguf_file``) and each other, nothing above.
"""
