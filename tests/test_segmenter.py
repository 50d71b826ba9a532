"""Segmenter (ViT + Mask Transformer) on a tiny random ViT: shapes, per-step layout, transfer, loading, and the
reference recipe's regularisation, LayerNorm eps and position-embedding resampling."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from models import build_model
from models.backbones import PretrainedWeightsError
from models.segmenter import Segmenter
from utils.checkpoint import CheckpointError, load_model_weights
from utils.config import ModelConfig

TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}


def tiny(classes_per_step, image_size=32, pretrained="none", overrides=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Segmenter(classes_per_step, pretrained=pretrained, image_size=image_size, decoder_layers=2,
                     decoder_heads=2, decoder_dim=32, backbone_overrides=overrides or TINY_VIT, **kwargs)


def tiny_timm_vit(img_size, **changes):
    """A timm ViT in the encoder's format, with a classification head (its keys must be ignored)."""
    return timm.create_model("vit_base_patch16_384", pretrained=False, img_size=img_size, **{**TINY_VIT, **changes})


def resize_grid(pos_embed, old_grid, new_grid, mode, antialias):
    """By hand: the class token's entry kept, the (old_grid) patch part resized with F.interpolate."""
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False, antialias=antialias)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def added_pos_embed(encoder, height, width):
    """The position embedding the encoder adds to a (height, width) input's tokens (class token included):
    the patch embedding is replaced by zeros and the token sequence is read where timm applies pos_drop."""
    seen = []
    zero_patches = encoder.patch_embed.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    capture = encoder.pos_drop.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            encoder.eval()(torch.randn(1, 3, height, width))
    finally:
        zero_patches.remove()
        capture.remove()
    (tokens,) = seen
    return torch.cat([tokens[:, :1] - encoder.cls_token.detach(), tokens[:, 1:]], dim=1)


def dropout_rates(module):
    return {m.p for m in module.modules() if isinstance(m, nn.Dropout)}


def drop_path_rates(blocks):
    """Each block's stochastic-depth rate (timm leaves an Identity where the rate is 0); both residual branches
    of a block share it."""
    rates = []
    for block in blocks:
        pair = {getattr(block.drop_path1, "drop_prob", 0.0), getattr(block.drop_path2, "drop_prob", 0.0)}
        assert len(pair) == 1
        rates.append(pair.pop())
    return rates


def assert_reference_recipe(model):
    """Issue 10 items 1-2: encoder dropout and drop-path 0; decoder dropout 0, drop-path [0.0, 0.1] over its 2
    blocks; every LayerNorm (blocks, final norms) eps 1e-5."""
    assert dropout_rates(model.encoder) == {0.0}
    assert drop_path_rates(model.encoder.blocks) == [0.0] * len(model.encoder.blocks)
    assert dropout_rates(model.blocks) == {0.0}
    assert drop_path_rates(model.blocks) == pytest.approx([0.0, 0.1])
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * len(model.encoder.blocks) + 1 + 2 * len(model.blocks) + 1
    assert {m.eps for m in norms} == {1e-5}


def test_shapes_two_steps():
    model = tiny([4, 3]).eval()
    out = model(torch.randn(2, 3, 48, 64))
    assert out.logits.shape == (2, 7, 48, 64)
    assert out.logits_lowres.shape == (2, 7, 6, 8)
    assert out.features.shape == (2, 32, 6, 8)
    assert out.class_embeddings.shape == (2, 7, 32)
    assert model.class_vectors().shape == (7, 32)
    assert [tuple(e.shape) for e in model.class_embeddings] == [(1, 4, 32), (1, 3, 32)]
    assert [tuple(n.weight.shape) for n in model.mask_norms] == [(4,), (3,)]
    # features are the projected patch outputs before L2-normalisation, and they produce the logits
    assert not torch.allclose(out.features.norm(dim=1), torch.ones(2, 6, 8))
    cosine = torch.einsum("bdhw,bcd->bchw", F.normalize(out.features, dim=1), F.normalize(out.class_embeddings, dim=2))
    raw = model.normalize_masks(cosine.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 7, 6, 8)
    assert torch.allclose(raw, out.logits_lowres, atol=1e-5)


def test_input_not_multiple_of_patch_size():
    model = tiny([3]).eval()
    out = model(torch.randn(1, 3, 37, 50))
    assert out.logits.shape == (1, 3, 37, 50)
    assert out.logits_lowres.shape == (1, 3, 5, 7)  # ceil(37/8), ceil(50/8)
    assert out.features.shape == (1, 32, 5, 7)


def test_mask_norm_statistics_over_all_channels_affine_per_step():
    model = tiny([3, 2])
    with torch.no_grad():
        model.mask_norms[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.mask_norms[1].bias.copy_(torch.tensor([0.5, -0.5]))
    masks = torch.randn(2, 10, 5)
    expected = (masks - masks.mean(-1, keepdim=True)) / (masks.std(-1, keepdim=True) + 1e-5)
    expected = expected * torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0]) + torch.tensor([0, 0, 0, 0.5, -0.5])
    assert torch.allclose(model.normalize_masks(masks), expected, atol=1e-6)


