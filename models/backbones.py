"""ResNet backbones from torchvision, dilated to output stride 16 or 8.

``pretrained`` is ``imagenet`` (torchvision's ImageNet weights, fetched through
torchvision's own download cache, ``$TORCH_HOME/hub/checkpoints``), ``none``
(random init), or a path to a local state dict in torchvision's ResNet format
(for clusters without internet; ``fc.*`` keys are ignored).

Stage maps. PLOP distils each stage's pre-activation output: the residual sum of
its last block before the final ReLU (BASELINES_SPEC 2.1). torchvision's blocks
add the shortcut and apply their ReLU in place, so that sum never exists as a
tensor a hook could read. The backbone therefore runs the last block of each
stage itself (``residual_sum``), out of place, and keeps the sum.
"""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils.errors import UserError

RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1, 2048),
}


class PretrainedWeightsError(UserError, ValueError):
    """A local weights file is missing or does not match the network, or ``imagenet`` weights are neither
    cached nor downloadable; names the file (and the keys)."""


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub's download cache keeps the file of ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


COPY_TO_TORCH_HUB = "Copy the file there from a machine with network"


def missing_download_message(weights: str, expected: Path, source: str, reason: str, fill_cache: str) -> str:
    """One line for pretrained weights that are not cached and could not be downloaded; ``fill_cache`` says how
    to fill the cache from a machine with network."""
    return (f"model.pretrained: imagenet needs {weights}, expected at {expected}: not there, and downloading "
            f"{source} failed ({reason}). {fill_cache}, or set model.pretrained to the path of a local copy of "
            "the file")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved with torch.save, unwrapping ``{'state_dict': ...}``/``{'model': ...}``
    and a DistributedDataParallel ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {str(path)!r} does not exist "
                                     "(model.pretrained takes 'imagenet', 'none' or a path to a state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise PretrainedWeightsError(f"could not read pretrained weights file {str(path)!r}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"pretrained weights file {str(path)!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                  ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` requiring every key and shape to match (except ignored prefixes)."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (first: {', '.join(keys[:5])})")
        raise PretrainedWeightsError(f"pretrained weights {source!r} do not match the network: " + "; ".join(parts))
    module.load_state_dict(state, strict=not ignore_prefixes)


def download_torchvision_weights(weights: models.WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's state dict for ``weights``, from torch.hub's cache or downloaded into it."""
    try:
        return weights.get_state_dict(progress=True)
    except URLError as err:  # no network (HTTPError, a subclass, for a refused download)
        raise PretrainedWeightsError(missing_download_message(
            f"torchvision's {weights} weights", torch_hub_checkpoint(weights.url), weights.url, str(err.reason),
            COPY_TO_TORCH_HUB)) from err


def _dilate_basic_blocks(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """torchvision's BasicBlock refuses dilation, so set it by hand with torchvision's rule for
    Bottleneck: the first block drops its stride and keeps the previous dilation, the rest dilate."""
    layer[0].conv1.stride = (1, 1)
    if layer[0].downsample is not None:
        layer[0].downsample[0].stride = (1, 1)
    for i, block in enumerate(layer):
        d = previous if i == 0 else dilation
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (d, d), (d, d)


def residual_sum(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock / Bottleneck forward up to the shortcut sum, without the final ReLU:
    ``relu(residual_sum(block, x))`` equals ``block(x)`` bit for bit (same ops in the same order; the sum is
    taken out of place so it survives the ReLU)."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, BasicBlock):
        out = block.bn2(block.conv2(out))
    else:
        raise TypeError(f"residual_sum knows torchvision's BasicBlock and Bottleneck, not {type(block).__name__}")
    identity = x if block.downsample is None else block.downsample(x)
    return out + identity


class ResNetBackbone(nn.Module):
    """ResNet trunk without pooling/fc; returns the last stage's features (B, out_channels, H/os, W/os).

    ``forward_with_stages`` also returns the 4 stages' pre-activation maps (see the module docstring), with
    ``stage_channels`` channels: (64, 128, 256, 512) for ResNet-18/34, (256, 512, 1024, 2048) for ResNet-50/101;
    at strides 4, 8, 16, 16 (output stride 16) or 4, 8, 8, 8 (output stride 8).
    """

    def __init__(self, name: str = "resnet101", pretrained: str = "imagenet", output_stride: int = 16):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r} for DeepLab; known: {', '.join(RESNETS)}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        builder, weights, self.out_channels = RESNETS[name]
        dilate = [False, output_stride == 8, True]
        bottleneck = name not in ("resnet18", "resnet34")
        net = builder(weights=None, replace_stride_with_dilation=dilate if bottleneck else None)
        if pretrained == "imagenet":
            net.load_state_dict(download_torchvision_weights(weights))
        elif pretrained != "none":
            load_matching(net, load_state_dict_file(pretrained), str(pretrained), ignore_prefixes=("fc.",))
        if not bottleneck:
            if output_stride == 8:
                _dilate_basic_blocks(net.layer3, 1, 2)
                _dilate_basic_blocks(net.layer4, 2, 4)
            else:
                _dilate_basic_blocks(net.layer4, 1, 2)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.stage_channels = tuple((layer[-1].bn3 if bottleneck else layer[-1].bn2).num_features
                                    for layer in self.stage_layers())

    def stage_layers(self) -> tuple[nn.Sequential, ...]:
        return self.layer1, self.layer2, self.layer3, self.layer4

    def forward_with_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, 3, H, W) -> the last stage's features and the 4 stages' pre-activation maps, shallow to deep."""
        pre_activations: list[torch.Tensor] = []
        return self._run(x, pre_activations), pre_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None)

    def _run(self, x: torch.Tensor, pre_activations: list[torch.Tensor] | None) -> torch.Tensor:
        """The trunk; the features equal those of ``nn.Sequential`` over torchvision's blocks bit for bit.
        Each stage's pre-activation map is appended to ``pre_activations`` when given (otherwise it is freed
        at once, as in torchvision, instead of living until the trunk ends)."""
        x = self.stem(x)
        for layer in self.stage_layers():
            *leading, last = layer
            for block in leading:
                x = block(x)
            pre = residual_sum(last, x)
            if pre_activations is not None:
                pre_activations.append(pre)
            x = torch.relu(pre)  # out of place: ``pre`` must survive
        return x
