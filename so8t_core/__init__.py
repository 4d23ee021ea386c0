"""so8t-gguf's library: SO8T checkpoints in, real llama.cpp GGUF files out.

Plain functions and small classes with no orchestration import; the Prefect tasks in
``tasks/`` wrap these, and ``flows/`` composes the tasks into the pipeline.
"""

__version__ = "0.1.0"
CONVERTER = f"so8t-gguf {__version__}"
