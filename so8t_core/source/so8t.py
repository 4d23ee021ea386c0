"""The SO8T additions to a base checkpoint: config, rotation gates, heads, and what to strip.

Format version 1 (docs/so8t-format.md): ``config.json["so8t"]`` says how gates are
parameterized and where they sit; gates are ``model.layers.{i}.self_attn.
so8t_rotation_gate.theta``; triality heads are ``so8t.triality.{safety,authority}_head``.

The original SO8T project saved the same things under other names, and saved things
that never reach the logits. Those are recognised here (docs/so8t-format.md, "Other
shapes of SO8T checkpoints"): gate key aliases and precomputed rotations, the legacy
config flags, and the post-hoc adapters, classifier heads and dead parameters, which
are stripped (heads go to the sidecar) and reported, never baked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from so8t_core.constants import (
    GATE_RE,
    ROTATION_PARAMETERIZATIONS,
    ROTATION_POSITIONS,
    SO8T_CONFIG_KEY,
    SO8T_FORMAT_VERSION,
    TRIALITY_DEFAULT_LABELS,
    TRIALITY_HEAD_RE,
    TRIALITY_HEADS,
    TRIALITY_PREFIX,
)
from so8t_core.errors import CheckpointError, RotationError
from so8t_core.source.architectures import ModelSpec
from so8t_core.source.rotation import check_gate_shape

# Tensors that never reach the LM logits, as (pattern, reason). Matched on the name after
# any wrapper prefix was removed.
POST_HOC = "post-hoc SO8T module: applied to returned hidden states, never fed back into the logits"
DEAD = "dead parameter: used only by a training loss or not at all"
STRIP_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), reason) for p, reason in (
    (r"^so8t_adapters\.", POST_HOC),
    (r"^adapters\.adapter_\d+\.", POST_HOC),
    (r"^so8vit_adapter\.", POST_HOC),
    (r"^rotation_gates\.layer_\d+\.", POST_HOC),
    (r"^so8_rotation_gate\.", POST_HOC),
    (r"^alpha_gate$", POST_HOC),
    (r"^_llm_backbone\.", "duplicate of the base_model.* tensors (an alias the SO8T wrapper also saved)"),
    (r"(^|\.)group_structure\.", DEAD),
    (r"(^|\.)rotation_matrix$", DEAD),
    (r"(^|\.)group_scale$", DEAD),
    (r"(^|\.)thinking_stats(\.|$)", DEAD),
    (r"(^|\.)orthogonal_loss(\.|$)", DEAD),
))
# Classifier heads of the SO8T variants: not part of the LM; kept in the sidecar as they are.
CLASSIFIER_HEAD_RE = re.compile(
    r"^(safety_head|verifier_head|domain_head|authority_head|safety_head_b|task_head_a)\.")

LEGACY_FLAG = "so8t_integrated"
LEGACY_CAYLEY_FLAG = "so8t_use_cayley"


@dataclass(frozen=True)
class So8tConfig:
    version: int
    rotation: str  # "cayley" | "expm"
    position: str  # "pre_o_proj" | "post_o_proj"
    labels: dict[str, tuple[str, ...]]  # only the heads config.json names labels for
    source: str = "so8t"  # "so8t" block, or the legacy flags it was read from


@dataclass(frozen=True)
class RotationGate:
    layer: int
    tensor: str  # θ (or R) tensor name in the checkpoint
    n_blocks: int
    parameterization: str  # "cayley" | "expm" for θ; "matrix" for a stored rotation R


@dataclass(frozen=True)
class TrialityHead:
    head: str  # "safety" | "authority"
    weight: str
    bias: str | None
    n_labels: int
    labels: tuple[str, ...]


@dataclass(frozen=True)
class So8tStructure:
    config: So8tConfig | None
    gates: tuple[RotationGate, ...]
    heads: tuple[TrialityHead, ...]
    classifier_heads: tuple[str, ...] = ()  # tensors kept in the sidecar as they are
    stripped: tuple[tuple[str, str], ...] = field(default=())  # (tensor, reason)

    @property
    def gated_layers(self) -> list[int]:
        return [g.layer for g in self.gates]

    def gate_for_layer(self, layer: int) -> RotationGate | None:
        return next((g for g in self.gates if g.layer == layer), None)

    @property
    def triality_tensors(self) -> set[str]:
        return {n for h in self.heads for n in (h.weight, h.bias) if n}

    @property
    def non_base_tensors(self) -> set[str]:
        """Every tensor that is not a base-model weight: gates, heads, stripped tensors."""
        return ({g.tensor for g in self.gates} | self.triality_tensors | set(self.classifier_heads)
                | {name for name, _ in self.stripped})


def parse_so8t_config(config: Mapping[str, Any], where: str) -> So8tConfig | None:
    block = config.get(SO8T_CONFIG_KEY)
    if block is None:
        return _legacy_config(config, where)
    cfg_where = f"{where}/config.json"
    if not isinstance(block, Mapping):
        raise CheckpointError(cfg_where, '"so8t" must be an object', 'e.g. {"version": 1, "rotation": "cayley", '
                                                                     '"position": "pre_o_proj"}')
    version = block.get("version")
    if version != SO8T_FORMAT_VERSION:
        raise CheckpointError(cfg_where, f"so8t.version {version!r} is not supported",
                              f"this converter reads SO8T format version {SO8T_FORMAT_VERSION}")
    rotation = block.get("rotation", "cayley")
    if rotation not in ROTATION_PARAMETERIZATIONS:
        raise CheckpointError(cfg_where, f"so8t.rotation {rotation!r} is not one of "
                                         f"{', '.join(ROTATION_PARAMETERIZATIONS)}", "fix config.json")
    position = block.get("position", "pre_o_proj")
    if position not in ROTATION_POSITIONS:
        raise CheckpointError(cfg_where, f"so8t.position {position!r} is not one of "
                                         f"{', '.join(ROTATION_POSITIONS)}", "fix config.json")
    labels_cfg = block.get("triality_labels") or {}
    if not isinstance(labels_cfg, Mapping):
        raise CheckpointError(cfg_where, "so8t.triality_labels must map head names to label lists", "")
    labels = {}
    for head, value in labels_cfg.items():
        if head not in TRIALITY_HEADS:
            raise CheckpointError(cfg_where, f"so8t.triality_labels has unknown head {head!r}",
                                  f"heads are {', '.join(TRIALITY_HEADS)}")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise CheckpointError(cfg_where, f"so8t.triality_labels.{head} must be a list of strings", "")
        labels[head] = tuple(value)
    return So8tConfig(version=version, rotation=rotation, position=position, labels=labels)


def _legacy_config(config: Mapping[str, Any], where: str) -> So8tConfig | None:
    """The original project's flags: ``so8t_integrated`` (+ ``so8t_use_cayley``), gates before o_proj."""
    if not config.get(LEGACY_FLAG):
        return None
    cayley = config.get(LEGACY_CAYLEY_FLAG, True)
    if not isinstance(cayley, bool):
        raise CheckpointError(f"{where}/config.json", f"{LEGACY_CAYLEY_FLAG} must be true or false", "")
    return So8tConfig(version=SO8T_FORMAT_VERSION, rotation="cayley" if cayley else "expm",
                      position="pre_o_proj", labels={}, source="legacy flags")


