"""model.pretrained: imagenet without network and without a cached copy: one line naming the file expected in the
download cache (torchvision: $TORCH_HOME/hub/checkpoints/<file>; timm: the Hugging Face cache entry) and saying
that a local path works too; main.py exits 2 with that line.

No test may download anything: torch.hub's download function is replaced by one raising URLError (what urllib
raises without network), and the Hugging Face client is put in offline mode (HF_HUB_OFFLINE; it then refuses every
request) with an empty cache folder."""
import json
from urllib.error import URLError

import huggingface_hub.constants
import pytest
import torch

from models.backbones import PretrainedWeightsError, ResNetBackbone
from models.segmenter import Segmenter
from tests.helpers import assert_clean_user_error, main_argv, run_in_process

TINY_VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}
HF_REPOSITORY = "models--timm--vit_base_patch16_384.augreg_in21k_ft_in1k"  # timm's default weights of the ViT


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache; any download attempt fails as it does without network."""
    def no_network(url, *args, **kwargs):
        raise URLError(f"no network in this test ({url})")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (the client reads these module constants at call time)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf_cache"


def test_torchvision_weights_offline_name_the_cache_file(torch_home):
    with pytest.raises(PretrainedWeightsError) as caught:
        ResNetBackbone("resnet18", pretrained="imagenet")
    message = str(caught.value)
    assert str(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "local copy" in message and "\n" not in message


def test_timm_weights_offline_name_the_hugging_face_cache_entry(hf_cache):
    with pytest.raises(PretrainedWeightsError) as caught:
        Segmenter([2, 1], pretrained="imagenet", image_size=32, decoder_heads=2, decoder_dim=16,
                  backbone_overrides=TINY_VIT)
    message = str(caught.value)
    assert str(hf_cache / HF_REPOSITORY / "snapshots" / "*" / "model.safetensors") in message
    assert "vit_base_patch16_384" in message and "local copy" in message and "\n" not in message


@pytest.mark.parametrize("architecture", ["deeplabv3", "segmenter"])
def test_main_without_weights_exits_with_one_line(architecture, torch_home, hf_cache, tmp_path, capsys):
    model = {
        "deeplabv3": ["model.architecture=deeplabv3", "model.backbone=resnet18", "model.head_channels=16"],
        "segmenter": ["model.architecture=segmenter", "model.backbone=vit_base_patch16_384", "model.decoder_dim=16",
                      "model.decoder_heads=2", "model.decoder_layers=1",
                      f"model.backbone_overrides={json.dumps(TINY_VIT)}"],
    }[architecture]
    options = [f"name=offline_{architecture}", f"output_dir={tmp_path / 'runs'}", "device=cpu",
               f"data.root={tmp_path / 'synthetic'}", "data.synthetic.enabled=true", "data.synthetic.num_train=8",
               "data.synthetic.num_val=4", "data.synthetic.image_size=32", "data.base_size=32", "data.crop_size=32",
               "data.num_workers=0", "model.pretrained=imagenet", *model]
    line = assert_clean_user_error(run_in_process(main_argv(options), capsys))
    expected = {"deeplabv3": torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth",
                "segmenter": hf_cache / HF_REPOSITORY / "snapshots" / "*" / "model.safetensors"}[architecture]
    assert "PretrainedWeightsError" in line and str(expected) in line and "local copy" in line
