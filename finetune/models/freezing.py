"""Freezing by stage: which parameters train, BatchNorm policy, and a per-stage summary.

A backbone's stages run in order from the input (`stem`) to the last block; the MLP `head`
comes after them and always trains. Three mutually exclusive recipe keys pick what else trains:
`model.trainable: [layer4]` (names), `model.trainable_last: 1` (the last N stages) and
`model.freeze_to: layer3` (every stage up to and including that one is frozen).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from finetune.errors import FinetuneError
from finetune.models.classifier import Classifier

__all__ = [
    "HEAD",
    "stage_names",
    "stage_parameters",
    "select_parameters",
    "resolve_trainable",
    "apply_freeze",
    "trainable_stages",
    "stage_summary",
    "format_summary",
]

HEAD = "head"
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def require_stages(model: nn.Module, key: str) -> None:
    """Raise unless `model` has named stages, which recipe key `key` refers to."""
    if not getattr(model, "stages", None):
        raise FinetuneError(f"{key} needs a model with named stages (built by finetune.models.build_model)")


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def stage_names(model: Classifier) -> list[str]:
    """The backbone's stages from input to output (the head not included)."""
    return list(model.stages)


def stage_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Stage → names of its parameters, input to output, then 'other' (if any) and 'head'.

    A model without stages (not a Classifier) is one stage, 'all'.
    """
    names = [n for n, _ in model.named_parameters()]
    stages = getattr(model, "stages", None)
    if not stages:
        return {"all": names}
    grouped: dict[str, list[str]] = {}
    seen: set[str] = set()
    for stage, prefixes in stages.items():
        grouped[stage] = [n for n in names if n not in seen and any(_matches(n, "backbone." + p) for p in prefixes)]
        seen.update(grouped[stage])
    other = [n for n in names if n not in seen and not n.startswith(HEAD + ".")]
    if other:
        grouped["other"] = other
    grouped[HEAD] = [n for n in names if n.startswith(HEAD + ".")]
    return grouped


def _unknown_stage(model: Classifier, name: str, key: str, paths_ok: bool = True) -> FinetuneError:
    example = next(iter(model.stages.values()))[0] if model.stages else "layer4"
    paths = f"or any module path, e.g. {example}; " if paths_ok else ""
    return FinetuneError(
        f"unknown stage '{name}' in {key}; stages of this backbone, input to output: "
        f"{', '.join(model.stages)} ({paths}see `finetune inspect BACKBONE`)"
    )


def select_parameters(model: Classifier, names: list[str], key: str = "model.trainable") -> set[str]:
    """Parameter names in the named stages or backbone module paths; 'head' and 'all' are allowed too."""
    params = [n for n, _ in model.named_parameters()]
    modules: Optional[set[str]] = None
    selected: set[str] = set()
    for name in names:
        if name == "all":
            prefixes = ["backbone", HEAD]
        elif name == HEAD:
            prefixes = [HEAD]
        elif name in model.stages:
            prefixes = ["backbone." + p for p in model.stages[name]]
        else:
            if modules is None:
                modules = {n for n, _ in model.backbone.named_modules() if n}
            if name not in modules:
                raise _unknown_stage(model, name, key)
            prefixes = ["backbone." + name]
        selected |= {n for n in params if any(_matches(n, p) for p in prefixes)}
    return selected


def resolve_trainable(
    model: Classifier,
    trainable: Optional[list[str]] = None,
    trainable_last: Optional[int] = None,
    freeze_to: Optional[str] = None,
) -> set[str]:
    """Parameter names that train, from one of the recipe's three freezing keys; the head always trains.

    With none of them set, every parameter trains.
    """
    stages = stage_names(model)
    if trainable_last is not None:
        if trainable_last > len(stages):
            raise FinetuneError(
                f"model.trainable_last is {trainable_last} but this backbone has {len(stages)} stages: "
                f"{', '.join(stages)}"
            )
        trainable = stages[len(stages) - trainable_last:]
    elif freeze_to is not None:
        if freeze_to not in stages:
            raise _unknown_stage(model, freeze_to, "model.freeze_to", paths_ok=False)
        trainable = stages[stages.index(freeze_to) + 1:]
    if trainable is None:
        return {n for n, _ in model.named_parameters()}
    return select_parameters(model, [HEAD, *trainable])


def apply_freeze(model: Classifier, trainable: set[str], bn_policy: str = "frozen") -> None:
    """Set requires_grad from `trainable`; the BN layers that stay in eval: frozen parts' ('frozen'), the
    whole backbone's ('fixed'), none ('train')."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    model.bn_policy = bn_policy
    model.frozen_bn = []
    for name, module in model.named_modules():
        if not isinstance(module, BN_TYPES):
            continue
        # fixed: every backbone BN keeps its pretrained statistics (its scale and shift still train).
        if (bn_policy == "fixed" and name.startswith("backbone.")) or (
                bn_policy == "frozen" and not _trains(name, module, trainable)):
            model.frozen_bn.append(name)
    model.train(model.training)


def _trains(name: str, module: nn.Module, trainable: set[str]) -> bool:
    own = list(module.parameters(recurse=False))
    if own:
        return any(p.requires_grad for p in own)
    # An affine=False BN has no parameters of its own: it trains when its enclosing block does.
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return any(_matches(t, parent) for t in trainable) if parent else bool(trainable)


def trainable_stages(model: nn.Module) -> list[str]:
    """Stages (and 'head') with at least one trainable parameter."""
    named = dict(model.named_parameters())
    return [s for s, names in stage_parameters(model).items() if any(named[n].requires_grad for n in names)]


def stage_summary(model: Classifier) -> list[tuple[str, int, int]]:
    """(stage, total parameters, trainable parameters) for every backbone stage and the head."""
    named = dict(model.named_parameters())
    return [
        (stage, sum(named[n].numel() for n in names), sum(named[n].numel() for n in names if named[n].requires_grad))
        for stage, names in stage_parameters(model).items()
    ]


def format_summary(rows: list[tuple[str, int, int]], lr_multipliers: Optional[dict[str, float]] = None) -> str:
    """A small table of parameters per stage, with totals (and each stage's lr multiplier if given)."""
    width = max(len(r[0]) for r in rows + [("total", 0, 0)])
    extra = f"  {'lr mult':>8}" if lr_multipliers else ""
    lines = [f"{'stage':<{width}}  {'params':>12}  {'trainable':>12}{extra}"]
    for stage, total, trainable in rows:
        mult = f"  {lr_multipliers.get(stage, 1.0):>8.3g}" if lr_multipliers else ""
        lines.append(f"{stage:<{width}}  {total:>12,}  {trainable:>12,}{mult}")
    lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows):>12,}  {sum(r[2] for r in rows):>12,}")
    return "\n".join(lines)