def test_single_class_step_is_learnable():
    """A LayerNorm over a one-channel block would return a constant; the new class must vary and learn."""
    model = tiny([3, 1]).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits_lowres[:, 3].std() > 1e-3
    out.logits[:, 3].mean().backward()
    assert model.class_embeddings[1].grad.abs().sum() > 0
    assert model.mask_norms[1].weight.grad.abs().sum() > 0


def test_growing_a_model_restores_old_weights():
    old = tiny([4], seed=1).eval()
    new = tiny([4, 2], seed=2).eval()
    missing = new.load_state_dict(old.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(new.new_step_keys()) == [
        "class_embeddings.1", "mask_norms.1.bias", "mask_norms.1.weight"]
    load_model_weights(new, old.state_dict(), "old", allowed_missing_prefixes=tuple(new.new_step_keys()))
    with pytest.raises(CheckpointError, match="missing"):
        load_model_weights(new, old.state_dict(), "old")
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key


def test_grown_model_old_channels():
    """The decoder attends jointly over patches and all class tokens and the mask norm standardises over all
    channels (as the reference), so a new step changes the old channels' logits. With the new tokens hidden
    from attention, the old channels' cosine scores, the features and the old class outputs are the old
    model's exactly."""
    old = tiny([4], seed=1).eval()
    new = tiny([4, 2], seed=2).eval()
    new.load_state_dict(old.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 40)
    assert not torch.allclose(new(x).logits[:, :4], old(x).logits, atol=1e-5)

    def capture_scores(model, store):
        normalize = model.normalize_masks
        def wrapped(masks):
            store.append(masks)
            return normalize(masks)
        model.normalize_masks = wrapped

    def hide_last_tokens(block, count):
        forward = block.forward
        def wrapped(tokens, attn_mask=None, is_causal=False):
            n = tokens.shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool)
            allowed[:, n - count:] = False
            allowed[n - count:, n - count:] = True  # the hidden tokens still see themselves (discarded anyway)
            return forward(tokens, attn_mask=allowed)
        block.forward = wrapped

    old_scores, new_scores = [], []
    capture_scores(old, old_scores)
    capture_scores(new, new_scores)
    for block in new.blocks:
        hide_last_tokens(block, 2)
    reference, out = old(x), new(x)
    assert torch.allclose(new_scores[0][..., :4], old_scores[0], atol=1e-5)
    assert torch.allclose(out.features, reference.features, atol=1e-5)
    assert torch.allclose(out.class_embeddings[:, :4], reference.class_embeddings, atol=1e-5)


def test_backward_reaches_encoder_decoder_and_class_embeddings():
    model = tiny([3, 2]).train()
    out = model(torch.randn(2, 3, 32, 32))
    loss = F.cross_entropy(out.logits, torch.randint(0, 5, (2, 32, 32))) + out.features.pow(2).mean()
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # every parameter: the cls token's output is dropped, but the patch tokens attend to it
    assert no_grad == []


def test_bf16_autocast_keeps_scores_in_fp32():
    model = tiny([3, 2]).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 32, 32))
    assert out.logits.dtype == out.features.dtype == out.class_embeddings.dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def test_fused_attention(monkeypatch):
    model = tiny([3]).eval()
    attentions = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attentions) == 4 and model.fused_attention_enabled  # 2 encoder + 2 decoder blocks
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 4


def test_parameter_groups_split_encoder_and_decoder():
    """(that the groups cover every parameter once: tests/test_model_contract.py)"""
    model = tiny([3, 1])
    groups = model.parameter_groups()
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in model.class_embeddings.parameters()} <= {id(p) for p in groups["head"]}


@pytest.mark.parametrize("name", ["nowhere.pth", "nowhere.safetensors"])
def test_missing_local_pretrained_file(tmp_path, name):
    with pytest.raises(PretrainedWeightsError, match=f"{name}.*does not exist"):
        tiny([3], pretrained=str(tmp_path / name))


# pos_embed_interpolation: how a pretrained grid is resized at load time, and the grid resampled at run time
LOAD_RESIZE = {"reference": False, "timm": True}  # bicubic; the value: antialias


@pytest.mark.parametrize("mode", ["reference", "timm"])
def test_local_pretrained_file_resizes_pos_embed_grid(tmp_path, mode):
    """A 6x6 pretrained grid into an 8x8 model grid (as 24x24 into 32x32 for 512 px): bicubic, without antialias
    for the reference (timm 0.6.12), with it for timm's current rule."""
    torch.manual_seed(3)
    source = tiny_timm_vit(img_size=48)
    path = tmp_path / "vit_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = tiny([3], image_size=64, pretrained=str(path), pos_embed_interpolation=mode)
    assert model.encoder.pos_embed.shape == (1, 65, 64)
    pretrained = source.pos_embed.detach()
    expected = {aa: resize_grid(pretrained, (6, 6), (8, 8), "bicubic", antialias=aa) for aa in (False, True)}
    assert not torch.allclose(expected[False], expected[True], atol=1e-5)  # the two rules differ here
    assert torch.allclose(model.encoder.pos_embed, expected[LOAD_RESIZE[mode]], atol=1e-6)
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.equal(model.encoder.cls_token, source.cls_token)
    assert model(torch.randn(1, 3, 40, 40)).logits.shape == (1, 3, 40, 40)


