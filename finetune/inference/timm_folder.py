"""A model folder plain timm loads: `model.safetensors` + `config.json` written by timm's own `save_for_hf`,
the MLP head beside it when timm cannot hold it, and `preprocess.py` (finetune's exact evaluation transform).

timm expresses one Linear after the pooled features (its `reset_classifier`), so a head without hidden layers
goes into timm's classifier and `timm.create_model("local-dir:DIR", pretrained=True)` is the whole model. A head
with hidden layers (Linear, BatchNorm, ReLU, Dropout) has no timm equivalent: the body is saved as timm's
feature extractor (num_classes 0) and the head as `head.safetensors`, described layer by layer in config.json's
"finetune" section; the model card shows the ten lines of torch that rebuild it.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from finetune.config.recipe import TASK_ACTIVATIONS
from finetune.data import portable
from finetune.errors import FinetuneError
from finetune.inference.predict import LoadedModel
from finetune.models.backbones import check_backbone_name

__all__ = ["TimmFolder", "check_timm_backbone", "head_layers", "load_timm_folder", "rebuild_head", "write_timm_folder"]

HEAD_FILE = "head.safetensors"
PREPROCESS_FILE = "preprocess.py"


@dataclass(frozen=True)
class TimmFolder:
    """What `write_timm_folder` wrote and how closely the folder's model reproduces the checkpoint's."""

    folder: Path
    architecture: str
    head_in_timm: bool  # True: timm's classifier holds the head; False: head.safetensors beside the body
    max_abs_diff: float  # logits, folder model vs checkpoint model, on a random batch


def head_layers(head: nn.Sequential) -> list[dict]:
    """The head as plain layer descriptions (the order and sizes torch needs to rebuild it)."""
    described: list[dict] = []
    for layer in head:
        if isinstance(layer, nn.Linear):
            described.append({"type": "linear", "in": layer.in_features, "out": layer.out_features,
                              "bias": layer.bias is not None})
        elif isinstance(layer, nn.BatchNorm1d):
            described.append({"type": "batchnorm", "features": layer.num_features, "eps": layer.eps})
        elif isinstance(layer, nn.ReLU):
            described.append({"type": "relu"})
        elif isinstance(layer, nn.Dropout):
            described.append({"type": "dropout", "p": layer.p})
        else:
            raise FinetuneError(f"the head's {type(layer).__name__} layer has no description for --format timm")
    return described


def rebuild_head(layers: list[dict]) -> nn.Sequential:
    """The inverse of `head_layers` (the model card shows the same code for users without finetune)."""
    make = {"linear": lambda s: nn.Linear(s["in"], s["out"], bias=s["bias"]),
            "batchnorm": lambda s: nn.BatchNorm1d(s["features"], eps=s["eps"]),
            "relu": lambda s: nn.ReLU(), "dropout": lambda s: nn.Dropout(s["p"])}
    return nn.Sequential(*(make[s["type"]](s) for s in layers))


def _with_timm_classifier(body: nn.Module, head: nn.Sequential, pool: str) -> Optional[nn.Module]:
    """A copy of `body` whose own timm classifier is a Linear-only `head`; None when timm cannot hold it."""
    linears = [layer for layer in head if not isinstance(layer, nn.Dropout)]
    if len(linears) != 1 or not isinstance(linears[0], nn.Linear) or not hasattr(body, "reset_classifier"):
        return None
    linear, whole = linears[0], copy.deepcopy(body)
    whole.reset_classifier(linear.out_features, global_pool=pool)
    classifier = whole.get_classifier()
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != linear.weight.shape:
        return None
    with torch.no_grad():
        classifier.weight.copy_(linear.weight)
        classifier.bias.copy_(linear.bias)
    return whole.eval()


def load_timm_folder(folder: Path) -> nn.Module:
    """The folder's model as a timm user builds it (timm, safetensors and torch only; the card shows the same)."""
    import json

    import timm
    from safetensors.torch import load_file

    body = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    head = json.loads((folder / "config.json").read_text())["finetune"]["head"]
    if head is None:
        return body
    layers = rebuild_head(head["layers"])
    layers.load_state_dict(load_file(str(folder / head["file"])))
    return nn.Sequential(body, layers.eval())


def check_timm_backbone(loaded: LoadedModel) -> str:
    """The checkpoint's backbone name; FinetuneError when timm cannot build it (torchvision, classic networks)."""
    name = loaded.recipe.model.backbone
    source = check_backbone_name(name)
    if source != "timm":
        kind = "torchvision" if source == "torchvision" else "classic"
        raise FinetuneError(f"--format timm needs a timm backbone; {name} is a {kind} network that timm cannot "
                            "build. Use --format onnx or torchscript, which carry any model")
    return name


def write_timm_folder(loaded: LoadedModel, out: Path, extra: dict) -> TimmFolder:
    """Write `loaded` into the folder `out` in timm's format (see the module docstring); `extra` goes into
    config.json's "finetune" section next to what this function adds (task, head, preprocessing, decision)."""
    from timm.models import save_for_hf

    name = check_timm_backbone(loaded)
    model = loaded.model.float().eval()
    body, head = copy.deepcopy(model.backbone).eval(), copy.deepcopy(model.head).eval()
    whole = _with_timm_classifier(body, head, loaded.recipe.model.head.pool)
    in_timm, body = whole is not None, whole or body
    pre = loaded.preprocessing
    data_config = {"input_size": (3, pre.size, pre.size), "mean": tuple(pre.mean), "std": tuple(pre.std),
                   "interpolation": pre.interpolation, "crop_pct": pre.crop_pct, "crop_mode": "center"}
    section = {**extra, "task": loaded.task_name, "activation": TASK_ACTIVATIONS[loaded.task_name],
               "temperature": loaded.temperature, "preprocessing": pre.to_dict(), "preprocess_file": PREPROCESS_FILE,
               "head": None if in_timm else {"file": HEAD_FILE, "layers": head_layers(head)}}
    if loaded.checkpoint.get("thresholds") is not None:
        section["thresholds"] = [float(t) for t in loaded.checkpoint["thresholds"]]
    config = {"label_names": list(loaded.classes), "finetune": section}
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(body, str(out), model_config=config, safe_serialization=True, data_config=data_config)
    if not in_timm:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    shutil.copyfile(portable.__file__, out / PREPROCESS_FILE)
    example = torch.randn(3, 3, pre.size, pre.size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = float((load_timm_folder(out)(example) - model(example)).abs().max())
    if not diff <= 1e-4:
        raise FinetuneError(f"the timm folder's model differs from the checkpoint's by up to {diff:.3g}; "
                            f"do not share {out}")
    return TimmFolder(out, name.removeprefix("timm/"), in_timm, diff)
