"""Segmenter: a ViT encoder and a Mask-Transformer decoder with per-step class embeddings (spec section 3).

Encoder: a timm VisionTransformer (``vit_base_patch16_384`` by default) built at ``image_size`` with
``dynamic_img_size`` and ``dynamic_img_pad``: any input size works (timm zero-pads the bottom/right to a
multiple of the patch size and resamples the position embedding to the patch grid); only the patch tokens are
used (class/register tokens are dropped).

Decoder (Mask Transformer, Strudel et al. 2021), for N patch tokens and C classes:
    tokens (B, N, E) --proj_dec--> (B, N, D); append the class embeddings (B, C, D)
    -> ``decoder_layers`` pre-norm Transformer blocks (joint self-attention over patches and classes)
    -> LayerNorm -> patches (B, N, D) @ proj_patch, classes (B, C, D) @ proj_classes
    -> L2-normalise both -> masks = patches @ classes^T (B, N, C) -> mask norm -> (B, C, h, w).

Incremental layout. The per-step pieces are the class embeddings ``class_embeddings.{t}`` (1, n_t, D) and the
mask-norm affine parameters ``mask_norms.{t}.weight`` / ``mask_norms.{t}.bias`` (n_t,). Growing a model by one
step adds exactly these three keys, so ``new.load_state_dict(old.state_dict(), strict=False)`` reports as
missing only ``class_embeddings.{T}``, ``mask_norms.{T}.weight`` and ``mask_norms.{T}.bias`` (T = new step);
the trainer relies on this.

Mask norm. The statistics (mean, std) are taken over *all* current channels at each patch and only the affine
parameters are kept per step, as the reference implementation does. A LayerNorm applied to each step's block
on its own would make every single-class step (15-1, 10-1, 19-1, ...) output a constant logit (a one-channel
LayerNorm returns its bias) that no gradient can move. Consequence: the old channels' logits depend on the new
channels, exactly as they already do through the decoder's joint self-attention.

What the methods read: ``features`` = the projected patch outputs before L2-normalisation (B, D, h, w) -- the
features the classifier reads, distilled by AFD; ``class_embeddings`` = the projected class outputs before
normalisation (B, C, D) -- the Transformer's extra MSE term; ``class_vectors()`` = the learned class embeddings
(C, D) -- background transfer and the orthogonal objective.

Stage maps (``forward(images, stages=True)``; this project's choice, as neither MiB nor PLOP defines a ViT
version, BASELINES_SPEC 5): the patch tokens after the encoder blocks ``stage_block_indices_for_depth(depth)``
(0-based: ``ceil(k * depth / 4) - 1`` for k = 1..4, duplicates removed; ViT-B/16, depth 12: blocks 2, 5, 8, 11,
i.e. the 3rd, 6th, 9th and 12th), before the encoder's final norm, as (B, E, h, w) maps; fewer than 4 when
depth < 4 (depth 2: blocks 0 and 1).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from types import MethodType
from typing import Callable
from urllib.error import URLError

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from timm.layers import LayerNorm, resample_abs_pos_embed, trunc_normal_
from timm.models import load_pretrained
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from .backbones import (COPY_TO_TORCH_HUB, PretrainedWeightsError, load_matching, load_state_dict_file,
                        missing_download_message, torch_hub_checkpoint)
from .base import IncrementalSegmenter, SegmentationOutput


POS_EMBED_INTERPOLATIONS = ("reference", "timm")


def stage_block_indices_for_depth(depth: int) -> list[int]:
    """0-based indices of the encoder blocks whose outputs are the stage maps: ``ceil(k * depth / 4) - 1`` for
    k = 1..4, duplicates removed, in order. depth 12 -> [2, 5, 8, 11]; 6 -> [1, 2, 4, 5]; 4 -> [0, 1, 2, 3];
    2 -> [0, 1]; 1 -> [0]. The last index is always the last block."""
    if depth < 1:
        raise ValueError(f"an encoder needs at least one block, got depth {depth}")
    return sorted({math.ceil(k * depth / 4) - 1 for k in range(1, 5)})


def vit_encoder_kwargs(image_size: int, dropout: float = 0.0, drop_path_rate: float = 0.0,
                       layer_norm_eps: float = 1e-5, overrides: dict | None = None) -> dict:
    """Keyword arguments of ``timm.create_model`` for the encoder: all tokens out (no pooling, no head), any
    input size accepted (padded to the patch size, position embedding resampled to the grid).

    ``dropout`` is the reference ViT's one dropout rate, which timm splits in three: after adding the position
    embedding (pos_drop_rate), on the attention weights (attn_drop_rate), and after the attention projection and
    both MLP layers (proj_drop_rate). timm's ``drop_rate`` is the classifier head's, which the encoder has not.
    ``layer_norm_eps`` applies to every LayerNorm of the blocks and the final norm (timm's default: 1e-6)."""
    return dict(img_size=image_size, num_classes=0, global_pool="", pos_drop_rate=dropout, attn_drop_rate=dropout,
                proj_drop_rate=dropout, drop_path_rate=drop_path_rate,
                norm_layer=partial(LayerNorm, eps=layer_norm_eps), dynamic_img_size=True, dynamic_img_pad=True,
                **(overrides or {}))


def pretrained_filter(pos_embed_interpolation: str) -> Callable:
    """timm's checkpoint filter for the encoder. It resizes a pretrained position-embedding grid (24x24 for the
    384 px weights) to the encoder's grid bicubically; ``reference`` without antialias, as the timm version of
    the authors' runs (0.6.12) did, ``timm`` with timm's current antialias."""
    return partial(checkpoint_filter_fn, interpolation="bicubic", antialias=pos_embed_interpolation == "timm")


def _pos_embed_bilinear(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Replacement of timm's ``VisionTransformer._pos_embed`` (dynamic image size, NHWC patch tokens in) that
    resamples the patch-grid part of the position embedding bilinearly, align_corners=False, no antialias, as
    the reference does for inputs of another size than ``image_size`` (timm: bicubic with antialias).
    Prefix (class/register) tokens are left as they are."""
    batch, h, w, dim = x.shape
    prefix = [token.expand(batch, -1, -1) for token in (vit.cls_token, vit.reg_token) if token is not None]
    pos_embed = resample_abs_pos_embed(vit.pos_embed, new_size=[h, w], old_size=vit.patch_embed.grid_size,
                                       num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
                                       interpolation="bilinear", antialias=False, align_corners=False)
    x = x.reshape(batch, h * w, dim)
    if vit.no_embed_class:  # the position embedding covers the patch tokens only
        x = torch.cat(prefix + [x + pos_embed], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + pos_embed
    return vit.pos_drop(x)


def use_reference_pos_embed_resampling(vit: VisionTransformer) -> None:
    """Make this one encoder resample its position embedding as the reference does (see _pos_embed_bilinear);
    timm's class and other models are untouched."""
    if not (isinstance(vit, VisionTransformer) and vit.dynamic_img_size and vit.pos_embed is not None):
        raise ValueError("pos_embed_interpolation=reference needs a timm VisionTransformer with a learned "
                         "position embedding, built with dynamic_img_size")
    vit._pos_embed = MethodType(_pos_embed_bilinear, vit)


def enable_fused_attention(module: nn.Module) -> None:
    """Make every timm attention layer call F.scaled_dot_product_attention (flash / memory-efficient kernels)
    whatever timm's default was (it reads TIMM_FUSED_ATTN from the environment at construction)."""
    if not hasattr(F, "scaled_dot_product_attention"):
        raise RuntimeError("this PyTorch has no F.scaled_dot_product_attention")
    for sub in module.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = True


def read_vit_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm-format ViT state dict from a local file (``torch.save`` output, or ``.safetensors`` as on the
    Hugging Face hub). Raises PretrainedWeightsError naming the file when it is missing or unreadable."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_state_dict_file(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {str(path)!r} does not exist "
                                     "(model.pretrained takes 'imagenet', 'none' or a path to a state dict)")
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise PretrainedWeightsError(f"could not read pretrained weights file {str(path)!r}: {err}") from err


def hf_cache_file(hf_hub_id: str, filename: str) -> tuple[Path, Path, str]:
    """Where the Hugging Face hub client caches ``filename`` of the repository ``hf_hub_id`` (``org/name``,
    optionally ``@revision``): the repository's cache folder ``$HF_HUB_CACHE/models--<org>--<name>`` (HF_HUB_CACHE
    defaults to $HF_HOME/hub), the file in it (``snapshots/<commit>/<filename>``, the commit written as ``*``),
    and the file's download URL."""
    repo_id, _, revision = hf_hub_id.partition("@")
    folder = Path(hf_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    url = f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{filename}"
    return folder, folder / "snapshots" / "*" / filename, url


def load_timm_pretrained(encoder: VisionTransformer, backbone: str, filter_fn: Callable) -> None:
    """timm's default pretrained weights for ``backbone`` through timm's loader (from the Hugging Face hub, or
    from a URL through torch.hub for older entries; cached or downloaded). Not cached and no network:
    PretrainedWeightsError naming the file expected in the cache."""
    cfg = encoder.pretrained_cfg
    weights = f"timm's pretrained weights of {backbone}"
    try:
        load_pretrained(encoder, num_classes=encoder.num_classes, in_chans=encoder.in_chans, filter_fn=filter_fn)
    except LocalEntryNotFoundError as err:  # the hub client: not cached, and no network (or HF_HUB_OFFLINE=1)
        # timm asks for model.safetensors first (then for the pytorch_model.bin of older repositories)
        folder, expected, url = hf_cache_file(cfg["hf_hub_id"], cfg.get("hf_hub_filename") or "model.safetensors")
        raise PretrainedWeightsError(missing_download_message(
            weights, expected, url, "no network, or HF_HUB_OFFLINE is set",
            f"Copy the folder {folder.name} from the Hugging Face cache of a machine with network")) from err
    except URLError as err:  # torch.hub, for entries without a hub id
        raise PretrainedWeightsError(missing_download_message(
            weights, torch_hub_checkpoint(cfg["url"]), cfg["url"], str(err.reason), COPY_TO_TORCH_HUB)) from err


def build_vit_encoder(backbone: str, pretrained: str, image_size: int, dropout: float = 0.0,
                      drop_path_rate: float = 0.0, layer_norm_eps: float = 1e-5,
                      pos_embed_interpolation: str = "reference", overrides: dict | None = None) -> VisionTransformer:
    """The encoder. ``pretrained``: ``imagenet`` (timm's default weights for ``backbone``, for
    vit_base_patch16_384 the augreg in21k->in1k 384 px ones), ``none`` (random init) or a path to a local
    timm-format state dict (every key must match except the classifier ``head.*``). Pretrained weights go
    through timm's checkpoint filter, which resizes the position-embedding grid to ``image_size`` (see
    pretrained_filter). ``pos_embed_interpolation`` also picks how the grid is resampled for inputs of other
    sizes at run time: ``reference`` bilinear, ``timm`` timm's bicubic with antialias."""
    if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ValueError(f"pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, "
                         f"got {pos_embed_interpolation!r}")
    encoder = timm.create_model(backbone, pretrained=False, **vit_encoder_kwargs(
        image_size, dropout, drop_path_rate, layer_norm_eps, overrides))
    filter_fn = pretrained_filter(pos_embed_interpolation)
    if pretrained == "imagenet":
        load_timm_pretrained(encoder, backbone, filter_fn)
    elif pretrained != "none":
        state = read_vit_state_dict(pretrained)
        try:
            state = filter_fn(state, encoder)  # also resamples the patch kernel and drops pre_logits
        except Exception as err:
            raise PretrainedWeightsError(f"pretrained weights {str(pretrained)!r} could not be adapted to "
                                         f"{backbone}: {err}") from err
        load_matching(encoder, state, str(pretrained), ignore_prefixes=("head.",))
    if pos_embed_interpolation == "reference":
        use_reference_pos_embed_resampling(encoder)
    enable_fused_attention(encoder)
    return encoder


class MaskNormAffine(nn.Module):
    """The affine part of one step's mask norm: ``weight`` and ``bias`` of shape (n_t,)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))


class Segmenter(IncrementalSegmenter):
    """ViT + Mask Transformer with one block of class embeddings and mask-norm parameters per step.

    The regularisation and normalisation arguments default to the MBS reference's training recipe:
    ``encoder_dropout`` (see vit_encoder_kwargs) 0 and ``encoder_drop_path_rate`` (stochastic depth,
    rising linearly over its blocks as timm does) 0; ``decoder_dropout`` (attention weights, attention
    projection, MLP) 0 and ``decoder_drop_path_rate`` 0.1, rising linearly from 0 over the decoder blocks
    ([0.0, 0.1] for 2); ``layer_norm_eps`` 1e-5 for every LayerNorm of encoder and decoder (the mask norm has
    its own ``mask_norm_eps``); ``pos_embed_interpolation`` ``reference`` (see build_vit_encoder).
    """

    def __init__(self, classes_per_step: list[int], backbone: str = "vit_base_patch16_384", pretrained: str = "none",
                 image_size: int = 512, decoder_layers: int = 2, decoder_heads: int = 12, decoder_dim: int = 768,
                 encoder_drop_path_rate: float = 0.0, backbone_overrides: dict | None = None,
                 decoder_dropout: float = 0.0, decoder_drop_path_rate: float = 0.1, mask_norm_eps: float = 1e-5,
                 encoder_dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 pos_embed_interpolation: str = "reference"):
        super().__init__(classes_per_step)
        if self.num_classes < 2:
            raise ValueError("a Segmenter needs at least 2 classes (the mask norm standardises over classes)")
        self.encoder = build_vit_encoder(backbone, pretrained, image_size, encoder_dropout, encoder_drop_path_rate,
                                         layer_norm_eps, pos_embed_interpolation, backbone_overrides)
        self.patch_size = tuple(self.encoder.patch_embed.patch_size)
        self.decoder_dim = decoder_dim
        self.mask_norm_eps = mask_norm_eps
        # Inputs are normalised with ImageNet mean/std (datasets/transforms.py) for both architectures, as the
        # spec and the MBS reference do, although timm's augreg ViT weights were trained with mean/std 0.5.

        self.proj_dec = nn.Linear(self.encoder.embed_dim, decoder_dim)
        rates = torch.linspace(0, decoder_drop_path_rate, decoder_layers).tolist()
        norm_layer = partial(LayerNorm, eps=layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=decoder_dropout,
                  attn_drop=decoder_dropout, drop_path=rate, norm_layer=norm_layer) for rate in rates)
        self.decoder_norm = norm_layer(decoder_dim)
        # the encoder keeps timm's init (or its pretrained weights); the decoder gets ViT-style init
        for module in (self.proj_dec, self.blocks, self.decoder_norm):
            module.apply(self._init_decoder_weights)
        enable_fused_attention(self.blocks)
        # D x D projections with entries of variance 1/D, so projected vectors keep their scale
        scale = decoder_dim ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(decoder_dim, decoder_dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(decoder_dim, decoder_dim))

        self.class_embeddings = nn.ParameterList()
        for n in self.classes_per_step:
            embedding = nn.Parameter(torch.empty(1, n, decoder_dim))
            trunc_normal_(embedding, std=0.02)
            self.class_embeddings.append(embedding)
        self.mask_norms = nn.ModuleList(MaskNormAffine(n) for n in self.classes_per_step)

    @staticmethod
    def _init_decoder_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def fused_attention_enabled(self) -> bool:
        """True when every attention layer (encoder and decoder) uses F.scaled_dot_product_attention."""
        flags = [m.fused_attn for m in self.modules() if hasattr(m, "fused_attn")]
        return bool(flags) and all(flags)

    def new_step_keys(self) -> list[str]:
        """State-dict keys of the last step: the only keys a checkpoint of the previous step lacks."""
        t = len(self.classes_per_step) - 1
        return [f"class_embeddings.{t}", f"mask_norms.{t}.weight", f"mask_norms.{t}.bias"]

    @property
    def stage_block_indices(self) -> list[int]:
        """0-based indices of the encoder blocks whose outputs ``forward(..., stages=True)`` returns."""
        return stage_block_indices_for_depth(len(self.encoder.blocks))

    def encode(self, images: torch.Tensor, stages: bool = False
               ) -> tuple[torch.Tensor, tuple[int, int], list[torch.Tensor] | None]:
        """images (B, 3, H, W) -> patch tokens (B, h*w, E), the grid (h, w) = (ceil(H/p), ceil(W/p)) and, with
        ``stages``, the stage maps (B, E, h, w) (None without). timm's forward_intermediates runs the same
        patch embedding, position embedding (this encoder's own resampling included) and blocks as
        forward_features, one block at a time, so the final tokens are the same either way."""
        if stages:
            tokens, stage_maps = self.encoder.forward_intermediates(
                images, indices=self.stage_block_indices, output_fmt="NCHW", norm=False)
        else:
            tokens, stage_maps = self.encoder.forward_features(images), None
        tokens = tokens[:, self.encoder.num_prefix_tokens:]
        grid = (math.ceil(images.shape[-2] / self.patch_size[0]), math.ceil(images.shape[-1] / self.patch_size[1]))
        if tokens.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(f"encoder returned {tokens.shape[1]} patch tokens, expected a {grid} grid")
        return tokens, grid, stage_maps

    def normalize_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C): standardise over all C channels at each patch (unbiased std, eps added to
        the std, as the reference), then scale and shift with each step's own affine parameters."""
        mean = masks.mean(dim=-1, keepdim=True)
        std = masks.std(dim=-1, keepdim=True)
        weight = torch.cat([norm.weight for norm in self.mask_norms]).to(masks.dtype)
        bias = torch.cat([norm.bias for norm in self.mask_norms]).to(masks.dtype)
        return (masks - mean) / (std + self.mask_norm_eps) * weight + bias

    def forward(self, images: torch.Tensor, stages: bool = False) -> SegmentationOutput:
        """images (B, 3, H, W) -> logits (B, C, H, W), logits_lowres (B, C, h, w), features (B, D, h, w),
        class_embeddings (B, C, D); h, w = ceil(H/p), ceil(W/p). ``stages=True`` adds the encoder's stage maps
        (B, E, h, w), one per ``stage_block_indices`` entry (see the module docstring)."""
        B, _, H, W = images.shape
        tokens, (h, w), stage_maps = self.encode(images, stages)
        n_patches = h * w
        x = self.proj_dec(tokens)                                                   # (B, N, D)
        classes = self.class_vectors().unsqueeze(0).expand(B, -1, -1)              # (B, C, D)
        x = torch.cat([x, classes.to(x.dtype)], dim=1)                              # (B, N + C, D)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        # cosine scores and their standardisation are precision-sensitive and cheap: keep them in fp32
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = x.float()
            # .float(): a frozen old model may keep its weights in the training dtype (trainer/step.py)
            patches = x[:, :n_patches] @ self.proj_patch.float()                   # (B, N, D)
            class_out = x[:, n_patches:] @ self.proj_classes.float()               # (B, C, D)
            masks = F.normalize(patches, dim=-1) @ F.normalize(class_out, dim=-1).transpose(1, 2)  # (B, N, C)
            masks = self.normalize_masks(masks)
            logits_lowres = masks.transpose(1, 2).reshape(B, self.num_classes, h, w)
            # upsample to the padded size the grid covers, then crop timm's bottom/right padding
            padded = (h * self.patch_size[0], w * self.patch_size[1])
            logits = F.interpolate(logits_lowres, size=padded, mode="bilinear", align_corners=False)[..., :H, :W]
        features = patches.transpose(1, 2).reshape(B, self.decoder_dim, h, w)
        return SegmentationOutput(logits=logits, logits_lowres=logits_lowres, features=features,
                                  class_embeddings=class_out, stages=stage_maps)

    def class_vectors(self) -> torch.Tensor:
        """(C, D): the learned class embeddings of all steps in step order (the parameters; gradients flow)."""
        return torch.cat([embedding[0] for embedding in self.class_embeddings], dim=0)

    @torch.no_grad()
    def transfer_background_to_new_classes(self, balanced: bool = False) -> None:
        """Spec 2(a): every class embedding of the last step becomes a copy of background's (row 0 of step 0).

        Only the class embeddings are copied, as the spec names them; the new step's mask-norm affine keeps
        its fresh init (weight 1, bias 0).

        ``balanced=True`` is this project's version of MiB's "init_balanced" (BASELINES_SPEC 1.4) on the mask
        norm, whose affine parameters play the classifier bias's role: with ``s = log(C_new + 1)``, the new
        step's mask-norm weights copy background's, their biases are background's minus ``s``, and
        background's mask-norm bias is lowered by ``s`` as well; the class embeddings are copied as above.
        Unlike on DeepLab this does not preserve the old model's probabilities exactly: the mask norm
        standardises each patch over all C channels, so the new channels move the mean and std every old
        logit is standardised with (and the new class tokens also join the decoder's self-attention).
        Background and the new classes do start with equal logits (equal embeddings, equal affine
        parameters)."""
        if len(self.class_embeddings) < 2:
            raise RuntimeError("background transfer needs a model with at least one incremental step")
        background, new = self.class_embeddings[0], self.class_embeddings[-1]
        new.copy_(background[:, :1].expand_as(new))
        if not balanced:
            return
        background_norm, new_norm = self.mask_norms[0], self.mask_norms[-1]
        shift = math.log(new_norm.bias.numel() + 1)
        new_norm.weight.copy_(background_norm.weight[:1].expand_as(new_norm.weight))
        new_norm.bias.copy_((background_norm.bias[:1] - shift).expand_as(new_norm.bias))
        background_norm.bias[:1] -= shift

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """backbone: the ViT encoder; head: the decoder, projections, class embeddings and mask norms."""
        backbone = list(self.encoder.parameters())
        backbone_ids = {id(p) for p in backbone}
        return {"backbone": backbone, "head": [p for p in self.parameters() if id(p) not in backbone_ids]}
