import pytest

from trainer.methods import resolve_switches
from utils.config import ConfigError, config_from_dict, config_to_dict, load_config
from tests.conftest import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_reference_hyperparameters():
    voc, ade = load_config(ROOT / "configs/voc.yaml"), load_config(ROOT / "configs/ade20k.yaml")
    assert (voc.train.epochs, ade.train.epochs) == (30, 60)
    assert voc.train.batch_size == ade.train.batch_size == 24
    assert (voc.train.lr, voc.train.lr_incremental, voc.train.lr_schedule) == (0.01, 0.001, "poly")
    assert voc.train.weight_decay == 1e-4 and voc.train.nesterov and voc.train.momentum == 0.9
    assert (voc.method.output_distill_weight, ade.method.output_distill_weight) == (25.0, 50.0)
    assert voc.method.pseudo_threshold == 0.7 and voc.method.name == ade.method.name == "mbs"
    assert voc.model.backbone == "resnet101" and voc.model.output_stride == 16


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=0.5", "data.task=100-50", "method.afd=false", "data.scale_range=[1, 2]"])
    assert cfg.train.lr == 0.5 and cfg.data.task == "100-50" and cfg.method.afd is False
    assert cfg.data.scale_range == [1, 2]


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr' \\(did you mean 'train.lr'\\?\\)"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("train.lr=fast", "'train.lr': expected float"),
    ("train.epochs=1.5", "'train.epochs': expected int"),
    ("data.setting=mixed", "'data.setting': 'mixed' is not one of"),
    ("method.name=mib", "'method.name'"),
    ("data.scale_range=[2, 1]", "scale_range"),
    ("novalue", "key.subkey=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.epoch'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_method_presets_and_switches():
    mbs = resolve_switches(load_config(None, []).method)
    assert all([mbs.weight_transfer, mbs.selective_pl, mbs.afd, mbs.lgkd, mbs.ortho])
    base = resolve_switches(load_config(None, ["method.name=baseline"]).method)
    assert base.pseudo_labels and not base.selective_pl and base.feature_distill and not base.afd
    assert base.output_distill and not base.lgkd and not base.ortho
    fine = resolve_switches(load_config(None, ["method.name=finetune"]).method)
    assert not fine.uses_old_model and not fine.ortho
    ablation = resolve_switches(load_config(None, ["method.name=mbs", "method.ortho=false"]).method)
    assert not ablation.ortho and ablation.afd


@pytest.mark.parametrize("overrides,message", [
    (["model.architecture=segmenter"], "not a timm ViT"),                       # demo.yaml's resnet18
    (["model.backbone=vit_base_patch16_384"], "not a DeepLab-V3 backbone"),
])
def test_backbone_must_fit_the_architecture(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/demo.yaml", overrides)


def test_config_knows_every_resnet_the_model_builds():
    from models.backbones import RESNETS
    from utils.config import RESNET_BACKBONES
    assert set(RESNET_BACKBONES) == set(RESNETS)
