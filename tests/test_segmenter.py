"""Segmenter (ViT + Mask Transformer) on a tiny random ViT: shapes, per-step layout, transfer, loading."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from models.backbones import PretrainedWeightsError
from models.segmenter import Segmenter, vit_encoder_kwargs
from utils.checkpoint import CheckpointError, load_model_weights

TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8}


def tiny(classes_per_step, image_size=32, pretrained="none", overrides=None, seed=0):
    torch.manual_seed(seed)
    return Segmenter(classes_per_step, pretrained=pretrained, image_size=image_size, decoder_layers=2,
                     decoder_heads=2, decoder_dim=32, drop_path_rate=0.1,
                     backbone_overrides=overrides or TINY_VIT)


def tiny_timm_vit(img_size, **changes):
    """A timm ViT in the encoder's format, with a classification head (its keys must be ignored)."""
    return timm.create_model("vit_base_patch16_384", pretrained=False, img_size=img_size, **{**TINY_VIT, **changes})


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


def test_local_pretrained_file_resamples_pos_embed(tmp_path):
    torch.manual_seed(3)
    source = tiny_timm_vit(img_size=64)  # 8x8 grid; the model below uses a 4x4 grid
    path = tmp_path / "vit_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = tiny([3], image_size=32, pretrained=str(path))
    assert model.encoder.pos_embed.shape == (1, 17, 64)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert torch.allclose(model.encoder.pos_embed, expected)
    assert torch.equal(model.encoder.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.equal(model.encoder.cls_token, source.cls_token)
    assert model(torch.randn(1, 3, 40, 40)).logits.shape == (1, 3, 40, 40)


def test_local_safetensors_file(tmp_path):
    source = tiny_timm_vit(img_size=32)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = tiny([3], image_size=32, pretrained=str(path))
    assert torch.equal(model.encoder.pos_embed, source.pos_embed)


def test_timm_pretrained_mechanism_resamples_pos_embed(tmp_path):
    """pretrained='imagenet' goes through timm's own loader; check (offline, with a local file in place of the
    hub) that it resizes a 384-style grid to the model's grid with the encoder's arguments."""
    torch.manual_seed(4)
    source = tiny_timm_vit(img_size=48)  # 6x6 grid
    path = tmp_path / "hub_stand_in.pth"
    torch.save(source.state_dict(), path)
    encoder = timm.create_model("vit_base_patch16_384", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                **vit_encoder_kwargs(32, 0.0, TINY_VIT))
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1)
    assert torch.allclose(encoder.pos_embed, expected)


def test_mismatched_local_pretrained_file(tmp_path):
    path = tmp_path / "vit_deeper.pth"
    torch.save(tiny_timm_vit(img_size=32, depth=3).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"vit_deeper.pth.*unexpected keys \(first: blocks.2"):
        tiny([3], pretrained=str(path))


def test_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        tiny([1])
