"""The config schema: every key declares its allowed values, role and step-0 membership in its own field, and the
tables the rest of the code reads are derived from those fields. Also: two keys that were reported as unread
(train.head_lr_multiplier, train.image_log_interval) change what the code does."""
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from utils import config as schema
from utils.config import (AT_LEAST_0, AT_LEAST_1, EXPERIMENT, FRACTION, HARMLESS, POSITIVE, PROBABILITY, STEP0,
                          Config, Range, config_key, key_tables)
from tests.conftest import ROOT

# ---- Literal copies of the tables as they were written by hand before they were derived (utils/config.py,
# utils/run_folder.py, trainer/step0_reuse.py). A key that changes role, range or step-0 membership must be a
# decision made here too, not a side effect of editing a field.
TODAYS_CHOICES = {
    "data.dataset": {"voc", "ade"},
    "data.setting": {"overlapped", "disjoint"},
    "data.eval_mode": {"center_crop", "full"},
    "data.crop_padding": {"ignore", "reference"},
    "model.pos_embed_interpolation": {"reference", "timm"},
    "train.validation": {"none", "epochs", "reference"},
    "model.architecture": {"deeplabv3", "segmenter"},
    "method.name": {"mbs", "baseline", "finetune", "mib", "plop"},
    "train.lr_schedule": {"poly", "constant"},
    "train.amp": {"bf16", "fp16", "none"},
    "train.checkpoint_policy": {"last", "best"},
    "device": {"auto", "cpu", "cuda"},
    "model.output_stride": {8, 16},
}
TODAYS_RANGES = {
    "start_step": AT_LEAST_0, "end_step": AT_LEAST_0,
    "data.base_size": AT_LEAST_1, "data.crop_size": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0, "data.prefetch_factor": AT_LEAST_1,
    "data.synthetic.num_train": AT_LEAST_1, "data.synthetic.num_val": AT_LEAST_1,
    "data.synthetic.image_size": Range(16),
    "model.head_channels": AT_LEAST_1, "model.decoder_layers": AT_LEAST_1, "model.decoder_heads": AT_LEAST_1,
    "model.decoder_dim": AT_LEAST_1, "model.layer_norm_eps": POSITIVE,
    "model.encoder_dropout": PROBABILITY, "model.encoder_drop_path_rate": PROBABILITY,
    "model.decoder_dropout": PROBABILITY, "model.decoder_drop_path_rate": PROBABILITY,
    "method.pseudo_threshold": FRACTION,
    "method.output_distill_weight": AT_LEAST_0, "method.feature_distill_weight": AT_LEAST_0,
    "method.ortho_weight": AT_LEAST_0, "method.class_embedding_distill_weight": AT_LEAST_0,
    "method.pod_factor": AT_LEAST_0, "method.pod_logits_factor": AT_LEAST_0, "method.entropy_threshold": FRACTION,
    "train.epochs": AT_LEAST_1, "train.epochs_incremental": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1, "train.val_batch_size": AT_LEAST_1,
    "train.lr": POSITIVE, "train.lr_incremental": POSITIVE, "train.poly_power": AT_LEAST_0,
    "train.head_lr_multiplier": POSITIVE, "train.momentum": PROBABILITY, "train.weight_decay": AT_LEAST_0,
    "train.max_iters_per_step": AT_LEAST_1, "train.val_interval": AT_LEAST_1,
    "train.checkpoint_interval": AT_LEAST_0, "train.log_interval": AT_LEAST_1,
    "train.image_log_interval": AT_LEAST_0, "train.qualitative_images": AT_LEAST_0,
}
TODAYS_EXPERIMENT_KEYS = frozenset({
    "seed",
    "data.dataset", "data.task", "data.custom_steps", "data.setting", "data.base_size", "data.crop_size",
    "data.scale_range", "data.eval_mode", "data.crop_padding", "data.skip_bad_files",
    "data.synthetic.enabled", "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.image_size",
    "data.synthetic.seed",
    "model.architecture", "model.backbone", "model.pretrained", "model.output_stride", "model.head_channels",
    "model.decoder_layers", "model.decoder_heads", "model.decoder_dim", "model.encoder_dropout",
    "model.encoder_drop_path_rate", "model.decoder_dropout", "model.decoder_drop_path_rate",
    "model.layer_norm_eps", "model.pos_embed_interpolation", "model.backbone_overrides",
    "method.name", "method.weight_transfer", "method.pseudo_labels", "method.selective_pl",
    "method.feature_distill", "method.afd", "method.output_distill", "method.lgkd", "method.ortho",
    "method.pseudo_threshold", "method.output_distill_weight", "method.feature_distill_weight",
    "method.ortho_weight", "method.class_embedding_distill_weight",
    # issue 18: MiB's and PLOP's switches and weights (experiment keys; none in the step-0 recipe, which takes the
    # resolved ce_all_pixels itself, trainer/step0_reuse.py)
    "method.balanced_init", "method.unbiased_ce", "method.ce_all_pixels", "method.entropy_pl",
    "method.adaptive_ce_factor", "method.pod", "method.unkd", "method.pod_factor", "method.pod_logits_factor",
    "method.entropy_threshold",
    "train.epochs", "train.epochs_incremental", "train.batch_size", "train.lr", "train.lr_incremental",
    "train.lr_schedule", "train.poly_power", "train.head_lr_multiplier", "train.momentum", "train.nesterov",
    "train.weight_decay", "train.amp", "train.max_iters_per_step", "train.validation", "train.val_interval",
    "train.checkpoint_policy",
})
TODAYS_HARMLESS_KEYS = frozenset({
    "name", "output_dir", "device", "start_step", "end_step",
    "data.root", "data.class_lists", "data.cache_dir", "data.num_workers", "data.prefetch_factor",
    "train.val_batch_size", "train.compile", "train.sync_bn", "train.checkpoint_interval", "train.log_interval",
    "train.image_log_interval", "train.qualitative_images", "train.qualitative_figure",
    "train.step0_checkpoint",
})
TODAYS_STEP0_KEYS = {
    "data": ("dataset", "setting", "base_size", "crop_size", "scale_range", "eval_mode", "crop_padding",
             "skip_bad_files"),
    "train": ("epochs", "batch_size", "lr", "lr_schedule", "poly_power", "head_lr_multiplier", "momentum",
              "nesterov", "weight_decay", "amp", "max_iters_per_step", "validation", "val_interval",
              "checkpoint_policy"),
}


