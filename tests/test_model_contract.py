"""The contract every architecture keeps with the trainer and the methods (models/base.py), checked once for
DeepLab-V3 and for Segmenter on tiny random models."""
import math

import pytest
import torch

from models.backbones import residual_sum
from models.deeplab import DeepLabV3
from models.segmenter import Segmenter, stage_block_indices_for_depth

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


# ---- stage maps (forward(images, stages=True)) and the balanced initialisation (issue 18, 1.3 and 1.12) ----

# a 6-block tiny ViT has 4 distinct stage blocks (0-based 1, 2, 4, 5); the 2-block TINY_VIT has only 2
TINY_VIT_6_BLOCKS = {**TINY_VIT, "depth": 6}
# (B, 3, H, W) inputs: DeepLab's strides 4/8/16/16 divide 64; 37 x 45 is no multiple of the ViT's patch 8
DEEPLAB_INPUT, VIT_INPUT = (2, 3, 64, 64), (2, 3, 37, 45)
DEEPLAB_STAGE_CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet101": (256, 512, 1024, 2048)}
STAGE_MODELS = ["resnet18", "resnet101", "vit"]


def stage_model(name: str, classes_per_step=(3, 2)):
    torch.manual_seed(0)
    if name == "vit":
        return Segmenter(list(classes_per_step), pretrained="none", image_size=32, decoder_layers=2,
                         decoder_heads=2, decoder_dim=32, encoder_drop_path_rate=0.1,
                         backbone_overrides=TINY_VIT_6_BLOCKS)
    return DeepLabV3(list(classes_per_step), name, "none", 16, head_channels=32)


