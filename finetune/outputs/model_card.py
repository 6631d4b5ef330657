"""The model card (README.md) of a shared model folder: what it was trained on and how, how well it did, how to
use it without finetune, and where it should not be trusted. Facts come from the checkpoint and its run folder."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from finetune.outputs.run_dir import RunDir

__all__ = ["CardFacts", "USAGE", "write_model_card"]

CONFUSION_FILE = "validation_confusion.png"  # the run's eval/ confusion matrix, copied beside the card

# The code a user without finetune runs; the tests execute this very block against `finetune predict`.
USAGE = '''import json, sys
import numpy as np, timm, torch
from safetensors.torch import load_file

folder = "."                                  # this folder
images = ["photo.jpg"]                        # your images
sys.path.insert(0, folder)
from preprocess import load                   # the evaluation preprocessing finetune used, exactly

config = json.load(open(f"{folder}/config.json"))
extra = config["finetune"]
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
if extra["head"]:                             # an MLP head timm has no layer for: rebuilt with torch
    make = {"linear": lambda s: torch.nn.Linear(s["in"], s["out"], bias=s["bias"]),
            "batchnorm": lambda s: torch.nn.BatchNorm1d(s["features"], eps=s["eps"]),
            "relu": lambda s: torch.nn.ReLU(), "dropout": lambda s: torch.nn.Dropout(s["p"])}
    head = torch.nn.Sequential(*(make[s["type"]](s) for s in extra["head"]["layers"]))
    head.load_state_dict(load_file(f"{folder}/{extra['head']['file']}"))
    model = torch.nn.Sequential(model, head.eval())
batch = torch.from_numpy(np.stack([load(path, extra["preprocessing"]) for path in images]))
with torch.no_grad():
    logits = model(batch) / extra["temperature"]   # calibrated (temperature fitted on validation)
probs = logits.softmax(1) if extra["activation"] == "softmax" else logits.sigmoid()
for path, p in zip(images, probs):
    print(path, config["label_names"][int(p.argmax())], round(float(p.max()), 4))
'''


@dataclass(frozen=True)
class CardFacts:
    """What the card states about the model, from its checkpoint."""

    name: str
    architecture: str
    classes: Sequence[str]
    task: str
    size: int
    temperature: float
    recipe_yaml: str
    weights: str  # where the backbone's starting weights came from
    finetune_version: str


def _metrics(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _metrics_table(title: str, metrics: Optional[dict]) -> list[str]:
    if not metrics:
        return []
    rows = [f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in metrics.items()]
    return [f"**{title}**", "", "| metric | value |", "|---|---|", *rows, ""]


def _class_counts(run: RunDir) -> list[str]:
    """The run's images per class (train, val) as a markdown table; [] when the run has no class_counts.csv."""
    try:
        with run.class_counts.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError:
        return []
    if not rows:
        return []
    table = ["| " + " | ".join(row) + " |" for row in rows]
    return [table[0], "|---" * len(rows[0]) + "|", *table[1:]]


def _results(run: Optional[RunDir], folder: Path) -> list[str]:
    """Validation (and demo test) metrics and the confusion matrix, copied into `folder`, when the run has them."""
    if run is None:
        return ["No run folder was found beside the checkpoint, so no measured results are stated here.", ""]
    lines = _metrics_table("Validation", _metrics(run.eval.metrics))
    lines += _metrics_table("Test (scored against held-back answers)", _metrics(run.test_eval.metrics))
    if run.eval.confusion_png.is_file():
        shutil.copyfile(run.eval.confusion_png, folder / CONFUSION_FILE)
        lines += ["Confusion matrix on the validation images:", "", f"![confusion matrix]({CONFUSION_FILE})", ""]
    return lines or ["The run folder holds no evaluation, so no measured results are stated here.", ""]


def write_model_card(folder: Path, facts: CardFacts, run: Optional[RunDir]) -> Path:
    """Write `folder`/README.md (Hugging Face model-card front matter, then the card) and return its path."""
    counts = _class_counts(run) if run is not None else []
    decision = ("softmax over the classes: one label per image" if facts.task == "single_label" else
                "a sigmoid per class: any number of labels per image, each above its threshold in config.json")
    lines = [
        "---", "library_name: timm", "pipeline_tag: image-classification", "tags:", "- image-classification",
        "- timm", "- finetune", "---", "",
        f"# {facts.name}: {facts.architecture}, fine-tuned on {len(facts.classes)} classes", "",
        f"Fine-tuned with finetune {facts.finetune_version} from {facts.weights}, at {facts.size} x {facts.size} "
        f"pixels; {decision}. Classes: {', '.join(facts.classes)}.", "",
        "## Training data", "",
        *(counts + [""] if counts else ["The run folder's class counts were not found.", ""]),
        "## Results", "", *_results(run, folder),
        "## Calibration", "",
        f"Probabilities are calibrated by temperature scaling fitted on the validation images: logits / "
        f"{facts.temperature:.4f} before the {'softmax' if facts.task == 'single_label' else 'sigmoid'}.", "",
        "## How to use it (timm, no finetune)", "", "```python", USAGE.rstrip(), "```", "",
        "`preprocess.py` (Pillow, NumPy, OpenCV) decodes and resizes exactly as finetune did, so the "
        "probabilities match `finetune predict`'s. timm's own transforms from this config "
        "(`timm.data.create_transform(**timm.data.resolve_data_config(model=model))`) resize with Pillow "
        "instead of OpenCV: close, not identical.", "",
        "## Intended use and limits", "",
        f"- Made to sort images of these {len(facts.classes)} classes, like the training images. It gives every "
        "image one of them (a photo of anything else too): check the confidence, or use `finetune predict "
        "--reject-below P` where finetune is installed.",
        "- The results above come from this run's validation (and, where listed, test) images only; images from "
        "another camera, place or time can score lower.",
        "- It inherits what its pretrained backbone learned, biases included.", "",
        "## Recipe", "", "```yaml", facts.recipe_yaml.rstrip(), "```", "",
    ]
    card = folder / "README.md"
    card.write_text("\n".join(lines), encoding="utf-8")
    return card
