"""Segmenter (ViT) through the whole pipeline: the shipped ViT configs, MBS applied to a Segmenter, and a 3-step
run of ``main.py`` on the synthetic data with a tiny ViT (the same end-to-end run as DeepLab's)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from models import build_model
from models.segmenter import Segmenter
from tests.conftest import ROOT
from tests.test_segmenter import added_pos_embed, assert_reference_recipe, resize_grid
from trainer.methods import build_method, resolve_switches
from utils.config import MethodConfig, load_config

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
STEPS = [list(range(15)), [15, 16], [17, 18]]  # 15 + 2 + 2 channels


# ------------------------------------------------------------------ configs
def test_vit_configs_have_the_reference_hyperparameters():
    """Spec section 4, Segmenter column (loading and round-tripping: tests/test_config.py, over configs/*.yaml)."""
    voc, ade = load_config(ROOT / "configs/voc_vit.yaml"), load_config(ROOT / "configs/ade20k_vit.yaml")
    assert (voc.data.dataset, ade.data.dataset) == ("voc", "ade")
    for cfg in (voc, ade):
        m, t = cfg.model, cfg.train
        assert (m.architecture, m.backbone, m.pretrained) == ("segmenter", "vit_base_patch16_384", "imagenet")
        assert (m.decoder_layers, m.decoder_heads, m.decoder_dim) == (2, 12, 768)
        assert cfg.data.crop_size == cfg.data.base_size == 512 and cfg.data.scale_range == [0.5, 2.0]
        assert (t.lr, t.lr_schedule, t.weight_decay, t.momentum, t.nesterov) == (1e-3, "constant", 1e-5, 0.9, True)
        assert t.amp == "fp16" and t.epochs_incremental is None  # the reference: fp16 autocast + GradScaler
        # "best" selects on validation, at the reference's cadence
        assert t.checkpoint_policy == "best" and t.validation == "reference"
        assert cfg.method.name == "mbs" and cfg.method.pseudo_threshold == 0.7
    # the reference's crop padding is set in the ViT configs themselves; the DeepLab configs keep MiB/PLOP's
    for config, padding in [("voc_vit", "reference"), ("ade20k_vit", "reference"), ("voc", "ignore"),
                            ("ade20k", "ignore")]:
        assert yaml.safe_load((ROOT / f"configs/{config}.yaml").read_text())["data"]["crop_padding"] == padding
    assert (voc.train.epochs, ade.train.epochs) == (32, 64)
    assert (voc.train.batch_size, ade.train.batch_size) == (16, 8)
    assert (voc.train.lr_incremental, ade.train.lr_incremental) == (1e-4, 5e-4)
    # lambda is the preset's, per dataset (the configs no longer pin it)
    assert (resolve_switches(voc.method, voc.data.dataset).output_distill_weight,
            resolve_switches(ade.method, ade.data.dataset).output_distill_weight) == (25.0, 50.0)


# issue 10 items 1-3: the authors' Segmenter training recipe
REFERENCE_RECIPE = {"encoder_dropout": 0.0, "encoder_drop_path_rate": 0.0, "decoder_dropout": 0.0,
                    "decoder_drop_path_rate": 0.1, "layer_norm_eps": 1e-5, "pos_embed_interpolation": "reference"}


@pytest.mark.parametrize("config", ["configs/voc_vit.yaml", "configs/ade20k_vit.yaml"])
def test_models_from_the_vit_configs_follow_the_reference_recipe(config):
    """Each key is set in the config file itself (not left to a default) and reaches the model built from it (a
    tiny random ViT in place of ViT-B: dropout, drop-path, LayerNorm eps, run-time position-embedding resampling;
    the pretrained-grid resize: tests/test_segmenter.py)."""
    model_section = yaml.safe_load((ROOT / config).read_text())["model"]
    assert {key: model_section.get(key) for key in REFERENCE_RECIPE} == REFERENCE_RECIPE
    cfg = load_config(ROOT / config, ["model.pretrained=none", f"model.backbone_overrides={json.dumps(TINY_VIT)}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, [3, 2], image_size=32)
    assert_reference_recipe(model)
    pos_embed = model.encoder.pos_embed.detach()
    expected = resize_grid(pos_embed, (4, 4), (5, 7), "bilinear", antialias=False)
    assert torch.allclose(added_pos_embed(model.encoder, 37, 50), expected, atol=1e-6)


@pytest.mark.slow
def test_main_sh_points_at_the_vit_configs():
    for suite, config in [("voc_vit", "configs/voc_vit.yaml"), ("ade_vit", "configs/ade20k_vit.yaml")]:
        out = subprocess.run(["bash", "main.sh", suite], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", "EXTRA": ""},
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        launches = [line for line in out.stdout.splitlines() if " main.py " in line]
        assert launches and all(f"--config {config} " in line for line in launches)
        assert (ROOT / config).is_file()


@pytest.mark.slow
def test_voc_vit_config_runs_end_to_end_with_the_reference_recipe(tmp_path):
    """configs/voc_vit.yaml as shipped (reference crop padding, constant lr, best weights chosen at the reference's
    cadence), only the data and the ViT's size overridden: step 0 has 104 iterations (52 images, batch 4, 8 epochs),
    so it validates at iteration 100 (max(100, 104 // 10)) and keeps the best weights; step 1 (fewer than 100
    iterations) never validates."""
    opts = [
        "name=vit_ref", f"output_dir={tmp_path / 'runs'}", "device=cpu",
        f"data.root={tmp_path / 'synthetic'}", "data.synthetic.enabled=true", "data.synthetic.num_train=60",
        "data.synthetic.num_val=20", "data.synthetic.image_size=32", "data.base_size=32", "data.crop_size=32",
        "data.num_workers=0", f"data.custom_steps={json.dumps(STEPS[:2])}", "data.task=15-2",
        "model.pretrained=none", f"model.backbone_overrides={json.dumps(TINY_VIT)}", "model.decoder_dim=16",
        "model.decoder_heads=2", "train.epochs=8", "train.batch_size=4", "train.val_batch_size=10",
    ]
    proc = subprocess.run([sys.executable, "main.py", "--config", "configs/voc_vit.yaml", "--opt", *opts], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"main.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    run = tmp_path / "runs" / "vit_ref"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["crop_padding"] == "reference" and saved["train"]["validation"] == "reference"
    assert saved["model"]["decoder_drop_path_rate"] == 0.1 and saved["train"]["lr_schedule"] == "constant"
    steps = json.loads((run / "results.json").read_text())["steps"]
    assert steps[0]["iterations"] == 104 and steps[1]["iterations"] < 100
    assert [v["iteration"] for v in steps[0]["validation_history"]] == [100]
    assert steps[1]["validation_history"] == []
    assert steps[0]["checkpoint"].startswith("best (iteration 100,")
    assert steps[1]["checkpoint"] == "last (the step was never validated)"
    assert all(s["miou_all_reference"] is not None for s in steps)


# ------------------------------------------------- MBS on a Segmenter (unit)
def tiny_segmenter(classes_per_step, seed):
    torch.manual_seed(seed)
    return Segmenter(classes_per_step, image_size=32, decoder_layers=1, decoder_heads=2, decoder_dim=16,
                     backbone_overrides=TINY_VIT)


def test_mbs_on_segmenter_transfer_and_orthogonal_term():
    old = tiny_segmenter([4], seed=0).eval()
    model = tiny_segmenter([4, 2], seed=1)
    model.load_state_dict(old.state_dict(), strict=False)
    method = build_method(MethodConfig(name="mbs"), "voc", num_old=4, num_classes=6)
    method.prepare_model(model)

    vectors = model.class_vectors().detach()
    assert torch.equal(vectors[:4], old.class_vectors().detach())  # old rows untouched
    assert torch.equal(vectors[4], vectors[0]) and torch.equal(vectors[5], vectors[0])

    # Expected orthogonal term, by hand: both new rows equal background's, so for new class i the pairs (i, bg)
    # and (i, other new class) have |cos| = 1 and the pairs (i, k) for old k = 1..3 have |cos(e_bg, e_k)|.
    old_vectors = old.class_vectors().detach()
    background = old_vectors[0]
    cosines = [float(torch.dot(background, e) / (background.norm() * e.norm())) for e in old_vectors[1:4]]
    per_new_class = (1.0 + 1.0 + sum(abs(c) for c in cosines)) / 5  # 5 other classes
    expected = (2 / 6) * per_new_class                             # |C_new| / |C|, mean over both new classes

    model.eval()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 6, (2, 32, 32))
    labels[labels.clamp(max=3) == labels] = 0  # step labels: new classes 4, 5 or background
    with torch.no_grad():
        old_out = old(images)
    terms = method.losses(labels, model(images), old_out, model)
    assert set(terms) == {"ce", "feature_distill", "class_embedding_distill", "output_distill", "ortho"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["ortho"].item() == pytest.approx(expected, rel=1e-5)

    # the term moves only the new class embeddings (stop-gradient on the other rows)
    terms["ortho"].backward()
    assert model.class_embeddings[1].grad is not None and model.class_embeddings[1].grad.abs().sum() > 0
    assert model.class_embeddings[0].grad is None or model.class_embeddings[0].grad.abs().sum() == 0


# --------------------------------------------- main.py, 3 steps, tiny ViT
def orthogonal_term_by_hand(vectors: torch.Tensor, num_old: int) -> float:
    """|C_new|/|C| x mean over (new i, any j != i) of |cos(e_i, e_j)|, from explicit cosines."""
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    count = vectors.shape[0]
    values = [abs(float(unit[i] @ unit[j])) for i in range(num_old, count) for j in range(count) if j != i]
    return (count - num_old) / count * sum(values) / len(values)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("vit_e2e")
    opts = [
        "name=vit", f"output_dir={base / 'runs'}", "device=cpu",
        f"data.root={base / 'synthetic'}", "data.synthetic.num_train=60", "data.synthetic.num_val=20",
        "data.synthetic.image_size=32", "data.base_size=32", "data.crop_size=32", "data.num_workers=0",
        f"data.custom_steps={json.dumps(STEPS)}",
        "model.architecture=segmenter", "model.backbone=vit_base_patch16_384", "model.pretrained=none",
        f"model.backbone_overrides={json.dumps(TINY_VIT)}", "model.decoder_dim=16", "model.decoder_heads=2",
        "model.decoder_layers=1",
        "method.name=mbs", "train.max_iters_per_step=3", "train.batch_size=4", "train.val_batch_size=10",
        # the ViT configs' selection: best new-class mIoU, validated every epoch
        "train.checkpoint_policy=best", "train.validation=epochs", "train.val_interval=1", "train.log_interval=1",
        "train.qualitative_figure=null",  # demo.yaml's figure goes to the repository's fig/
    ]
    proc = subprocess.run([sys.executable, "main.py", "--config", "configs/demo.yaml", "--opt", *opts], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"main.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return base / "runs" / "vit"


@pytest.mark.slow
def test_vit_run_writes_three_steps(vit_run):
    assert yaml.safe_load((vit_run / "config.yaml").read_text())["model"]["architecture"] == "segmenter"
    results = json.loads((vit_run / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    assert results["meta"]["architecture"] == "segmenter vit_base_patch16_384"
    for summary in results["steps"]:
        assert summary["checkpoint"].startswith("best") and summary["iterations"] == 3
        assert summary["miou_all"] is not None and 0.0 <= summary["miou_all"] <= 1.0
    checkpoints = sorted(p.name for p in (vit_run / "checkpoints").iterdir())
    assert checkpoints == ["step0.pt", "step1.pt", "step2.pt"]  # no partial/best leftovers


@pytest.mark.slow
def test_vit_run_grows_class_embeddings(vit_run):
    states = [torch.load(vit_run / "checkpoints" / f"step{t}.pt", map_location="cpu", weights_only=True)["model"]
              for t in range(3)]
    for t, state in enumerate(states):
        blocks = sorted(k for k in state if k.startswith("class_embeddings."))
        assert blocks == [f"class_embeddings.{k}" for k in range(t + 1)]
        assert [tuple(state[k].shape) for k in blocks] == [(1, len(STEPS[k]), 16) for k in range(t + 1)]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # every later step keeps (and fine-tunes) the earlier blocks; the encoder is shared across steps
    assert set(states[0]) < set(states[1]) < set(states[2])


@pytest.mark.slow
def test_vit_run_logs_the_transformer_loss_terms(vit_run):
    """At iteration 1 of step t the class vectors are step t-1's plus copies of its background vector, so the
    logged orthogonal term is known exactly from the step t-1 checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(vit_run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "step0/loss/ce" in tags and "step0/loss/ortho" not in tags
    num_old = 0
    for step in (1, 2):
        for term in ("ce", "feature_distill", "class_embedding_distill", "output_distill", "ortho"):
            values = [e.value for e in events.Scalars(f"step{step}/loss/{term}")]
            assert len(values) == 3 and all(v == v and v >= 0 for v in values), (step, term, values)
        num_old += len(STEPS[step - 1])
        previous = torch.load(vit_run / "checkpoints" / f"step{step - 1}.pt", map_location="cpu",
                              weights_only=True)["model"]
        old_vectors = torch.cat([previous[f"class_embeddings.{k}"][0] for k in range(step)])
        vectors = torch.cat([old_vectors, old_vectors[:1].expand(len(STEPS[step]), -1)])
        first = events.Scalars(f"step{step}/loss/ortho")[0]
        assert first.step == 1
        assert first.value == pytest.approx(orthogonal_term_by_hand(vectors, num_old), rel=1e-4)
