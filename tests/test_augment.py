"""Augmentation: presets, policies, seeded streams (also across workers), mixup/cutmix, the preview grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import QUICK_CPU, TINY_OVERRIDES
from finetune.cli import main
from finetune.data.loaders import ImageDataset, make_loader
from finetune.data.mixing import BatchMixer, create_mixer, dominant_label
from finetune.data.sources import Sample
from finetune.data.preprocessing import Preprocessing
from finetune.data.transforms import PRESETS, build_eval_transform, build_train_transform
from finetune.errors import FinetuneError
from finetune.config.recipe import AugmentConfig, load_recipe
from finetune.outputs.figures.augment_grid import denormalise

PRE = Preprocessing(size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("policy", ["none", "randaugment", "trivialaugment"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_and_policy_gives_model_sized_repeatable_tensors(preset, policy):
    runs = []
    for seed in (1, 1, 2):
        transform = build_train_transform(PRE, preset, policy=policy, seed=seed)
        # Smaller than, larger than, and not square like the model input; each twice.
        runs.append([transform(image=picture(h, w))["image"] for h, w in ((20, 28), (90, 60), (20, 28), (90, 60))])
    for tensor in runs[0]:
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), "the same seed must repeat the augmentations"
    if preset != "none" or policy != "none":
        assert any(not torch.equal(a, b) for a, b in zip(runs[0], runs[2])), "the seed has no effect"


def test_policy_changes_the_picture():
    plain = build_train_transform(PRE, "none", seed=0)
    image = picture(32, 32)
    changed = 0
    for policy in ("randaugment", "trivialaugment"):
        transform = build_train_transform(PRE, "none", policy=policy, seed=0)
        changed += sum(not torch.equal(transform(image=image)["image"], plain(image=image)["image"]) for _ in range(8))
    assert changed >= 8


def test_dataloader_workers_draw_different_augmentations(tmp_path):
    # The same picture 8 times: with one stream copied into both workers (albumentations keeps its
    # own random state), worker 0 and worker 1 would return identical batches.
    Image.fromarray(picture(48, 48)).save(tmp_path / "a.png")
    dataset = ImageDataset([Sample(tmp_path / "a.png", 0)] * 8, build_train_transform(PRE, "heavy", seed=0))
    loader = make_loader(dataset, batch_size=4, num_workers=2, seed=0)
    first, second = [images for images, _ in loader]
    assert not torch.equal(first, second)


def test_explicit_ops_and_bad_policy_are_user_errors():
    with pytest.raises(FinetuneError, match="not an albumentations transform"):
        build_train_transform(PRE, "light", ops=[{"name": "Flipp"}])
    with pytest.raises(FinetuneError, match="valid choices: none, randaugment, trivialaugment"):
        load_recipe(None, ["augment.policy=autoaugment"])
    with pytest.raises(FinetuneError, match="augment.mix_prob"):
        load_recipe(None, ["augment.mix_prob=1.5"])
    with pytest.raises(FinetuneError, match="augment.mixup"):
        load_recipe(None, ["augment.mixup=-0.2"])


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixer_gives_soft_targets_and_dominant_label(mixup, cutmix):
    torch.manual_seed(0)
    images, labels = torch.rand(5, 3, 16, 16), torch.tensor([0, 1, 2, 2, 1])  # odd batch on purpose
    mixer = BatchMixer(3, mixup, cutmix, prob=1.0)
    mixed_any = False
    for _ in range(6):
        out, targets = mixer(images, labels)
        assert out.shape == images.shape and targets.shape == (5, 3)
        assert torch.allclose(targets.sum(1), torch.ones(5))
        share = targets.gather(1, labels[:, None]).squeeze(1)
        # Train accuracy counts an image's own label when it keeps the larger share of the pixels/mix.
        assert torch.equal((dominant_label(targets) == labels)[share != 0.5], (share > 0.5)[share != 0.5])
        mixed_any |= not torch.equal(out, images)
    assert mixed_any


def test_mixer_off_or_never_applied():
    assert create_mixer(AugmentConfig(), 3) is None
    assert create_mixer(AugmentConfig(mixup=0.2, mix_prob=0.0), 3) is None
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    out, targets = BatchMixer(3, mixup=0.2, prob=0.0)(images, labels)
    assert torch.equal(out, images) and torch.equal(dominant_label(targets), labels)


def test_denormalise_recovers_the_pixels():
    image = picture(32, 32)
    tensor = build_eval_transform(Preprocessing(size=32, crop_pct=1.0))(image=image)["image"]
    back = denormalise(tensor[None], PRE.mean, PRE.std)[0]
    assert back.shape == image.shape and np.abs(back.astype(int) - image.astype(int)).max() <= 1


def test_augment_command_writes_a_grid(folder_dataset, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["augment", QUICK_CPU, "--data", str(folder_dataset), "--out", str(out), "--n", "6"]
    for item in TINY_OVERRIDES + ["augment.cutmix=1.0", "augment.policy=randaugment"]:
        args += ["--set", item]
    assert main(args) == 0
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.width > 200 and grid.height > 200
    assert "wrote 6 augmented training images" in capsys.readouterr().out
    assert main([*args, "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_data_crop_pct_frames_the_whole_image_and_travels_in_the_checkpoint(folder_dataset, tmp_path):
    from finetune import load_model, train

    result = train(None, data=folder_dataset, log=lambda _: None,
                   overrides=[*TINY_OVERRIDES, "train.epochs=1", "data.crop_pct=1.0", f"output={tmp_path}"])
    loaded = load_model(result.best_checkpoint)
    assert loaded.preprocessing.crop_pct == 1.0  # predict and evaluate frame images as training did
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[:, :2] = 255  # a white border stripe: kept with the whole image, cut off by the default 0.875 crop
    whole = build_eval_transform(loaded.preprocessing)(image=image)["image"]
    default = load_model(train(None, data=folder_dataset, log=lambda _: None,
                               overrides=[*TINY_OVERRIDES, "train.epochs=1", f"output={tmp_path}"]).best_checkpoint)
    cropped = build_eval_transform(default.preprocessing)(image=image)["image"]
    assert default.preprocessing.crop_pct < 1.0
    assert whole[:, :, 0].mean() > cropped[:, :, 0].mean() + 0.5
    with pytest.raises(FinetuneError, match="data.crop_pct"):
        load_recipe(QUICK_CPU, ["data.crop_pct=1.5"])
