"""Scheduled re-quantization of a catalog: convert only what changed since the last release.

A catalog is a YAML file at any fsspec URL (deployments/catalog.example.yaml)::

    destination: s3://releases/models      # default for every model
    quants: [Q8_0]                         # default mixes (default: Q8_0)
    target_bpw: 4.5                        # default: none; a target mix's release AUTO-4.50 too
    target_kld: 0.05                       # default: none; the smallest within that mean KLD, AUTO-KLD-0.05
    run_validation: true                   # default: true
    engine: auto                           # default: auto
    models:
      - name: my-model                     # release folder and file base name
        source: s3://ckpts/my-model        # checkpoint folder
        quants: [Q4_K_M, Q8_0]             # overrides the default
        destination: s3://other/models     # optional override
        run_validation: false              # optional override
        target_bpw: 3.5                    # optional override
        target_kld: 0.02                   # optional override

Relative paths are relative to the catalog's own folder. For each model and mix,
``requantize_catalog`` compares the checkpoint with what ``<destination>/<name>/latest.json``
says was published for that mix, and converts the mix again only when:

- nothing was published for it yet;
- the source fingerprint changed (fingerprints of shards whose size and mtime/ETag did not
  change come from the shard cache in the work directory, so an unchanged model is not read);
- its release has no ``manifest.json`` (an interrupted publish; the release is invisible);
- the manifest was written by another converter version;
- validation is asked for and the release was published without it.

Models that need work go through the ``convert`` flow (as a subflow run each), with only the
mixes that need it; its staging cache makes that cost only the tensors that changed. A
failing model does not stop the others; the run ends failed if any model failed.
"""

from __future__ import annotations

import os
import posixpath
from typing import Annotated, Any, Collection

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flows.convert import convert
from flows.params import NO_CREDENTIALS_PATTERN, ConvertParams, Engine, QuantMix, quant_names
from so8t_core import storage
from so8t_core.constants import CONVERTER, MODEL_CARD_NAME, is_auto_label
from so8t_core.errors import CatalogError, So8tError
from so8t_core.publish.release import FINGERPRINT_CHARS, entry_release, read_latest, read_manifest
from so8t_core.publish.report import artifact_key
from so8t_core.quantize.target import auto_label, kld_label
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.fingerprint import fingerprint
from so8t_core.storage import NAME_PATTERN, default_cache_dir, redact_uri, refuse_credentials
from tasks.common import STORAGE_RETRIES

FORMAT_HINT = "see the catalog format in deployments/README.md"


# --- The catalog file ------------------------------------------------------------------------

class ModelEntry(BaseModel):
    """One model of the catalog; unset fields take the catalog's defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Release folder under the destination and file base name.")
    source: str = Field(min_length=1, description="Checkpoint folder: path, file:// or s3:// URL.")
    quants: list[QuantMix] | None = Field(None, min_length=1)
    destination: str | None = Field(None, min_length=1)
    run_validation: bool | None = None
    engine: Engine | None = None
    max_memory_gb: float | None = Field(None, gt=0)
    target_bpw: float | None = Field(None, gt=0, le=32)
    target_kld: float | None = Field(None, gt=0)

    @field_validator("quants", mode="before")
    @classmethod
    def _quant_names(cls, value: Any) -> Any:
        return quant_names(value)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    destination: str | None = Field(None, min_length=1, description="Where releases go, unless a model says.")
    quants: list[QuantMix] = Field([QuantMix.Q8_0], min_length=1)
    run_validation: bool = True
    engine: Engine = Engine.auto
    max_memory_gb: float | None = Field(None, gt=0)
    target_bpw: float | None = Field(None, gt=0, le=32)
    target_kld: float | None = Field(None, gt=0)
    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("quants", mode="before")
    @classmethod
    def _quant_names(cls, value: Any) -> Any:
        return quant_names(value)


class CatalogModel(BaseModel):
    """A catalog entry with the defaults applied and relative paths resolved."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    destination: str
    quants: tuple[str, ...]
    run_validation: bool
    engine: str
    max_memory_gb: float | None = None
    target_bpw: float | None = None  # a target mix (convert --target-bpw): its release AUTO-<B> too
    target_kld: float | None = None  # convert --target-kld: its release AUTO-KLD-<K> too

    @property
    def releases(self) -> tuple[str, ...]:
        """The labels this model is published under: its mixes, and its target mixes' AUTO-<B>, AUTO-KLD-<K>."""
        return self.quants + ((auto_label(self.target_bpw),) if self.target_bpw else ()) + \
            ((kld_label(self.target_kld),) if self.target_kld else ())

    def convert_params(self, todo: Collection[str], work_dir: str) -> ConvertParams:
        """The convert run for the releases in ``todo``: its mixes, and the target when its AUTO
        release is stale (a run needs one mix: then the first, which is up to date and re-staged
        from the cache, its release republished unchanged)."""
        mixes = [q for q in todo if not is_auto_label(q)] or [self.quants[0]]
        target = self.target_bpw if self.target_bpw and auto_label(self.target_bpw) in todo else 0.0
        kld = self.target_kld if self.target_kld and kld_label(self.target_kld) in todo else 0.0
        return ConvertParams(source=self.source, output=self.destination, quants=mixes,
                             run_validation=self.run_validation, name=self.name, engine=self.engine,
                             max_memory_gb=self.max_memory_gb, work_dir=work_dir, target_bpw=target, target_kld=kld)