def find_structure(tensors: Mapping[str, Any], config: Mapping[str, Any], spec: ModelSpec, where: str
                   ) -> So8tStructure:
    """Locate gates, heads and strippable tensors (``tensors``: name → entry with .shape)."""
    so8t_cfg = parse_so8t_config(config, where)
    position = so8t_cfg.position if so8t_cfg else "pre_o_proj"
    gates: dict[int, RotationGate] = {}
    for name, entry in tensors.items():
        m = GATE_RE.match(name)
        if not m:
            continue
        layer, kind = int(m.group(1)), m.group(2)
        if layer >= spec.n_layers:
            raise RotationError(where, f"{name}: layer {layer} does not exist (model has {spec.n_layers} layers)",
                                "the gate belongs to a different model")
        if layer in gates:
            raise RotationError(where, f"layer {layer} has two rotation gates ({gates[layer].tensor}, {name})",
                                "keep one gate per layer")
        check_gate_shape(entry.shape, spec.rotated_width(position), where, name)
        gates[layer] = RotationGate(layer=layer, tensor=name, n_blocks=entry.shape[0],
                                    parameterization="matrix" if kind == "rotation" else
                                    (so8t_cfg.rotation if so8t_cfg else "cayley"))
    if gates and so8t_cfg is None:
        raise CheckpointError(f"{where}/config.json", f"the weights have {len(gates)} SO8T rotation gates but "
                                                      'config.json has no "so8t" block',
                              'add "so8t": {"version": 1, "rotation": "cayley", "position": "pre_o_proj"} '
                              "(docs/so8t-format.md)")

    heads = []
    labels = so8t_cfg.labels if so8t_cfg else {}
    for head in TRIALITY_HEADS:
        w_name = f"{TRIALITY_PREFIX}{head}_head.weight"
        b_name = f"{TRIALITY_PREFIX}{head}_head.bias"
        if w_name not in tensors:
            if b_name in tensors:
                raise CheckpointError(where, f"{b_name} has no matching weight", "the checkpoint is incomplete")
            continue
        shape = tuple(tensors[w_name].shape)
        if len(shape) != 2 or shape[1] != spec.hidden_size:
            raise CheckpointError(where, f"{w_name} has shape {list(shape)}, expected [n_labels, "
                                         f"{spec.hidden_size}] (it reads the final hidden state)", "")
        if b_name in tensors and tuple(tensors[b_name].shape) != (shape[0],):
            raise CheckpointError(where, f"{b_name} has shape {list(tensors[b_name].shape)}, expected [{shape[0]}]", "")
        if head in labels:
            head_labels = labels[head]
            if len(head_labels) != shape[0]:
                raise CheckpointError(f"{where}/config.json",
                                      f"so8t.triality_labels.{head} names {len(head_labels)} labels but "
                                      f"{w_name} has {shape[0]} rows", "make the label list match the head")
        elif len(TRIALITY_DEFAULT_LABELS[head]) == shape[0]:
            head_labels = TRIALITY_DEFAULT_LABELS[head]
        else:
            head_labels = tuple(f"label_{i}" for i in range(shape[0]))
        heads.append(TrialityHead(head=head, weight=w_name, bias=b_name if b_name in tensors else None,
                                  n_labels=shape[0], labels=head_labels))

    classifier_heads, stripped = [], []
    for name in tensors:
        if name.startswith(TRIALITY_PREFIX):
            if not TRIALITY_HEAD_RE.match(name):
                raise CheckpointError(where, f"unknown SO8T tensor {name!r}",
                                      "version 1 knows so8t.triality.{safety,authority}_head.{weight,bias}")
        elif CLASSIFIER_HEAD_RE.match(name):
            classifier_heads.append(name)
        else:
            reason = next((r for pattern, r in STRIP_RULES if pattern.search(name)), None)
            if reason is not None:
                stripped.append((name, reason))
    return So8tStructure(config=so8t_cfg, gates=tuple(sorted(gates.values(), key=lambda g: g.layer)),
                         heads=tuple(heads), classifier_heads=tuple(sorted(classifier_heads)),
                         stripped=tuple(sorted(stripped)))
