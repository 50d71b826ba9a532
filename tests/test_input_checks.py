"""What is loaded is what the file says, or one line says why not: config files (a key written twice, floats
written 5e-1, the elements of lists and dicts, values that name files), text files (UTF-8, a BOM), class-list
files (ids in range, not 1-based, each image once), split lists (each image once) and samples (the preflight
reads them as training does).

Runs that go through ``main.main`` stop at the config or the data preflight: no model is trained here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from datasets.class_lists import ClassListError, check_split, load_class_lists, read_class_lists
from datasets.layout import DatasetLayoutError, split_files
from datasets.tasks import NUM_CLASSES, TaskError, get_task
from tests.conftest import ROOT
from tests.test_bad_input import options
from tests.helpers import CLEAN_TRAIN, CLEAN_VAL, assert_clean_user_error, main_argv, run_in_process
from utils.config import ConfigError, load_config

VOC_CLASSES = NUM_CLASSES["voc"]


# ------------------------------------------------------------------ helpers
def voc_folder(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def one_line_from_main(argv: list[str], capsys) -> str:
    return assert_clean_user_error(run_in_process(argv, capsys))


# ------------------------------------------------------------------ 1. a key written twice; 5e-1
TWO_TRAIN_SECTIONS = """\
train:
  lr_incremental: 0.02
  epochs: 3
model:
  backbone: resnet18
train:
  batch_size: 4