def _relative_to(base: str, path: str) -> str:
    """``path`` as written in a catalog at folder ``base``: URLs and absolute paths as they are."""
    if "://" in path or os.path.isabs(path):
        return path
    if path.startswith("~"):
        return os.path.expanduser(path)
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(rest, path))
    return os.path.normpath(os.path.join(base, path))


def _location(loc: tuple, raw: Any) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        try:
            name = raw["models"][loc[1]]["name"]
        except (KeyError, IndexError, TypeError):
            name = None
        if isinstance(name, str) and name:
            text += f" (model {name})"
    return text


def _problem(err: dict) -> tuple[str, str]:
    """(what is wrong, how to fix it) for one pydantic error."""
    kind, loc, value = err["type"], err["loc"], err.get("input")
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind == "missing":
        return "missing (required)", FORMAT_HINT
    if kind == "extra_forbidden":
        known = ModelEntry.model_fields if "models" in loc else Catalog.model_fields
        return "unknown field", f"fields here: {', '.join(known)}"
    if kind == "enum":
        what = "a quant mix" if field == "quants" else f"a valid {field}"
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"{shown} is not {what}", f"choose from {err.get('ctx', {}).get('expected', '')}"
    if kind == "string_pattern_mismatch" and field == "name":
        return (f"{value!r} is not a valid model name",
                "use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit (it names a "
                "folder)")
    msg = err["msg"].removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:], FORMAT_HINT


def parse_catalog(text: str, url: str) -> list[CatalogModel]:
    """The models of a catalog document; any problem is a :class:`CatalogError` naming ``url``."""
    where = f"catalog {redact_uri(url)}"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CatalogError(where, f"not valid YAML: {problem}{at}", "fix the YAML syntax") from None
    if raw is None:
        raise CatalogError(where, "empty", "list the models under models:")
    if not isinstance(raw, dict):
        raise CatalogError(where, f"must be a mapping with destination and models, not a {type(raw).__name__}",
                           FORMAT_HINT)
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        what, hint = _problem(errors[0])
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise CatalogError(where, f"{_location(errors[0]['loc'], raw)}: {what}{more}", hint) from None

    base = posixpath.dirname(url) if "://" in url else os.path.dirname(storage.local_path(url))
    models, seen = [], {}
    for i, m in enumerate(catalog.models):
        destination = m.destination or catalog.destination
        if destination is None:
            raise CatalogError(where, f"models[{i}] (model {m.name}): no destination", "set destination: for the "
                               "catalog or for this model")
        model = CatalogModel(
            name=m.name, source=_relative_to(base, m.source), destination=_relative_to(base, destination),
            quants=tuple(dict.fromkeys(q.value for q in (m.quants or catalog.quants))),
            run_validation=catalog.run_validation if m.run_validation is None else m.run_validation,
            engine=(m.engine or catalog.engine).value,
            max_memory_gb=m.max_memory_gb if m.max_memory_gb is not None else catalog.max_memory_gb,
            target_bpw=m.target_bpw if m.target_bpw is not None else catalog.target_bpw,
            target_kld=m.target_kld if m.target_kld is not None else catalog.target_kld)
        for what, uri in (("source", model.source), ("destination", model.destination)):
            if "://" in uri:  # before any run: a convert run's parameters are stored
                try:
                    refuse_credentials(uri)
                except So8tError as exc:
                    raise CatalogError(where, f"models[{i}] (model {m.name}): {what} {redact_uri(uri)}: {exc.problem}",
                                       exc.hint) from None
        # Names that differ only in letter case are one folder on case-insensitive storage.
        key = storage.join(model.destination, model.name.casefold())
        if key in seen:
            raise CatalogError(where, f"models[{i}]: model {m.name} appears twice for destination "
                               f"{redact_uri(model.destination)} (also models[{seen[key]}])",
                               "give each model its own name or destination")
        seen[key] = i
        models.append(model)
    return models


