"""Stage 3, quantize: one task per output tensor, or per group of small ones (bake, permute,
quantize, stage the bytes), and the scheduler that keeps the runner's slots busy with them.

The staging area is the cache: every staged tensor is stored under a key naming exactly what
it is made of (``so8t_core.quantize.staging.staging_key``: the source tensors' sha256, the transform
(bake, permutation), the target type, the importance matrix and the format version), written
atomically. The flow looks a tensor up there before scheduling its task, so a run whose
inputs did not change executes no quantize task, a changed shard or override re-quantizes
only the affected tensors, and a killed run resumes from the tensors it finished. Tasks
return the small StagedTensor records, never arrays.
"""

from __future__ import annotations

import queue
from typing import Callable

from gguf import GGMLQuantizationType
from prefect import task

from so8t_core.plan import TensorPlan, quantize_batches, tensors_in_flight
from so8t_core.quantize.imatrix import Imatrix, load_imatrix_cached
from so8t_core.quantize.staging import find_staged, stage_tensor
from so8t_core.refs import SourceRef, StagedTensor
from so8t_core.source.lora import load_adapter_cached
from tasks.common import STORAGE_RETRIES, open_checkpoint


def quantize_plan(src: SourceRef, plan: list[TensorPlan], types: dict[str, list[GGMLQuantizationType]],
                  staging_dir: str, engine: str, imatrix: Imatrix | None, lora: tuple[str, str] | None,
                  slots: int, threads: int | None, max_memory_gb: float | None,
                  on_progress: Callable[[int], None]) -> dict[str, list[StagedTensor]]:
    """The quantize stage's scheduler: every tensor of ``plan`` staged in each quant's type
    (``types``: quant → type per tensor). Returns quant → StagedTensor per tensor, in plan order.

    Tensors already staged by an earlier run (content-addressed, same inputs) need no task;
    the rest go in :func:`quantize_tensors` tasks (small tensors share one), at most ``slots``
    in flight (fewer under ``max_memory_gb``); a new task starts as soon as any running one
    finishes, not the oldest, so a big tensor does not leave the other CPUs idle behind it.
    ``threads``: the quantizer's threads per task (None: the CPUs shared among the tasks in
    flight). ``on_progress(done)`` hears how many tensors are staged.
    """
    quants = list(types)
    # Tensors stream through in row chunks: what a task holds is bounded by the chunk size.
    limit = tensors_in_flight(max_memory_gb, plan, slots)
    threads = threads or max(1, slots // limit)  # tensors in parallel × threads per tensor = the CPUs
    staged_by_tensor: list = [None] * len(plan)
    to_quantize = []  # (position in plan, source sha256s, targets)
    for i, item in enumerate(plan):
        shas = [src.tensor_sha256[n] for n in item.inputs]
        targets = [(q, types[q][i].name) for q in quants]
        weights = imatrix.for_tensor(item.gguf_name, item.shape) if imatrix and len(item.shape) >= 2 else None
        staged_by_tensor[i] = find_staged(item, [(q, GGMLQuantizationType[t]) for q, t in targets], staging_dir,
                                          shas, weights)
        if staged_by_tensor[i] is None:
            to_quantize.append((i, shas, targets))
    done = len(plan) - len(to_quantize)
    on_progress(done)
    # Every future puts itself on `finished` when it ends, whatever the runner (thread or Dask
    # futures), so waiting for "any one" is a get().
    finished, running = queue.SimpleQueue(), {}  # running: future → its tensors' positions

    def wait_for_one() -> None:
        nonlocal done
        future = finished.get()
        positions = running.pop(future)
        for i, staged_tensor in zip(positions, future.result(), strict=True):
            staged_by_tensor[i] = staged_tensor
        done += len(positions)
        on_progress(done)

    imatrix_ref = (imatrix.uri, imatrix.sha256) if imatrix else None
    for batch in quantize_batches([plan[i].n_elements for i, _, _ in to_quantize]):
        if len(running) >= limit:
            wait_for_one()
        jobs = [to_quantize[j] for j in batch]
        future = quantize_tensors.submit(src.uri, src.fingerprint, [plan[i] for i, _, _ in jobs],
                                         [shas for _, shas, _ in jobs], [targets for _, _, targets in jobs],
                                         staging_dir, engine, imatrix_ref, threads, lora)
        running[future] = [i for i, _, _ in jobs]
        future.add_done_callback(finished.put)
    while running:
        wait_for_one()
    return {q: [per_tensor[k] for per_tensor in staged_by_tensor] for k, q in enumerate(quants)}


def _run_name() -> str:
    from prefect.runtime import task_run

    items = task_run.parameters["items"]
    return f"quantize-{items[0].gguf_name}" + (f"+{len(items) - 1}" if len(items) > 1 else "")


@task(name="quantize-tensors", task_run_name=_run_name, **STORAGE_RETRIES)
def quantize_tensors(source_uri: str, source_fingerprint: str, items: list[TensorPlan],
                     source_sha256: list[list[str]], targets: list[list[tuple[str, str]]], staging_dir: str,
                     engine: str = "ggml", imatrix: tuple[str, str] | None = None, threads: int | None = None,
                     lora: tuple[str, str] | None = None) -> list[list[StagedTensor]]:
    """Quantize ``items`` one after the other; per item, its source tensors' sha256 and its
    ``targets``: (quant, GGML type name) pairs, one per requested quant, from the mix rules.
    ``imatrix``: (URI, sha256) of an importance matrix; each task reads only its own entries.
    ``threads``: the quantizer's threads, so that tasks in parallel do not oversubscribe the CPUs.
    ``lora``: (URI, sha256) of a LoRA adapter, for items the plan marked with one of its pairs.
    Returns, per item, its StagedTensor per target."""
    ckpt = open_checkpoint(source_uri, source_fingerprint)
    im = load_imatrix_cached(*imatrix) if imatrix is not None else None
    staged = []
    for item, shas, item_targets in zip(items, source_sha256, targets, strict=True):
        typed = [(quant, GGMLQuantizationType[name]) for quant, name in item_targets]
        weights = im.for_tensor(item.gguf_name, item.shape) if im is not None and len(item.shape) >= 2 else None
        adapter = load_adapter_cached(*lora) if lora is not None and item.lora is not None else None
        staged.append(stage_tensor(ckpt, item, typed, staging_dir, shas, engine, weights, threads, adapter))
    return staged