@pytest.mark.parametrize("mode", ["reference", "timm"])
def test_imagenet_pretrained_resizes_pos_embed_grid(tmp_path, mode):
    """pretrained='imagenet' goes through timm's own loader; check offline, with a local file in place of the
    hub's (timm's pretrained_cfg 'file' entry), that it resizes the grid by the same rule."""
    torch.manual_seed(4)
    source = tiny_timm_vit(img_size=48)  # 6x6 grid
    path = tmp_path / "hub_stand_in.pth"
    torch.save(source.state_dict(), path)
    overrides = {**TINY_VIT, "pretrained_cfg_overlay": {"file": str(path)}}
    model = tiny([3], image_size=64, pretrained="imagenet", overrides=overrides, pos_embed_interpolation=mode)
    expected = resize_grid(source.pos_embed.detach(), (6, 6), (8, 8), "bicubic", antialias=LOAD_RESIZE[mode])
    assert torch.allclose(model.encoder.pos_embed, expected, atol=1e-6)
    assert torch.equal(model.encoder.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("mode, interpolation, antialias", [("reference", "bilinear", False),
                                                            ("timm", "bicubic", True)])
def test_pos_embed_resampled_for_other_input_sizes(mode, interpolation, antialias):
    """At the model's own size (32 px: 4x4) the grid is used as it is; at 37x50 (padded to a 5x7 grid) the
    reference resamples it bilinearly, align_corners=False, no antialias; timm bicubically with antialias."""
    model = tiny([3], image_size=32, pos_embed_interpolation=mode)
    pos_embed = model.encoder.pos_embed.detach()
    assert torch.allclose(added_pos_embed(model.encoder, 32, 32), pos_embed)
    expected = resize_grid(pos_embed, (4, 4), (5, 7), interpolation, antialias)
    assert torch.allclose(added_pos_embed(model.encoder, 37, 50), expected, atol=1e-6)


def test_reference_recipe_is_the_default():
    assert_reference_recipe(tiny([3, 2]))


def test_regularisation_and_eps_are_settable():
    model = tiny([3], encoder_dropout=0.2, encoder_drop_path_rate=0.3, decoder_dropout=0.4, decoder_drop_path_rate=0.0,
                 layer_norm_eps=1e-6)
    assert dropout_rates(model.encoder.blocks) == {0.2} and model.encoder.pos_drop.p == 0.2
    assert drop_path_rates(model.encoder.blocks) == pytest.approx([0.0, 0.3])  # timm: linear over the blocks
    assert dropout_rates(model.blocks) == {0.4} and drop_path_rates(model.blocks) == [0.0, 0.0]
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}


def test_build_model_passes_every_model_key():
    cfg = ModelConfig(architecture="segmenter", backbone="vit_base_patch16_384", pretrained="none", decoder_layers=3,
                      decoder_heads=2, decoder_dim=16, encoder_dropout=0.2, encoder_drop_path_rate=0.3,
                      decoder_dropout=0.4, decoder_drop_path_rate=0.5, layer_norm_eps=1e-4,
                      pos_embed_interpolation="timm", backbone_overrides=TINY_VIT)
    model = build_model(cfg, [3, 2], image_size=32)
    assert dropout_rates(model.encoder.blocks) == {0.2} and model.encoder.pos_drop.p == 0.2
    assert drop_path_rates(model.encoder.blocks) == pytest.approx([0.0, 0.3])
    assert dropout_rates(model.blocks) == {0.4}
    assert drop_path_rates(model.blocks) == pytest.approx([0.0, 0.25, 0.5])
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-4}
    expected = resize_grid(model.encoder.pos_embed.detach(), (4, 4), (5, 7), "bicubic", antialias=True)
    assert torch.allclose(added_pos_embed(model.encoder, 37, 50), expected, atol=1e-6)


def test_local_safetensors_file(tmp_path):
    source = tiny_timm_vit(img_size=32)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = tiny([3], image_size=32, pretrained=str(path))
    assert torch.equal(model.encoder.pos_embed, source.pos_embed)


def test_mismatched_local_pretrained_file(tmp_path):
    path = tmp_path / "vit_deeper.pth"
    torch.save(tiny_timm_vit(img_size=32, depth=3).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"vit_deeper.pth.*unexpected keys \(first: blocks.2"):
        tiny([3], pretrained=str(path))


def test_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        tiny([1])