def load_catalog(url: str) -> list[CatalogModel]:
    """Read and check the catalog at ``url`` (path, file://, s3://, any fsspec URL)."""
    try:
        text = storage.read_text(url)
    except So8tError as exc:
        raise CatalogError(f"catalog {redact_uri(url)}", exc.problem, "check the catalog URL") from None
    except UnicodeDecodeError:
        raise CatalogError(f"catalog {redact_uri(url)}", "not a text file", "a catalog is YAML") from None
    return parse_catalog(text, url)


# --- What changed ----------------------------------------------------------------------------

def quant_status(fingerprint: str, entry: dict | None, manifest: dict | None, run_validation: bool) -> str | None:
    """Why a mix must be converted again, or None when its published release is up to date.

    ``entry``: the mix's entry in latest.json; ``manifest``: the manifest of the release it
    points at (None when that release has no manifest.json).
    """
    if entry is None:
        return "not published yet"
    published = entry.get("source_fingerprint") or ""
    if published != fingerprint:
        return f"source changed ({published[:FINGERPRINT_CHARS]} -> {fingerprint[:FINGERPRINT_CHARS]})"
    if manifest is None:
        return "release incomplete (no manifest.json)"
    if manifest.get("source_fingerprint") != fingerprint:
        return "release does not match latest.json"
    if manifest.get("converter") != CONVERTER:
        return f"converter changed ({manifest.get('converter')} -> {CONVERTER})"
    if run_validation and not (manifest.get("validation") or {}).get("passed"):
        return "published without validation"
    return None


