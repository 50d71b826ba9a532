"""The contract every architecture keeps with the trainer and the methods (models/base.py), checked once for
DeepLab-V3 and for Segmenter on tiny random models."""
import pytest
import torch

from models.deeplab import DeepLabV3
from models.segmenter import Segmenter

TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}


def tiny(architecture: str, classes_per_step: list[int]):
    torch.manual_seed(0)
    if architecture == "deeplabv3":
        return DeepLabV3(classes_per_step, "resnet18", "none", 16, head_channels=32)
    return Segmenter(classes_per_step, pretrained="none", image_size=32, decoder_layers=2, decoder_heads=2,
                     decoder_dim=32, encoder_drop_path_rate=0.1, backbone_overrides=TINY_VIT)


ARCHITECTURES = ["deeplabv3", "segmenter"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_background_transfer_copies_the_background_vector(architecture):
    model = tiny(architecture, [4, 3])
    old_rows = model.class_vectors()[:4].detach().clone()
    model.transfer_background_to_new_classes()
    vectors = model.class_vectors()
    for k in range(4, 7):
        assert torch.equal(vectors[k], vectors[0])
        cosine = torch.dot(vectors[k], vectors[0]) / (vectors[k].norm() * vectors[0].norm())
        assert torch.isclose(cosine, torch.tensor(1.0))
    assert torch.equal(vectors[:4], old_rows)
    assert vectors.requires_grad  # the copies are still parameters that train
    # right after the transfer every new class scores exactly like background
    logits = model.eval()(torch.randn(1, 3, 32, 32)).logits
    assert torch.allclose(logits[:, 4:], logits[:, :1].expand(-1, 3, -1, -1), atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_transfer_needs_an_incremental_step(architecture):
    with pytest.raises(RuntimeError, match="at least one incremental step"):
        tiny(architecture, [5]).transfer_background_to_new_classes()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parameter_groups_cover_every_parameter(architecture):
    model = tiny(architecture, [3, 1])
    groups = model.parameter_groups()
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_frozen_model_runs_with_weights_in_the_training_dtype(architecture):
    """trainer/step.py keeps the frozen old model in the mixed-precision dtype on GPUs (half the memory, no
    per-iteration weight casts): its forward must accept low-precision weights under autocast."""
    model = tiny(architecture, [3, 2]).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images).logits
        model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images).logits
    assert low.shape == reference.shape and torch.isfinite(low).all()
    assert (low.float().argmax(1) == reference.argmax(1)).float().mean() > 0.5  # the same model, coarser numbers