"""


def test_a_section_written_twice_is_refused_naming_file_key_and_lines(tmp_path, capsys):
    config = write_yaml(tmp_path / "twice.yaml", TWO_TRAIN_SECTIONS)
    message = config_error([], config)
    assert str(config) in message and "'train'" in message and "lines 1 and 6" in message
    line = one_line_from_main(["--config", str(config)], capsys)  # one line from main, exit code 2
    assert line.startswith("config error:") and "'train'" in line and "lines 1 and 6" in line


@pytest.mark.parametrize("text,key,lines", [
    ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "'lr'", "lines 2 and 4"),                  # inside a section
    ("model:\n  backbone_overrides: {depth: 2, depth: 4}\n", "'depth'", "lines 2 and 2"),     # in a flow mapping
    ("data:\n  synthetic:\n    seed: 1\n    seed: 2\n", "'seed'", "lines 3 and 4"),            # two levels down
])
def test_a_key_written_twice_at_any_depth_is_refused(tmp_path, text, key, lines):
    message = config_error([], write_yaml(tmp_path / "twice.yaml", text))
    assert key in message and lines in message and "twice.yaml" in message


def test_a_key_written_twice_in_an_override_is_refused():
    message = config_error(["model.backbone_overrides={depth: 2, depth: 4}"])
    assert "'depth'" in message and "override" in message


def test_yaml_merge_keys_are_not_duplicates():
    from utils.config import UniqueKeyLoader
    text = "base: &base {a: 1, b: 2}\nderived:\n  <<: *base\n  b: 3\n"
    assert yaml.load(text, Loader=UniqueKeyLoader) == {"base": {"a": 1, "b": 2}, "derived": {"a": 1, "b": 3}}


def test_float_keys_take_exponent_notation(tmp_path):
    config = write_yaml(tmp_path / "floats.yaml", "train:\n  lr: 5e-1\n  weight_decay: 1e-4\n"
                                                  "data:\n  scale_range: [5e-1, 2E0]\n")
    cfg = load_config(config, ["train.lr_incremental=2.5e-3", "method.pseudo_threshold=7e-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.lr_incremental) == (0.5, 1e-4, 2.5e-3)
    assert cfg.method.pseudo_threshold == 0.7 and cfg.data.scale_range == [0.5, 2.0]
    assert all(isinstance(v, float) for v in (cfg.train.lr, cfg.train.weight_decay, *cfg.data.scale_range))


@pytest.mark.parametrize("override", ["train.lr=fast", "train.lr=5e-1x", "train.lr=e5", "train.lr=nan",
                                      "train.lr=inf", "train.lr=0x1p-1"])
def test_float_keys_still_refuse_other_strings(override):
    assert "'train.lr': expected float" in config_error([override])


def test_int_keys_do_not_take_exponent_notation():
    assert "'train.epochs': expected int" in config_error(["train.epochs=1e3"])


# ------------------------------------------------------------------ 2. elements of lists and dicts; file names
@pytest.mark.parametrize("value,message", [
    ("[a, 2]", "'data.scale_range[0]': expected float, got 'a'"),
    ("[0.5, [2]]", "'data.scale_range[1]': expected float"),
    ("[0.5, 1, 2]", "must be [low, high]"),
    ("[true, 2]", "'data.scale_range[0]': expected float, got True"),
])
def test_scale_range_needs_two_numbers(value, message):
    assert message in config_error([f"data.scale_range={value}"])


@pytest.mark.parametrize("value,message", [
    ("[[0, 1], [2, x]]", "'data.custom_steps[1][1]': expected int, got 'x'"),
    ("[[0, 1], 2]", "'data.custom_steps[1]': expected list"),
    ("[[0, 1], [2.5]]", "'data.custom_steps[1][0]': expected int"),
    ("[[0, 1], []]", "every step needs at least one class"),
    ("[[0, 1], [1]]", "class ids [1] are listed twice"),
    ("[[0, 1, 1]]", "class ids [1] are listed twice"),
    ("[[0, 1], [21]]", "class ids [21] are outside 0..20"),
    ("[[1, 2], [3]]", "step 0 must contain background"),
    ("[]", "expected a list of steps"),
])
def test_custom_steps_are_checked_when_the_config_is_loaded(value, message):
    assert message in config_error([f"data.custom_steps={value}"])


def test_custom_steps_are_checked_against_the_dataset():
    assert "outside 0..150" in config_error(["data.dataset=ade", "data.custom_steps=[[0, 1], [151]]"])
    cfg = load_config(None, ["data.dataset=ade", "data.custom_steps=[[0, 1], [150]]"])
    assert get_task("ade", "custom", cfg.data.custom_steps).order == [0, 1, 150]


@pytest.mark.parametrize("steps", [[[0, 1], [1]], [[0, 1], [21]], [[0, 1], []], [[2, 0]]])
def test_the_config_and_the_task_say_the_same(steps):
    """One check of a custom order: what the config refuses, get_task refuses with the same words."""
    with pytest.raises(TaskError) as caught:
        get_task("voc", "custom", steps)
    problem = str(caught.value).split(": ", 1)[1]
    assert problem in config_error([f"data.custom_steps={json.dumps(steps)}"])


SEGMENTER = ["model.architecture=segmenter", "model.backbone=vit_tiny_patch16_224"]


def test_backbone_overrides_are_refused_for_deeplab(capsys, tmp_path):
    assert "'model.backbone_overrides': deeplabv3 takes no backbone overrides" in config_error(
        ["model.backbone_overrides={depth: 2}"])
    line = one_line_from_main(main_argv(options(tmp_path / "data", tmp_path / "runs")
                                        + ["model.backbone_overrides={depth: 2}"]), capsys)
    assert "model.backbone_overrides" in line


@pytest.mark.parametrize("overrides,message", [
    ("{depht: 2}", "'depht' is not an argument of timm's VisionTransformer (did you mean 'depth'?)"),
    ("{img_size: 64}", "'img_size' is set by data.crop_size"),
    ("{norm_layer: x}", "'norm_layer' is set by model.layer_norm_eps"),
    ("{1: 2}", "every name in it must be a str"),
])
def test_segmenter_backbone_overrides_must_be_vit_arguments(overrides, message):
    assert message in config_error(SEGMENTER + [f"model.backbone_overrides={overrides}"])


def test_segmenter_backbone_overrides_that_timm_takes_load():
    cfg = load_config(None, SEGMENTER + ["model.backbone_overrides={embed_dim: 64, depth: 2, num_heads: 2, "
                                         "patch_size: 8, mlp_ratio: 2.0}"])
    assert cfg.model.backbone_overrides["depth"] == 2


def test_the_config_knows_the_encoder_arguments_the_segmenter_sets():
    from models.segmenter import vit_encoder_kwargs
    from utils.config import SEGMENTER_ENCODER_KWARGS, vit_keywords
    set_by_segmenter = set(vit_encoder_kwargs(32))
    assert set(SEGMENTER_ENCODER_KWARGS) == set_by_segmenter
    assert not vit_keywords() & set_by_segmenter and {"depth", "embed_dim", "num_heads"} <= vit_keywords()


@pytest.mark.parametrize("name", ["figure.txt", "figure", "fig/qualitative.png.bak"])
def test_qualitative_figure_needs_an_extension_matplotlib_writes(name):
    message = config_error([f"train.qualitative_figure={name}"])
    assert "'train.qualitative_figure'" in message and ".png" in message and ".pdf" in message


def test_qualitative_figure_under_a_file_is_refused(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    message = config_error([f"train.qualitative_figure={a_file / 'figure.png'}"])
    assert "'train.qualitative_figure'" in message and f"is under {a_file}, which is a file" in message


@pytest.mark.parametrize("name", ["fig/demo.png", "fig/demo.PDF", "demo.svg", "demo.jpg"])
def test_qualitative_figure_formats_matplotlib_writes_load(name):
    assert load_config(None, [f"train.qualitative_figure={name}"]).train.qualitative_figure == name


def test_cache_dir_must_not_be_a_file(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert f"'data.cache_dir': {str(a_file)!r} is an existing file" in config_error([f"data.cache_dir={a_file}"])
    under = a_file / "cache"
    assert f"is under {a_file}, which is a file" in config_error([f"data.cache_dir={under}"])
    assert load_config(None, [f"data.cache_dir={tmp_path / 'new' / 'cache'}"]).data.cache_dir
    line = one_line_from_main(main_argv(options(tmp_path / "data", tmp_path / "runs")
                                        + [f"data.cache_dir={a_file}"]), capsys)
    assert line.startswith("config error:") and "data.cache_dir" in line
    assert not (tmp_path / "runs").exists()  # refused when loaded, before the run folder


# ------------------------------------------------------------------ 3. text files: UTF-8, a BOM
BOM = "\ufeff".encode()


def test_read_text_drops_a_bom_and_names_an_undecodable_file(tmp_path):
    from utils.files import TextFileError, read_text
    with_bom = tmp_path / "with_bom.txt"
    with_bom.write_bytes(BOM + "é line\n".encode())
    assert read_text(with_bom, "list") == "é line\n"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("é line\n".encode("latin-1"))
    with pytest.raises(TextFileError, match=f"split list {latin1} is not text \\(UTF-8 expected; invalid "
                                            "continuation byte at byte 0\\)"):
        read_text(latin1, "split list")
    with pytest.raises(ConfigError, match="config file .*missing.txt cannot be read"):
        read_text(tmp_path / "missing.txt", "config file", ConfigError)


def test_a_config_file_with_a_bom_loads_as_without(tmp_path):
    text = (ROOT / "configs" / "demo.yaml").read_text()
    with_bom = tmp_path / "demo.yaml"
    with_bom.write_bytes(BOM + text.encode())
    assert load_config(with_bom) == load_config(ROOT / "configs" / "demo.yaml")


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# réglages\ntrain:\n  lr: 0.1\n".encode("latin-1"))
    assert f"config file {latin1} is not text" in config_error([], latin1)
    line = one_line_from_main(["--config", str(latin1)], capsys)
    assert str(latin1) in line


def test_a_split_list_with_a_bom_lists_the_same_samples(data_copy):
    before = split_files("voc", data_copy, "val")
    val_list = voc_folder(data_copy) / "list" / "val.txt"
    val_list.write_bytes(BOM + val_list.read_bytes())
    after = split_files("voc", data_copy, "val")
    assert after == before and all(path.is_file() for path in after.images)


def test_a_split_list_that_is_not_utf8_is_named(data_copy, tmp_path, capsys):
    val_list = voc_folder(data_copy) / "list" / "val.txt"
    val_list.write_bytes(val_list.read_bytes() + "café\n".encode("latin-1"))
    with pytest.raises(DatasetLayoutError, match=f"split list {val_list} is not text"):
        split_files("voc", data_copy, "val")
    line = one_line_from_main(main_argv(options(data_copy, tmp_path / "runs")), capsys)
    assert f"split list {val_list} is not text" in line


def test_a_class_list_file_with_a_bom_reads_as_without(tmp_path):
    plain, with_bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text("a 0 3\nb 19\n")
    with_bom.write_bytes(BOM + plain.read_bytes())
    assert read_class_lists(with_bom, VOC_CLASSES) == read_class_lists(plain, VOC_CLASSES) == {
        "a": {1, 4}, "b": {20}}


# ------------------------------------------------------------------ 4. class-list files: ids in range, 0-based
def user_class_lists(root: Path, shift: int, tmp_path: Path) -> Path:
    """A class-list file for the training split of ``root``, classes written ``shift`` above 0-based (1: the
    dataset's own ids, the usual mistake), the last foreground class on the second line."""
    files, lists = load_class_lists("voc", root, "train", progress=False)
    lines = [" ".join([image_id] + [str(c - 1 + shift) for c in sorted(lists[image_id])]) for image_id in files.ids]
    lines[1] = f"{files.ids[1]} {VOC_CLASSES - 2 + shift}"
    path = tmp_path / "train_cls.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_one_based_class_list_file_is_refused(data_copy, tmp_path, capsys):
    one_based = user_class_lists(data_copy, 1, tmp_path)
    with pytest.raises(ClassListError) as caught:
        load_class_lists("voc", data_copy, "train", class_lists_file=str(one_based), progress=False)
    message = str(caught.value)
    assert message.startswith(f"{one_based}:2: class id 20 is out of range") and "looks 1-based" in message
    line = one_line_from_main(main_argv(options(data_copy, tmp_path / "runs") + [f"data.class_lists={one_based}"]),
                              capsys)
    assert f"{one_based}:2:" in line and "looks 1-based" in line


def test_a_zero_based_class_list_file_is_read(data_copy, tmp_path):
    zero_based = user_class_lists(data_copy, 0, tmp_path)
    _, lists = load_class_lists("voc", data_copy, "train", class_lists_file=str(zero_based), progress=False)
    assert max(max(classes, default=0) for classes in lists.values()) == VOC_CLASSES - 1


@pytest.mark.parametrize("text,message", [
    ("a 0 3\nb 20\n", "x.txt:2: class id 20 is outside 0..19"),          # class 0 listed: not 1-based, out of range
    ("a 1 3\nb 25\n", "x.txt:2: class id 25 is outside 0..19"),          # beyond even a 1-based file
    ("a 1 -1\nb 20\n", "x.txt:1: class id -1 is outside 0..19"),
    ("a 1 3\nb 4\nc 2 20\n", "x.txt:3: class id 20 is out of range and no line lists class 0: the file looks 1-based"),
])
def test_class_ids_out_of_range_are_refused_with_their_line(tmp_path, text, message):
    path = tmp_path / "x.txt"
    path.write_text(text)
    with pytest.raises(ClassListError, match=message.replace(".", "\\.")):
        read_class_lists(path, VOC_CLASSES)


def test_a_zero_based_file_without_class_zero_is_read(tmp_path):
    """Ids 1..19 without 0 are a valid 0-based file (a subset); only a 20 makes a file recognisably 1-based."""
    path = tmp_path / "x.txt"
    path.write_text("a 1 3\nb 19\n")
    assert read_class_lists(path, VOC_CLASSES) == {"a": {2, 4}, "b": {20}}


def test_the_ade_class_list_range_is_0_to_149(tmp_path):
    path = tmp_path / "ade.txt"
    path.write_text("a 1 150\nb 7\n")
    with pytest.raises(ClassListError, match="ade.txt:1: class id 150 is out of range .* looks 1-based"):
        read_class_lists(path, NUM_CLASSES["ade"])
    path.write_text("a 0 149\n")
    assert read_class_lists(path, NUM_CLASSES["ade"]) == {"a": {1, 150}}


def test_the_splits_tool_refuses_a_one_based_file_in_one_line(tmp_path):
    path = tmp_path / "train_cls.txt"
    path.write_text("a 1 15\nb 20\n")
    result = subprocess.run([sys.executable, "-m", "datasets.splits", "--dataset", "voc", "--task", "15-1",
                             "--class-lists", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
    assert f"{path}:2: class id 20" in errors[0] and "looks 1-based" in errors[0]


def test_the_standard_class_lists_pass(shared_data):
    for dataset in ("voc", "ade"):
        for split in ("train", "val"):
            assert read_class_lists(shared_data / dataset / f"{split}_cls.txt", NUM_CLASSES[dataset])


# ------------------------------------------------------------------ 5. each image once
def test_a_validation_image_listed_twice_is_refused(data_copy, tmp_path, capsys):
    val_list = voc_folder(data_copy) / "list" / "val.txt"
    lines = val_list.read_text().splitlines()
    twice = Path(lines[1].split()[0]).stem
    val_list.write_text("\n".join(lines + [lines[1]]) + "\n")
    expected = f"{val_list}:{len(lines) + 1}: image {twice!r} is listed twice (lines 2 and {len(lines) + 1})"
    with pytest.raises(DatasetLayoutError) as caught:
        split_files("voc", data_copy, "val")
    assert str(caught.value).startswith(expected)
    line = one_line_from_main(main_argv(options(data_copy, tmp_path / "runs")), capsys)
    assert expected in line


def test_an_id_listed_twice_in_either_line_format_is_refused(tmp_path, data_copy):
    """``<id>`` and ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` name the same sample."""
    train_list = voc_folder(data_copy) / "list" / "train_aug.txt"
    first = train_list.read_text().splitlines()[0]
    image_id = Path(first.split()[0]).stem
    train_list.write_text(train_list.read_text() + f"{image_id}\n")
    with pytest.raises(DatasetLayoutError, match=f"image '{image_id}' is listed twice \\(lines 1 and"):
        split_files("voc", data_copy, "train")


def test_an_image_listed_twice_in_a_class_list_file_is_refused(tmp_path):
    path = tmp_path / "val_cls.txt"
    path.write_text("a 0\nb 3\n\nc 1\na 0 4\n")
    with pytest.raises(ClassListError, match=f"{path}:5: image 'a' is listed twice \\(lines 1 and 5\\)"):
        read_class_lists(path, VOC_CLASSES)


# ------------------------------------------------------------------ 6. the preflight reads as training reads
def bmp_named_jpg(image: Path) -> str:
    Image.open(image).convert("RGB").save(image, format="BMP")
    return "image does not decode (Unsupported image file"


def png_16_bit_named_jpg(image: Path) -> str:
    gray = np.asarray(Image.open(image).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(image, format="PNG")  # mode I;16: Pillow opens it, as a 16-bit image
    assert Image.open(image).mode == "I;16"
    return "image has 16 bits per channel (uint16), expected 8"


def png_8_bit_named_jpg(image: Path) -> None:  # decodes to 8-bit RGB: good for both
    Image.open(image).convert("RGB").save(image, format="PNG")


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("breaks", [bmp_named_jpg, png_16_bit_named_jpg], ids=lambda f: f.__name__)
def test_the_preflight_reports_an_image_training_cannot_read(data_copy, tmp_path, capsys, breaks, split):
    files = split_files("voc", data_copy, split)
    problem = breaks(files.images[2])
    check = check_split("voc", str(data_copy), split, progress=False)
    assert list(check.bad) == [files.ids[2]] and check.bad[files.ids[2]].startswith(f"{files.images[2]}: {problem}")
    line = one_line_from_main(main_argv(options(data_copy, tmp_path / "runs")), capsys)
    assert f"BadFilesError: data preflight: 1 of the {CLEAN_TRAIN + CLEAN_VAL} samples" in line and f"{files.images[2]}: {problem}" in line


@pytest.mark.parametrize("breaks", [bmp_named_jpg, png_16_bit_named_jpg, png_8_bit_named_jpg],
                         ids=lambda f: f.__name__)
def test_the_preflight_and_the_loader_agree(data_copy, breaks):
    """A sample the preflight passes, the loader reads; one it refuses, the loader refuses with the same
    problem (one reader for both)."""
    from datasets.incremental import DatasetError, IncrementalSegmentation
    from datasets.labels import label_lookup
    files = split_files("voc", data_copy, "val")
    breaks(files.images[1])
    check = check_split("voc", str(data_copy), "val", progress=False)
    everything = IncrementalSegmentation(files, list(files.ids), label_lookup(get_task("voc", "15-1"), 0, "val"))
    for i, image_id in enumerate(files.ids):
        if image_id in check.bad:
            with pytest.raises(DatasetError) as caught:
                everything.load(i)
            assert check.bad[image_id] in str(caught.value)
        else:
            image, label = everything.load(i)
            assert image.dtype == label.dtype and tuple(image.shape[1:]) == tuple(label.shape)
    assert (files.ids[1] in check.bad) == (breaks is not png_8_bit_named_jpg)
