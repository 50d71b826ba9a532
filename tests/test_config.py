import pytest

from trainer.methods import resolve_switches
from utils.config import CHOICES, ConfigError, config_from_dict, config_to_dict, load_config
from utils.presets import SWITCHES
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
    assert voc.method.pseudo_threshold == 0.7 and voc.method.name == ade.method.name == "mbs"
    # the configs leave lambda and POD's factors to the preset, which resolves them per dataset
    assert voc.method.output_distill_weight is None and ade.method.output_distill_weight is None

    def resolved(cfg, method):
        cfg.method.name = method
        return resolve_switches(cfg.method, cfg.data.dataset)

    for method, voc_lambda, ade_lambda in [("mbs", 25.0, 50.0), ("baseline", 25.0, 50.0), ("mib", 10.0, 10.0)]:
        assert (resolved(voc, method).output_distill_weight, resolved(ade, method).output_distill_weight) == (
            voc_lambda, ade_lambda), method
    voc_plop, ade_plop = resolved(voc, "plop"), resolved(ade, "plop")
    assert (voc_plop.pod_factor, voc_plop.pod_logits_factor) == (0.01, 0.0005)
    assert (ade_plop.pod_factor, ade_plop.pod_logits_factor) == (0.001, 0.00001)
    assert voc_plop.entropy_threshold == ade_plop.entropy_threshold == 0.001
    assert voc_plop.feature_distill_weight == 1.0 and not voc_plop.output_distill
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
    ("method.name=lwf", "'method.name'"),
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


def switches_of(*overrides):
    cfg = load_config(None, list(overrides))
    return resolve_switches(cfg.method, cfg.data.dataset)


def switches_on(switches) -> set:
    return {name for name in SWITCHES if getattr(switches, name)}


def test_method_presets_and_switches():
    mbs = switches_of()
    assert all([mbs.weight_transfer, mbs.selective_pl, mbs.afd, mbs.lgkd, mbs.ortho])
    base = switches_of("method.name=baseline")
    assert base.pseudo_labels and not base.selective_pl and base.feature_distill and not base.afd
    assert base.output_distill and not base.lgkd and not base.ortho
    fine = switches_of("method.name=finetune")
    assert not fine.uses_old_model and not fine.ortho
    ablation = switches_of("method.name=mbs", "method.ortho=false")
    assert not ablation.ortho and ablation.afd
    # issue 18 section 1.1: MiB and PLOP turn on exactly these; PLOP has no output distillation
    assert switches_on(switches_of("method.name=mib")) == {
        "weight_transfer", "balanced_init", "unbiased_ce", "ce_all_pixels", "output_distill", "unkd"}
    assert switches_on(switches_of("method.name=plop")) == {
        "weight_transfer", "balanced_init", "ce_all_pixels", "pseudo_labels", "entropy_pl", "adaptive_ce_factor",
        "feature_distill", "pod"}
    # the seven new switches are off in the MBS family: their losses stay what they were
    new = {"balanced_init", "unbiased_ce", "ce_all_pixels", "entropy_pl", "adaptive_ce_factor", "pod", "unkd"}
    for name in ("mbs", "baseline", "finetune"):
        assert not switches_on(switches_of(f"method.name={name}")) & new, name
    assert "mib" in CHOICES["method.name"] and "plop" in CHOICES["method.name"]


@pytest.mark.parametrize("overrides,key,value", [
    (["method.name=mib", "method.output_distill_weight=25"], "output_distill_weight", 25.0),
    (["method.name=mbs", "data.dataset=ade", "method.output_distill_weight=10"], "output_distill_weight", 10.0),
    (["method.name=plop", "method.pod_factor=0.5"], "pod_factor", 0.5),
    (["method.name=plop", "data.dataset=ade", "method.pod_logits_factor=0"], "pod_logits_factor", 0.0),
    (["method.name=plop", "method.entropy_threshold=0.3"], "entropy_threshold", 0.3),
    (["method.name=mib", "method.ce_all_pixels=false"], "ce_all_pixels", False),
])
def test_an_explicit_weight_or_switch_wins_over_the_preset(overrides, key, value):
    assert getattr(switches_of(*overrides), key) == value


@pytest.mark.parametrize("overrides,first,second,fix", [
    (["method.name=mbs", "method.pod=true"], "method.afd", "method.pod", "set method.afd=false"),
    (["method.name=plop", "method.selective_pl=true"], "method.selective_pl", "method.entropy_pl",
     "set method.entropy_pl=false"),
    (["method.name=mib", "method.lgkd=true"], "method.lgkd", "method.unkd", "set method.unkd=false"),
    (["method.name=baseline", "method.lgkd=true", "method.unkd=true"], "method.lgkd", "method.unkd",
     "set method.lgkd=false or method.unkd=false"),
    (["method.name=plop", "method.weight_transfer=false"], "method.balanced_init", "method.weight_transfer",
     "set method.balanced_init=false"),
    (["method.name=finetune", "method.balanced_init=true"], "method.balanced_init", "method.weight_transfer",
     "set method.weight_transfer=true or method.balanced_init=false"),
    (["method.name=plop", "method.entropy_pl=false"], "method.adaptive_ce_factor", "method.entropy_pl",
     "set method.adaptive_ce_factor=false"),
])
def test_contradictory_switches_are_refused_naming_both_keys(overrides, first, second, fix):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert "\n" not in message and first in message and second in message and message.endswith(fix)


def test_the_explicit_resolution_of_a_preset_is_no_contradiction():
    # the preset's own values written out are accepted, and resolve as null does
    written = switches_of("method.name=plop", "method.entropy_pl=true", "method.pod=true", "method.afd=false",
                          "method.pod_factor=0.01")
    assert written == switches_of("method.name=plop")


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