@task(name="check-model", task_run_name="check-{model.name}", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def check_model(model: CatalogModel, work_dir: str) -> dict:
    """Fingerprint the source (unchanged shards from the cache) and compare with the releases."""
    src = fingerprint(Checkpoint.open(model.source, cache_dir=default_cache_dir()), cache_dir=work_dir)
    published = (read_latest(model.destination, model.name) or {}).get("quants") or {}
    todo, up_to_date = {}, {}
    for q in model.releases:
        entry = published.get(q)
        manifest = None
        release = entry_release(model.destination, model.name, entry) if entry is not None else None
        if release is not None and entry.get("source_fingerprint") == src.fingerprint:
            manifest = read_manifest(release)  # of the version its current.json names
        reason = quant_status(src.fingerprint, entry, manifest, model.run_validation)
        if reason is None:
            up_to_date[q] = f"up to date ({src.fingerprint[:FINGERPRINT_CHARS]}/{q})"
        else:
            todo[q] = reason
    return {"fingerprint": src.fingerprint, "convert": todo, "skip": up_to_date}


def _message(exc: BaseException, hint: bool = True) -> str:
    if isinstance(exc, So8tError):
        return str(exc) if hint else " ".join(f"{exc.where}: {exc.problem}".split())
    return f"{type(exc).__name__}: {exc}"


def summary_markdown(catalog: str, summary: dict, dry_run: bool) -> str:
    done = "would convert" if dry_run else "converted"
    lines = [f"# Catalog {'plan' if dry_run else 'run'}: `{redact_uri(catalog)}`", "",
             f"{len(summary['converted'])} model(s) {done}, {len(summary['failed'])} failed, "
             f"{sum(len(v) for v in summary['skipped'].values())} release(s) up to date.", "",
             "| model | quant | action | why |", "|---|---|---|---|"]
    for model, quants in summary["converted"].items():
        lines += [f"| {model} | {q} | {done} | {why} |" for q, why in quants.items()]
    for model, message in summary["failed"].items():
        lines.append(f"| {model} | | **failed** | {message.replace('|', '/')} |")
    for model, quants in summary["skipped"].items():
        lines += [f"| {model} | {q} | skipped | {why} |" for q, why in quants.items()]
    if summary.get("cards"):
        from tasks.artifacts import release_link

        lines += ["", "## Model cards", ""]
        for model, folder in summary["cards"].items():
            url, where = release_link(folder)  # the model folder's README.md
            lines.append(f"- {model}: [{MODEL_CARD_NAME}]({url})" if url
                         else f"- {model}: `{where.rstrip('/')}/{MODEL_CARD_NAME}`")
    return "\n".join(lines) + "\n"


@flow(name="requantize-catalog", task_runner=ThreadPoolTaskRunner(max_workers=4))
def requantize_catalog(catalog: Annotated[str, Field(json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN})],
                       work_dir: Annotated[str | None, Field(json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN})]
                       = None, models: list[str] | None = None, dry_run: bool = False) -> dict:
    """Convert each catalog model's quant mixes that changed since their last published release.

    Args:
        catalog: URL of the catalog YAML (path, file://, s3://); relative paths inside it are
            relative to its folder.
        work_dir: Staging directory and shard fingerprint cache (default ~/.cache/so8t-gguf/work).
        models: Only these catalog models (default: all of them).
        dry_run: Report what would be converted and why; convert nothing.
    """
    from prefect.artifacts import create_markdown_artifact

    log = get_run_logger()
    for uri in (catalog, work_dir or ""):
        if "://" in uri:
            refuse_credentials(uri)  # the form's pattern keeps them out of a deployment run's parameters
    entries = load_catalog(catalog)
    if models:
        unknown = sorted(set(models) - {m.name for m in entries})
        if unknown:
            raise CatalogError(f"catalog {redact_uri(catalog)}", f"no model named {', '.join(unknown)}",
                               f"models: {', '.join(m.name for m in entries)}")
        entries = [m for m in entries if m.name in models]
    work_dir = work_dir or os.path.join(default_cache_dir(), "work")

    summary: dict[str, Any] = {"catalog": catalog, "converted": {}, "skipped": {}, "failed": {}}
    short: dict[str, str] = {}  # failures without their hints, for the run's one-line error
    checks = [(m, check_model.submit(m, work_dir)) for m in entries]  # I/O: in parallel
    for model, future in checks:
        try:
            status = future.result()
        except Exception as exc:  # noqa: BLE001 - one model's trouble must not stop the others
            summary["failed"][model.name], short[model.name] = _message(exc), _message(exc, hint=False)
            log.error("%s: %s", model.name, _message(exc))
            continue
        if status["skip"]:
            summary["skipped"][model.name] = status["skip"]
        if not status["convert"]:
            log.info("%s: up to date (%s)", model.name, ", ".join(status["skip"]))
            continue
        todo = status["convert"]
        log.info("%s: %s", model.name, "; ".join(f"{q}: {why}" for q, why in todo.items()))
        if dry_run:
            summary["converted"][model.name] = todo
            continue
        params = model.convert_params(todo, work_dir)
        state = convert.with_options(flow_run_name=model.name)(params, return_state=True)
        if state.is_completed():
            summary["converted"][model.name] = todo
        else:
            exc = state.result(raise_on_failure=False)
            if not isinstance(exc, BaseException):
                exc = RuntimeError(state.message or state.name)
            summary["failed"][model.name], short[model.name] = _message(exc), _message(exc, hint=False)
            log.error("%s: %s", model.name, _message(exc))

    if not dry_run:  # each model's own card: every quant it has published, with its quality
        summary["cards"] = {m.name: storage.join(m.destination, m.name) for m in entries
                            if m.name not in summary["failed"]
                            and storage.exists(storage.join(m.destination, m.name, MODEL_CARD_NAME))}
    stem = posixpath.basename(catalog).split(".")[0]
    try:
        create_markdown_artifact(summary_markdown(catalog, summary, dry_run),
                                 key=artifact_key(stem if stem.startswith("catalog") else f"catalog-{stem}"),
                                 description="What the catalog run converted, skipped and why")
    except Exception as exc:  # noqa: BLE001 - a UI view must not fail the run
        log.warning("could not create the catalog summary artifact: %s", exc)
    if short:
        raise CatalogError(f"catalog {redact_uri(catalog)}",
                           f"{len(short)} of {len(entries)} model(s) failed: "
                           + "; ".join(f"{m}: {msg}" for m, msg in short.items()),
                           "the other models were processed; see the run's catalog summary")
    if dry_run:
        summary["would_convert"] = summary.pop("converted")
    return summary
