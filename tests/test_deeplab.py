import pytest
import torch

from models.backbones import PretrainedWeightsError, ResNetBackbone
from models.deeplab import DeepLabV3
from utils.checkpoint import CheckpointError, load_model_weights


def tiny(classes_per_step, backbone="resnet18", output_stride=16):
    torch.manual_seed(0)
    return DeepLabV3(classes_per_step, backbone, "none", output_stride, head_channels=32)


@pytest.mark.parametrize("backbone,output_stride", [("resnet18", 16), ("resnet18", 8), ("resnet50", 16)])
def test_shapes_and_output_stride(backbone, output_stride):
    model = tiny([3, 2], backbone, output_stride).eval()
    out = model(torch.randn(2, 3, 64, 48))
    assert out.logits.shape == (2, 5, 64, 48)
    assert out.logits_lowres.shape == (2, 5, 64 // output_stride, 48 // output_stride)
    assert out.features.shape == (2, 32, 64 // output_stride, 48 // output_stride)
    assert model.class_vectors().shape == (5, 32)
    assert out.class_embeddings is None


def test_growing_a_model_keeps_old_outputs():
    old = tiny([4]).eval()
    new = tiny([4, 2]).eval()
    new_keys = tuple(set(new.state_dict()) - set(old.state_dict()))
    assert sorted(new_keys) == ["classifiers.1.bias", "classifiers.1.weight"]
    load_model_weights(new, old.state_dict(), "old", allowed_missing_prefixes=new_keys)
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(new(x).logits[:, :4], old(x).logits, atol=1e-6)
    with pytest.raises(CheckpointError, match="missing"):
        load_model_weights(new, old.state_dict(), "old")


def test_local_pretrained_file(tmp_path):
    source = ResNetBackbone("resnet18", "none")
    from torchvision.models import resnet18
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    loaded = ResNetBackbone("resnet18", str(path))
    assert torch.equal(loaded.stem[0].weight, reference.conv1.weight)
    assert not torch.equal(source.stem[0].weight, reference.conv1.weight)


def test_missing_or_mismatched_pretrained_file(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="nowhere.pth.*does not exist"):
        ResNetBackbone("resnet18", str(tmp_path / "nowhere.pth"))
    from torchvision.models import resnet34
    path = tmp_path / "r34.pth"
    torch.save(resnet34().state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"r34.pth.*unexpected keys \(first: layer1.2"):
        ResNetBackbone("resnet18", str(path))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="known: resnet18"):
        ResNetBackbone("resnet7", "none")
