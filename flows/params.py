"""Typed parameters of the deployments: what the Prefect UI renders as a form.

Prefect turns a flow's signature into a JSON schema (``parameter_openapi_schema``), and the UI
renders that schema as the deployment's "Custom run" form, checked on the server before a run
is created. Enums become drop-downs, so the quant mixes and engines are chosen, not typed.
The choices come from the library's own tables: a mix added there appears here.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.runners import RUNNERS
from so8t_core.constants import QUANT_TYPES, SUPPORTED_TENSOR_TYPES
from so8t_core.quantize.engines import ENGINES

# llama-quantize's mixes (what --quant accepts), in llama.cpp's order.
QuantMix = Enum("QuantMix", {name: name for name in QUANT_TYPES}, type=str, module=__name__)
QuantMix.__doc__ = "A llama-quantize mix: the default type of the file and the rules that pick each tensor's type."
# Quantization engines: all write the same bytes (auto: torch on a GPU, else simd).
Engine = Enum("Engine", {name: name for name in ENGINES}, type=str, module=__name__)
Engine.__doc__ = "Quantization engine; every engine writes the same bytes (auto: torch on a GPU, else simd)."
# Tensor types an override may name (--output-tensor-type, --token-embedding-type).
TensorType = Enum("TensorType", {t.name: t.name for t in SUPPORTED_TENSOR_TYPES}, type=str, module=__name__)
TensorType.__doc__ = "A GGML tensor type so8t-gguf writes."
# Where the quantize tasks run (flows/runners.py).
Runner = Enum("Runner", {name: name for name in RUNNERS}, type=str, module=__name__)
Runner.__doc__ = "Where the per-tensor quantize tasks run: a thread pool, or a Dask cluster; same bytes."


def upper_names(value: Any) -> Any:
    """Quant and type names are case-insensitive, as on the command line (q4_k_m = Q4_K_M)."""
    if isinstance(value, str):
        return value.upper()
    if isinstance(value, list):
        return [v.upper() if isinstance(v, str) else v for v in value]
    return value


class ConvertParams(BaseModel):
    """One conversion: a checkpoint in, one validated release per quant mix out."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None, title="Source checkpoint",
        description="Hugging Face checkpoint folder: a path, file:// or s3:// URL. Empty: the embedded demo.")
    output: str = Field("./artifacts", title="Destination",
                        description="Where releases are published: <destination>/<name>/<fingerprint>/<quant>/.")
    quants: list[QuantMix] = Field([QuantMix.Q8_0], min_length=1, title="Quant mixes",
                                   description="One release per mix.")
    run_validation: bool = Field(True, description="Validate every file (read-back, tensor errors, llama.cpp "
                                                   "logits, tokenizer) before anything is published.")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="Model name: the release folder and the files' base name. Empty: the "
                                         "source folder's name.")
    engine: Engine = Field(Engine.auto, description="Quantization engine; all write the same bytes.")
    max_memory_gb: float | None = Field(None, gt=0, description="Cap peak memory by limiting tensors in flight.")
    work_dir: str | None = Field(None, description="Staging directory (default ~/.cache/so8t-gguf/work).")
    split_max_size: str | None = Field(None, pattern=r"^\s*[0-9]+\s*[KkMmGg]?\s*$",
                                       description="Split each GGUF into files of at most this size (e.g. 2G).")
    split_max_tensors: int = Field(0, ge=0, description="Split each GGUF into files of at most this many tensors "
                                                        "(0: no limit).")
    tensor_types: list[str] = Field([], description="Overrides REGEX=TYPE: tensors whose name matches REGEX get "
                                                    "TYPE (first match wins).")
    output_tensor_type: TensorType | None = Field(None, description="Type of output.weight.")
    token_embedding_type: TensorType | None = Field(None, description="Type of token_embd.weight.")
    pure: bool = Field(False, description="No mix rules: every 2-D weight gets the mix's default type.")
    imatrix: str | None = Field(None, description="Importance matrix (llama-imatrix GGUF or legacy .dat).")
    lora: str | None = Field(None, title="LoRA adapter", description="PEFT LoRA/rsLoRA adapter folder merged into "
                                                                     "the weights before baking.")
    runner: Runner = Field(Runner.threads, description="Where the quantize tasks run: a thread pool on the worker, "
                                                       "or Dask (a local cluster, or the one at the address).")
    dask_address: str | None = Field(None, pattern=r"^\s*[a-z]+://\S+\s*$", title="Dask scheduler",
                                     description="With runner dask: an existing scheduler (tcp://host:8786) whose "
                                                 "workers see the source and work_dir at the same paths.")

    @field_validator("quants", "output_tensor_type", "token_embedding_type", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any) -> Any:
        return upper_names(value)

    @field_validator("source", "name", "work_dir", "split_max_size", "imatrix", "lora", "dask_address",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value  # a cleared form field

    def convert_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``flows.convert.convert`` for these parameters (the runner is
        not one: it is chosen when the flow is called, ``flows.runners.convert_with``)."""
        from so8t_core.gguf_file import parse_split_size

        return dict(source=self.source, output=self.output, quants=[q.value for q in self.quants],
                    run_validation=self.run_validation, name=self.name, max_memory_gb=self.max_memory_gb,
                    work_dir=self.work_dir, split_max_tensors=self.split_max_tensors,
                    split_max_size=parse_split_size(self.split_max_size) if self.split_max_size else 0,
                    tensor_types=list(self.tensor_types) or None,
                    output_tensor_type=self.output_tensor_type.value if self.output_tensor_type else None,
                    token_embedding_type=self.token_embedding_type.value if self.token_embedding_type else None,
                    pure=self.pure, engine=self.engine.value, imatrix=self.imatrix,
                    lora=self.lora)
