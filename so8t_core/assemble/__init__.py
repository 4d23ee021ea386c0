"""Stage 4, assemble: GGUF files from staged tensors.

``model`` writes the model GGUF (or a split set) with the metadata ``metadata`` builds;
``sidecar`` writes the triality heads llama.cpp has no place for; ``lora_gguf`` writes a PEFT
adapter as a llama.cpp LoRA adapter GGUF; ``sequential`` runs fetch → assemble in-process,
without a flow.

Layer rule: modules here import ``quantize`` and what is below it, nothing above.
"""