def expected_stage_shapes(name: str) -> list[tuple]:
    if name == "vit":
        batch, _, height, width = VIT_INPUT
        grid = (-(-height // 8), -(-width // 8))  # timm pads to a multiple of the patch: ceil
        return [(batch, TINY_VIT["embed_dim"], *grid)] * 4
    batch, _, height, width = DEEPLAB_INPUT
    strides = (4, 8, 16, 16)  # output stride 16: the fourth stage is dilated
    return [(batch, channels, height // s, width // s)
            for channels, s in zip(DEEPLAB_STAGE_CHANNELS[name], strides)]


@pytest.mark.parametrize("depth,indices", [(12, [2, 5, 8, 11]), (6, [1, 2, 4, 5]), (4, [0, 1, 2, 3]),
                                           (2, [0, 1]), (1, [0]), (24, [5, 11, 17, 23])])
def test_stage_block_indices(depth, indices):
    """ceil(k * depth / 4) - 1 for k = 1..4, duplicates removed: ViT-B/16's 3rd, 6th, 9th and 12th blocks."""
    assert stage_block_indices_for_depth(depth) == indices


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", STAGE_MODELS)
def test_stages_add_maps_and_change_nothing_else(name, mode):
    """stages=True returns 4 maps of the documented shapes (gradients flow through them); every other output
    is bit-identical to stages=False, in eval and in train mode (dropout and drop-path draw the same masks)."""
    model = getattr(stage_model(name), mode)()
    images = torch.randn(DEEPLAB_INPUT if name != "vit" else VIT_INPUT)
    torch.manual_seed(1)
    plain = model(images)
    torch.manual_seed(1)
    staged = model(images, stages=True)
    assert plain.stages is None
    assert [tuple(stage.shape) for stage in staged.stages] == expected_stage_shapes(name)
    for field in ("logits", "logits_lowres", "features", "class_embeddings"):
        a, b = getattr(plain, field), getattr(staged, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    if mode == "train":
        assert all(stage.requires_grad for stage in staged.stages)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101"])
def test_deeplab_stages_are_the_last_blocks_residual_sums(backbone):
    """Each map is its stage's last block's ``bn(conv(...)) + shortcut`` before the ReLU, read independently
    from torchvision's own block (hooks clone the last BatchNorm's output and the block's input before
    torchvision adds and applies its in-place ReLU); the maps hold negative values, and the backbone's output
    is bit-identical to running torchvision's stages as they are."""
    model = stage_model(backbone).eval()
    trunk = model.backbone
    seen = {}
    hooks = []
    for k, layer in enumerate(trunk.stage_layers()):
        last = layer[-1]
        assert last.downsample is None  # the shortcut of a stage's last block is its input
        last_norm = last.bn3 if hasattr(last, "bn3") else last.bn2
        hooks.append(last.register_forward_pre_hook(
            lambda module, args, k=k: seen.__setitem__(("input", k), args[0].clone())))
        hooks.append(last_norm.register_forward_hook(
            lambda module, args, out, k=k: seen.__setitem__(("residual", k), out.clone())))
    images = torch.randn(DEEPLAB_INPUT)
    with torch.no_grad():
        try:
            x = trunk.stem(images)
            for layer in trunk.stage_layers():
                x = layer(x)  # torchvision's forward, in-place add and ReLU
        finally:
            for hook in hooks:
                hook.remove()
        features, stages = trunk.forward_with_stages(images)
        staged_output = model(images, stages=True)
    assert torch.equal(features, x) and torch.equal(trunk(images), x)
    # every block, the stages' first ones with a strided / downsampled shortcut included
    with torch.no_grad():
        x = trunk.stem(images)
        for layer in trunk.stage_layers():
            for block in layer:
                block_input = x.clone()
                x = block(x)
                assert torch.equal(torch.relu(residual_sum(block, block_input)), x)
    for k, stage in enumerate(stages):
        assert (stage < 0).any(), k  # pre-activation
        assert torch.equal(stage, seen[("residual", k)] + seen[("input", k)]), k
        assert torch.equal(staged_output.stages[k], stage)


@pytest.mark.parametrize("name", ["vit", "tiny"])
def test_segmenter_stages_are_encoder_block_outputs_before_the_final_norm(name):
    """Each map is the patch tokens after encoder block ``stage_block_indices`` (read with a forward hook), as
    (B, E, h, w), not normalised; the 2-block tiny ViT has 2 maps (blocks 0 and 1)."""
    model = (stage_model("vit") if name == "vit" else tiny("segmenter", [3, 2])).eval()
    indices = [1, 2, 4, 5] if name == "vit" else [0, 1]
    assert model.stage_block_indices == indices
    seen = {}
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, out))
             for i, block in enumerate(model.encoder.blocks)]
    images = torch.randn(VIT_INPUT)
    try:
        with torch.no_grad():
            out = model(images, stages=True)
    finally:
        for hook in hooks:
            hook.remove()
    batch, _, h, w = expected_stage_shapes("vit")[0]
    assert len(out.stages) == len(indices)
    prefix = model.encoder.num_prefix_tokens
    for stage, i in zip(out.stages, indices):
        tokens = seen[i][:, prefix:]
        assert torch.equal(stage, tokens.reshape(batch, h, w, -1).permute(0, 3, 1, 2)), i


def old_and_grown(architecture: str, old_classes: int = 4, new_classes: int = 2):
    """A one-step model with random head parameters (so copies and shifts are visible) and the two-step model
    grown from it, as the trainer builds it: the old weights loaded, the new step's keys at their init."""
    old = tiny(architecture, [old_classes]).eval()
    with torch.no_grad():
        if architecture == "segmenter":
            old.mask_norms[0].weight.uniform_(0.5, 2.0)
            old.mask_norms[0].bias.normal_(0.0, 1.0)
        else:
            old.classifiers[0].bias.normal_(0.0, 1.0)
    new = tiny(architecture, [old_classes, new_classes]).eval()
    missing = new.load_state_dict(old.state_dict(), strict=False).missing_keys
    assert missing and all(key.startswith(("classifiers.1.", "class_embeddings.1", "mask_norms.1."))
                           for key in missing)
    return old, new


def changed_keys(before: dict, after: dict) -> set:
    return {key for key, value in before.items() if not torch.equal(after[key], value)}


def test_deeplab_balanced_transfer_preserves_probabilities():
    """BASELINES_SPEC 1.4: right after the transfer, on any input, every old non-background class keeps the
    old model's probability, and background plus the new classes share the old background probability."""
    old_classes, new_classes = 4, 2
    old, new = old_and_grown("deeplabv3", old_classes, new_classes)
    new.transfer_background_to_new_classes(balanced=True)
    torch.manual_seed(2)
    for images in (torch.randn(2, 3, 32, 32), 5 * torch.randn(1, 3, 48, 40) + 1):
        with torch.no_grad():
            p_old = old(images).logits.softmax(1)
            p_new = new(images).logits.softmax(1)
        assert p_old[:, 0].max() > 0.1  # background is not negligible, so a wrong share would show
        torch.testing.assert_close(p_new[:, 1:old_classes], p_old[:, 1:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_new[:, 0] + p_new[:, old_classes:].sum(1), p_old[:, 0], rtol=1e-5, atol=1e-6)


def test_deeplab_balanced_transfer_changes_only_the_new_rows_and_background_bias():
    """New rows: background's weight, bias b_0 - log(C_new + 1); background's bias lowered by the same amount;
    background's weight, the old rows and everything else unchanged."""
    _, model = old_and_grown("deeplabv3", 4, 2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.transfer_background_to_new_classes(balanced=True)
    after = model.state_dict()
    assert changed_keys(before, after) == {"classifiers.0.bias", "classifiers.1.weight", "classifiers.1.bias"}
    shift = math.log(2 + 1)
    b_0 = before["classifiers.0.bias"][0]
    assert torch.equal(after["classifiers.1.weight"], before["classifiers.0.weight"][:1].expand(2, -1, -1, -1))
    assert torch.equal(after["classifiers.1.bias"], (b_0 - shift).expand(2))
    assert torch.equal(after["classifiers.0.bias"][0], b_0 - shift)
    assert torch.equal(after["classifiers.0.bias"][1:], before["classifiers.0.bias"][1:])


def test_segmenter_balanced_transfer_changes_only_the_new_step_and_background_mask_norm_bias():
    """Class embeddings copied as without ``balanced``; the new step's mask-norm weight copies background's, its
    bias is background's - log(C_new + 1), and background's mask-norm bias is lowered by the same amount."""
    _, model = old_and_grown("segmenter", 4, 2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.transfer_background_to_new_classes(balanced=True)
    after = model.state_dict()
    assert changed_keys(before, after) == {*model.new_step_keys(), "mask_norms.0.bias"}
    shift = math.log(2 + 1)
    background_weight, background_bias = before["mask_norms.0.weight"][0], before["mask_norms.0.bias"][0]
    assert torch.equal(after["class_embeddings.1"], before["class_embeddings.0"][:, :1].expand(-1, 2, -1))
    assert torch.equal(after["mask_norms.1.weight"], background_weight.expand(2))
    assert torch.equal(after["mask_norms.1.bias"], (background_bias - shift).expand(2))
    assert torch.equal(after["mask_norms.0.bias"][0], background_bias - shift)
    assert torch.equal(after["mask_norms.0.bias"][1:], before["mask_norms.0.bias"][1:])
    logits = model(torch.randn(1, 3, 32, 32)).logits  # background and the new classes start equal
    torch.testing.assert_close(logits[:, 4:], logits[:, :1].expand(-1, 2, -1, -1))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_plain_transfer_changes_only_the_new_step(architecture):
    """balanced=False (the default) copies background into the new step and touches nothing else: no bias is
    shifted, the Segmenter's mask norms keep their values."""
    _, model = old_and_grown(architecture, 4, 2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.transfer_background_to_new_classes(balanced=False)
    after = model.state_dict()
    if architecture == "segmenter":
        assert changed_keys(before, after) == {"class_embeddings.1"}
    else:
        assert changed_keys(before, after) == {"classifiers.1.weight", "classifiers.1.bias"}
        assert torch.equal(after["classifiers.1.bias"], before["classifiers.0.bias"][:1].expand(2))