def test_derived_tables_are_todays_tables():
    assert schema.CHOICES == TODAYS_CHOICES
    assert schema.RANGES == TODAYS_RANGES
    assert schema.EXPERIMENT_KEYS == TODAYS_EXPERIMENT_KEYS
    assert schema.HARMLESS_KEYS == TODAYS_HARMLESS_KEYS
    assert schema.STEP0_KEYS == TODAYS_STEP0_KEYS  # also the order (the fields' order, as the recipe lists it)


def test_step0_flags_cover_what_the_recipe_takes_whole():
    # step0_recipe adds the model section, the synthetic section and the seed whole: their fields say so too,
    # and nothing outside data/train/model/synthetic/seed claims to be in the recipe.
    whole = {key for key in TODAYS_EXPERIMENT_KEYS if key.startswith(("model.", "data.synthetic."))} | {"seed"}
    listed = {f"{section}.{name}" for section, names in TODAYS_STEP0_KEYS.items() for name in names}
    assert set(key_tables(Config).step0) == whole | listed


def test_list_and_dict_defaults_are_not_shared_between_configs():
    first, second = Config(), Config()
    first.data.scale_range.append(3.0)
    first.model.backbone_overrides["depth"] = 2
    assert second.data.scale_range == [0.5, 2.0] and second.model.backbone_overrides == {}


@dataclass
class _Section:
    fine: int = config_key(1, EXPERIMENT, STEP0, range=AT_LEAST_1)
    foo: int = 3  # no role: --resume would not know what to do with it


@dataclass
class _RoleWrong:
    foo: int = config_key(3, "sometimes")


