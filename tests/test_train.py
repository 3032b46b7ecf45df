"""train.py end to end on a tiny synthetic image-folder data set, and its command line."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import model_store
import train
from database import open_database
from monitoring import store as drift_store
from monitoring.reference import REFERENCE_FILE
from predictor import ModelSpec
from training.data import stratified_split
from training.evaluation import evaluate_predictor, measure_inference

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
ROOT = Path(__file__).resolve().parent.parent
# Timing inference 50 times per TTA mode was most of a test run's time; two repeats still give
# positive figures. The subprocess run patches train.py the same way before its main().
INFERENCE_REPEATS = 2
PATCHED_MAIN = (
    "import functools, sys, train, training.evaluation as e; "
    f"train.measure_inference = functools.partial(e.measure_inference, repeats={INFERENCE_REPEATS}); "
    "sys.exit(train.main())"
)


def quick_args(folder: Path, out: Path, *extra: str) -> list[str]:
    """train.py arguments for one short epoch on the tiny data set (a quarter held out)."""
    sizes = ["--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25"]
    return ["--data", str(folder), *sizes, "--out", str(out), *extra]


@pytest.fixture(scope="module", autouse=True)
def quick_inference_timing():
    """train.py's inference timing with few repeats, for every run in this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "measure_inference", functools.partial(measure_inference, repeats=INFERENCE_REPEATS))
        yield


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """train/<class>/ and test/<class>/ with noisy colour images of assorted sizes and formats."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(24, 64)), int(rng.integers(24, 64)))
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def strong_run(tiny_folder, tmp_path_factory) -> Path:
    """One short run of the default (strong) recipe, XLA-compiled and in mixed bfloat16 as the
    shipped model was, on a narrow network of its own widths."""
    out = tmp_path_factory.mktemp("strong")
    flags = ["--random-seed", "3", "--jit-compile", "--precision", "mixed_bfloat16", "--widths", "8,16,24"]
    assert train.main(quick_args(tiny_folder, out, *flags)) == 0
    return out


@pytest.mark.slow
def test_strong_run_writes_model_metrics_and_plots(strong_run):
    written = json.loads((strong_run / "metrics.json").read_text())
    assert written["class_names"] == ["blue", "green", "red"]
    assert (written["train_images"], written["val_images"], written["test_images"]) == (27, 9, 12)
    assert written["epochs"] == 1 and written["tta"] == "flip-translate" and written["random_seed"] == 3
    assert written["recipe"]["lookahead"] and written["recipe"]["optimizer"] == "airbench-sgd"
    assert written["recipe"]["jit_compile"] and written["recipe"]["precision"] == "mixed_bfloat16"
    assert len(written["history"]["loss"]) == 1 and len(written["history"]["val_accuracy"]) == 1
    assert 0 <= written["test_accuracy"] <= 1 and len(written["confusion_matrix"]) == 3
    assert set(written["test_accuracy_other_tta"]) == {"none", "flip"}
    assert written["inference"]["ms_one_image_p50"] > 0 and written["inference"]["tta"] == "flip-translate"
    assert written["data_sha256"] and written["wall_time_s"] >= written["train_time_s"] > 0
    assert written["command"].startswith("python train.py")
    for name in ("model.h5", "report/report.json", "report/confusion.png", "report/curves.png"):
        assert (strong_run / name).stat().st_size > 0


@pytest.mark.slow
def test_saved_model_is_float32_plain_keras_without_training_code(strong_run):
    # Trained in mixed precision, the model is rebuilt in float32 before saving: with the same widths.
    model = keras.saving.load_model(strong_run / "model.h5", compile=False, safe_mode=True)
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert [model.get_layer(f"conv{index}b").filters for index in (1, 2, 3)] == [8, 16, 24]
    assert json.loads((strong_run / "metrics.json").read_text())["arch_options"] == {"widths": [8, 16, 24]}
    saved = (strong_run / "model.h5").read_bytes()
    for training_only in (b"AirbenchSGD", b"Lookahead", b"WarmupLinearDecay", b"training."):
        assert training_only not in saved


@pytest.mark.slow
def test_evaluate_held_out_scores_the_runs_own_validation_images(strong_run, tiny_folder, tmp_path, capsys):
    written = json.loads((strong_run / "metrics.json").read_text())
    command = ["evaluate", str(strong_run / "model.h5"), "--data", str(tiny_folder), "--out", str(tmp_path)]
    capsys.readouterr()
    train.main([*command, "--held-out", "0.25", "--random-seed", "3"])
    printed = capsys.readouterr().out
    assert "on 9 images" in printed and "accuracy with tta none:" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["test"]["accuracy"] == pytest.approx(written["final_val_accuracy_tta"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--widths", "32,128"], "three positive whole numbers"),
        (["--widths", "32,0,256"], "three positive whole numbers"),
        (["--widths", "a,b,c"], "three positive whole numbers"),
        (["--arch", "seed", "--widths", "8,16,24"], "--arch seed has none"),
    ],
)
def test_bad_widths_are_refused_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        train.parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_seed_architecture_and_evaluate_command(tiny_folder, tmp_path, capsys):
    out = tmp_path / "seed"
    train.main(["--arch", "seed", "--data", str(tiny_folder), "--epochs", "1", "--out", str(out)])
    written = json.loads((out / "metrics.json").read_text())
    # The seed's 1,504,266 parameters for 10 classes, less 513 for each of 7 missing output units.
    assert written["arch"] == "seed" and written["parameters"] == 1_504_266 - 7 * 513 and written["tta"] == "none"
    assert written["recipe"]["batch_size"] == 32 and written["recipe"]["precision"] == "float32"
    capsys.readouterr()
    train.main(["evaluate", str(out / "model.h5"), "--data", str(tiny_folder), "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    assert "accuracy:" in printed and "confusion matrix" in printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["test"]["accuracy"] == pytest.approx(written["test_accuracy"])


@pytest.fixture(scope="module")
def seed_runs(tiny_folder, tmp_path_factory) -> dict:
    """Two runs of the seed network with the same random seed, two epochs each (the second
    epoch's shuffle is seeded too); the second also stores its model with --import, in a
    registry of its own, so that one run serves both tests below."""
    root = tmp_path_factory.mktemp("seed-runs")
    registry = {"INSTANCE_PATH": str(root / "instance"), "DATABASE_URL": f"sqlite:///{root / 'registry.sqlite'}"}
    plain = quick_args(tiny_folder, root / "a", "--arch", "seed", "--epochs", "2")
    imported = quick_args(tiny_folder, root / "b", "--arch", "seed", "--epochs", "2", "--import", "--name", "colours")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in registry.items():
            patch.setenv(name, value)
        assert train.main(plain) == 0 and train.main(imported) == 0
    return {"runs": [root / "a", root / "b"], "registry": registry}


@pytest.mark.slow
def test_same_random_seed_gives_the_same_run(seed_runs):
    losses = [json.loads((run / "metrics.json").read_text())["history"]["loss"] for run in seed_runs["runs"]]
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)


def test_recipe_flags_override_the_architectures_defaults():
    args = train.parse_args(["--epochs", "3", "--cutout", "0", "--translate", "4", "--random-seed", "7"])
    assert (args.epochs, args.cutout, args.translate, args.random_seed, args.val_fraction) == (3, 0, 4, 7, 0.04)
    assert args.learning_rate is None  # left to the recipe


@pytest.mark.slow
def test_import_flag_stores_and_activates_the_model(seed_runs, monkeypatch):
    for name, value in seed_runs["registry"].items():
        monkeypatch.setenv(name, value)
    with open_database():
        row = model_store.get_active()
        assert (row.name, row.class_names, row.tta) == ("colours", ["blue", "green", "red"], "none")
        # The drift reference fitted on the calibration's held-out images, beside the model and stored with it.
        assert (seed_runs["runs"][1] / REFERENCE_FILE).is_file()
        assert drift_store.reference_summary(row.id)["images"] == model_store.get_calibration(row.id)["heldout_images"]


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus(tiny_folder, tmp_path):
    out = tmp_path / "mirrored"
    arguments = quick_args(tiny_folder, out, "--arch", "seed", "--distribute", "mirrored")
    command = [sys.executable, "-c", PATCHED_MAIN, *arguments]
    command += ["--logical-cpus", "2", "--verbose", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 replica(s)" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["distribute"] == "mirrored"


class KnownPredictor:
    """Answers a fixed class per image, so the evaluation figures are known in advance."""

    spec = ModelSpec(("a", "b", "c"), (2, 2, 3))

    def predict_arrays(self, images):
        return np.eye(3)[images[:, 0, 0, 0]]


def test_evaluation_figures_for_a_known_case():
    predicted = np.array([0, 0, 1, 1, 1, 2, 0, 2])
    truth = np.array([0, 0, 1, 1, 0, 2, 2, 2])
    images = np.zeros((8, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = predicted
    result = evaluate_predictor(KnownPredictor(), images, truth)
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["per_class_accuracy"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 2 / 3})
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]


def test_stratified_split_keeps_every_class_and_is_seeded():
    labels = np.repeat(np.arange(4), 10)
    train_idx, val_idx = stratified_split(labels, 0.2, random_seed=1)
    assert len(val_idx) == 8 and np.bincount(labels[val_idx]).tolist() == [2, 2, 2, 2]
    assert set(train_idx).isdisjoint(val_idx) and len(train_idx) + len(val_idx) == 40
    assert np.array_equal(val_idx, stratified_split(labels, 0.2, random_seed=1)[1])


def test_held_out_parts_of_one_seed_nest():
    # train.py evaluate --held-out compares models on images none of them trained on.
    labels = np.repeat(np.arange(10), 500)
    smaller, larger = stratified_split(labels, 0.04, 0)[1], stratified_split(labels, 0.1, 0)[1]
    assert len(smaller) == 200 and set(smaller) < set(larger)
