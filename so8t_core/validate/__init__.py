"""Stage 5, validate: is the file what it should be, inside llama.cpp itself.

``checks`` holds the gates (read-back, tensor errors, llama.cpp logits against the PyTorch
SO8T ``reference``, tokenizer parity), run in llama.cpp (``so8t_core.llama_runtime``); ``heads``
runs the triality heads on llama.cpp's hidden state; ``inspection`` reports what a GGUF holds.

Layer rule: modules here import ``assemble`` and what is below it, nothing above.
"""