@dataclass
class _Schema:
    name: str = config_key("run", HARMLESS)
    train: _Section = field(default_factory=_Section)


@dataclass
class _SchemaWithWrongRole:
    train: _RoleWrong = field(default_factory=_RoleWrong)


@pytest.mark.parametrize("schema_class", [_Schema, _SchemaWithWrongRole])
def test_a_key_without_a_role_is_a_schema_error_naming_it(schema_class):
    with pytest.raises(TypeError, match=r"config field 'train\.foo' declares no role \(experiment or harmless\)"):
        key_tables(schema_class)


def test_a_schema_with_roles_everywhere_derives_its_tables():
    @dataclass
    class Section:
        fine: int = config_key(1, EXPERIMENT, STEP0, range=AT_LEAST_1)
        mode: str = config_key("a", HARMLESS, choices={"a", "b"})

    @dataclass
    class Root:
        name: str = config_key("run", HARMLESS)
        train: Section = field(default_factory=Section)

    tables = key_tables(Root)
    assert (tables.experiment, tables.harmless) == ({"train.fine"}, {"name", "train.mode"})
    assert tables.ranges == {"train.fine": AT_LEAST_1} and tables.choices == {"train.mode": {"a", "b"}}
    assert tables.step0 == ("train.fine",)
    assert dataclasses.fields(Section)[0].default == 1  # still a plain default


def test_importing_the_config_is_fast_and_does_not_import_torch():
    # config errors must come back before torch loads (torch is imported lazily, in check_device only)
    code = "import sys, utils.config; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---- The two keys reported as having no reader: both change what training does.
def test_head_lr_multiplier_sets_the_head_group_lr():
    import torch

    from models import build_model
    from trainer.step import StepPlan, build_optimizer
    from utils.config import ModelConfig, TrainConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", pretrained="none", head_channels=8), [3])
    plan = StepPlan(epochs=1, iterations_per_epoch=4, total_iterations=4, lr=0.01)
    optimizer, _ = build_optimizer(model, plan, TrainConfig(head_lr_multiplier=10.0))
    backbone_group, head_group = optimizer.param_groups
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.parameter_groups()["head"]}
    assert backbone_group["lr"] == pytest.approx(0.01)
    assert head_group["lr"] == pytest.approx(0.01 * 10.0)


class _RecordingWriter:
    """Stands in for utils.logs.TensorboardWriter: remembers at which iterations images were logged."""

    def __init__(self):
        self.image_iterations = []

    def scalars(self, values, step, prefix=""):
        pass

    def segmentation_images(self, tag, image, label, prediction, step, palette):
        assert image.shape[0] == 3 and label.shape == prediction.shape == image.shape[1:]
        assert palette.shape == (256, 3)
        self.image_iterations.append(step)


@pytest.mark.parametrize("image_log_interval,expected", [(3, [3, 6]), (0, [1, 5])])  # 0: once per epoch
def test_image_log_interval_picks_the_iterations_with_images(image_log_interval, expected):
    import torch

    from datasets.classes import voc_palette
    from models.base import SegmentationOutput
    from trainer.engine import StepLogger
    from trainer.step import TrainState

    writer = _RecordingWriter()
    logger = StepLogger(writer, "step0", 10, image_log_interval, voc_palette())
    state = TrainState()
    run = SimpleNamespace(state=state, optimizer=SimpleNamespace(param_groups=[{"lr": 0.01}]))
    images, labels = torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long)
    output = SegmentationOutput(logits=torch.zeros(2, 4, 8, 8), logits_lowres=torch.zeros(2, 4, 2, 2),
                                features=torch.zeros(2, 4, 2, 2))
    for _ in range(8):  # two epochs of four iterations, counted as trainer.engine.train counts them
        first_of_epoch = state.batch_in_epoch == 0
        state.advance(iterations_per_epoch=4)
        logger.iteration(run, torch.tensor(1.0), {"ce": torch.tensor(1.0)}, images, labels, output, first_of_epoch)
    assert writer.image_iterations == expected
