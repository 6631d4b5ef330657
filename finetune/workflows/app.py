"""`finetune app`: a local web page (Gradio) to try a checkpoint on your own images: the top classes with calibrated
probabilities, the decision (rejection, or a multi-label checkpoint's label set at its thresholds) and a Grad-CAM
overlay, for several images at once. Bad uploads get a line on the page, never a crash."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from finetune.data.images import load_rgb
from finetune.data.sources import Sample
from finetune.errors import FinetuneError
from finetune.inference.predict import LoadedModel, ProbsSettings, load_model, predict_probs
from finetune.tasks import task_of_model

__all__ = ["APP_HINT", "AppOptions", "PageWork", "build_app", "run_app"]

APP_HINT = "the app needs Gradio: pip install 'finetune[app]'"
MAX_IMAGES = 16  # per request: the page stays responsive on a CPU


@dataclass(frozen=True)
class AppOptions:
    """What the page shows and accepts."""

    topk: int = 5
    reject_below: Optional[float] = None
    max_upload_mb: float = 20.0


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The Grad-CAM heat map blended over the image the model saw (jet colours, 45 % opacity)."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heat)[..., :3] * 255.0
    return np.clip(0.55 * image + 0.45 * colours, 0, 255).astype(np.uint8)


class PageWork:
    """The page's work, without Gradio: uploaded files in, an HTML summary and Grad-CAM overlays out."""

    def __init__(self, loaded: LoadedModel, options: AppOptions) -> None:
        self.loaded, self.options = loaded, options
        self.task = task_of_model(loaded)
        self.decision = self.task.ensemble_decision([loaded])

    def _readable(self, paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
        good, problems = [], []
        limit = self.options.max_upload_mb * 1e6
        for path in paths[:MAX_IMAGES]:
            name = html.escape(path.name)
            if path.stat().st_size > limit:
                problems.append(f"{name}: larger than {self.options.max_upload_mb:g} MB, not read")
                continue
            try:
                load_rgb(path)
            except FinetuneError as err:
                reason = str(err).split(": ", 1)[-1].replace(str(path), path.name)  # not the server's temp path
                problems.append(f"{name}: not an image this model can read ({html.escape(reason)})")
                continue
            good.append(path)
        if len(paths) > MAX_IMAGES:
            problems.append(f"only the first {MAX_IMAGES} of {len(paths)} images were read; send the rest next")
        return good, problems

    def _image_block(self, path: Path, probs: np.ndarray) -> str:
        classes = self.loaded.classes
        order = np.argsort(-probs)[: self.options.topk]
        rows = "".join(f"<tr><td>{html.escape(classes[k])}</td><td>{probs[k]:.3f}</td></tr>" for k in order)
        verdict = self.task.decision_text(probs, classes, self.decision, self.options.reject_below)
        return (f"<div class='finetune-result'><h3>{html.escape(path.name)}</h3><p class='finetune-decision'>"
                f"{html.escape(verdict)}</p><table><tr><th>class</th><th>probability</th></tr>{rows}</table></div>")

    def __call__(self, files: Optional[Sequence[Union[str, Path]]]) -> tuple[str, list]:
        """HTML (each image's decision and top classes, then any problems) and (overlay, caption) pairs."""
        paths = [Path(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            return "<p>Pick or drop one or more images, then press Classify.</p>", []
        good, problems = self._readable(paths)
        blocks = []
        overlays: list = []
        if good:
            probs = predict_probs(self.loaded, [Sample(p) for p in good], ProbsSettings(batch_size=MAX_IMAGES))
            blocks = [self._image_block(p, row) for p, row in zip(good, probs)]
            overlays = self._grad_cam(good, probs)
        notes = "".join(f"<li>{line}</li>" for line in problems)
        return "".join(blocks) + (f"<ul class='finetune-problems'>{notes}</ul>" if notes else ""), overlays

    def _grad_cam(self, paths: list[Path], probs: np.ndarray) -> list:
        from finetune.inference.gradcam import grad_cam

        cams = grad_cam(self.loaded, paths, [int(np.argmax(row)) for row in probs])
        if not cams:  # a backbone without a spatial feature map (a vision transformer)
            return []
        classes = self.loaded.classes
        return [(_overlay(cam.image, cam.heat), f"{path.name}: where it looked for {classes[int(np.argmax(row))]}")
                for path, cam, row in zip(paths, cams, probs)]

    def describe(self) -> str:
        """The model, in a few lines above the upload box."""
        recipe, loaded = self.loaded.recipe, self.loaded
        lines = [f"**{recipe.name}**: {recipe.model.backbone}, {len(loaded.classes)} classes "
                 f"({', '.join(loaded.classes[:30])}{', ...' if len(loaded.classes) > 30 else ''}), "
                 f"{loaded.preprocessing.size} px; probabilities calibrated (temperature {loaded.temperature:.3f})."]
        if self.options.reject_below is not None:
            lines.append(f"Images whose top probability is below {self.options.reject_below:g} are called unknown.")
        if "thresholds" in self.decision:
            cuts = ", ".join(f"{c} {t:.2f}" for c, t in zip(loaded.classes, self.decision["thresholds"]))
            lines.append(f"Several labels per image, each at its own threshold: {cuts}.")
        return "\n\n".join(lines)


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    try:
        import gradio
    except ImportError:
        raise FinetuneError(APP_HINT) from None
    return gradio


def build_app(checkpoint: Union[str, Path], options: AppOptions = AppOptions()):
    """The Gradio Blocks page for `checkpoint` (not launched)."""
    gr = _gradio()
    classify = PageWork(load_model(Path(checkpoint).expanduser(), "cpu"), options)
    with gr.Blocks(title=f"finetune: {classify.loaded.recipe.name}") as page:
        gr.Markdown(classify.describe())
        files = gr.File(file_count="multiple", label="Images (pick or drop several)")
        button = gr.Button("Classify", variant="primary")
        results = gr.HTML(elem_id="finetune-results")
        cams = gr.Gallery(label="Grad-CAM: where the model looked for its top class", columns=4)
        button.click(classify, inputs=files, outputs=[results, cams])
    return page


def run_app(
    checkpoint: Union[str, Path],
    port: int = 7860,
    host: str = "127.0.0.1",
    topk: int = 5,
    reject_below: Optional[float] = None,
    max_upload_mb: float = 20.0,
    log: Callable[[str], None] = print,
) -> None:
    """Serve a page to try `checkpoint` on your own images until interrupted (Ctrl-C).

    Args:
        checkpoint: a run's checkpoint.
        port: the port to serve on.
        host: the address to bind; 127.0.0.1 keeps the page on this machine (0.0.0.0 shares it on the network).
        topk: classes listed per image.
        reject_below: call an image unknown when its top calibrated probability is below this (one label per image).
        max_upload_mb: larger uploads are refused with a message on the page.
        log: where progress lines go.
    """
    if not 1 <= topk:
        raise FinetuneError(f"--topk must be at least 1, got {topk}")
    if reject_below is not None and not 0.0 < reject_below < 1.0:
        raise FinetuneError(f"--reject-below must be between 0 and 1, got {reject_below}")
    page = build_app(checkpoint, AppOptions(topk, reject_below, max_upload_mb))
    log(f"serving {checkpoint} on http://{host}:{port} (Ctrl-C to stop)")
    page.launch(server_name=host, server_port=port, max_file_size=f"{max_upload_mb:g}mb", quiet=True)
