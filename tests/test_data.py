"""Data sources: the demo split, image folders, arrays, synthetic inputs and open_data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import (
    DIGITS_CALIBRATION_SIZE,
    ArrayData,
    ArraySource,
    DigitsData,
    ImageFolderData,
    SyntheticData,
    open_data,
)
from engine.errors import SlimscopeError
from engine.model import TensorSpec

DIGITS_INPUT = [TensorSpec("input", ("batch", 1, 8, 8))]


# -- the demo split ---------------------------------------------------------------------------
def test_digits_splits_partition_the_dataset_and_are_stable() -> None:
    train, test, calibration = DigitsData("train"), DigitsData("test"), DigitsData("calibration")
    assert len(train) + len(test) == 1797
    assert len(test) == 450
    assert len(calibration) == DIGITS_CALIBRATION_SIZE
    assert test.input_shape == (1, 8, 8) and test.inputs.dtype == np.float32
    assert 0.0 <= test.inputs.min() and test.inputs.max() == 1.0
    assert np.array_equal(calibration.inputs, train.inputs[:DIGITS_CALIBRATION_SIZE])
    # stratified: every class is in the test split in its share (the dataset has 174..183 each)
    assert np.bincount(test.labels).min() >= 43
    assert np.array_equal(DigitsData("test").inputs, test.inputs)


def test_unknown_digits_split_is_refused() -> None:
    with pytest.raises(SlimscopeError, match="unknown digits split"):
        DigitsData("validation")  # type: ignore[arg-type]


def test_batches_cover_every_sample_in_order() -> None:
    data = DigitsData("calibration")
    batches = list(data.batches(50))
    assert [len(x) for x, _ in batches] == [50, 50, 28]
    assert np.array_equal(np.concatenate([x for x, _ in batches]), data.inputs)
    assert np.array_equal(np.concatenate([y for _, y in batches]), data.labels)
    with pytest.raises(ValueError):
        next(data.batches(0))


def test_head_limits_a_source() -> None:
    head = DigitsData("test").head(10)
    assert len(head) == 10
    assert sum(len(x) for x, _ in head.batches(4)) == 10
    assert "first 10" in head.describe()


# -- image folders ------------------------------------------------------------------------------
def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """Two classes; folder names sort opposite to creation order, and sizes differ from 8x8."""
    ramp = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    write_png(tmp_path / "zebra" / "a.png", ramp)
    write_png(tmp_path / "zebra" / "b.png", np.full((16, 16), 255))
    write_png(tmp_path / "ant" / "c.png", np.stack([np.full((8, 8), 255), np.zeros((8, 8)),
                                                    np.zeros((8, 8))], axis=-1))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_labels_by_sorted_class_name(class_folder: Path) -> None:
    data = ImageFolderData(class_folder, (1, 8, 8))
    assert data.class_names == ["ant", "zebra"]
    assert len(data) == 3 and data.has_labels
    inputs, labels = next(data.batches(8))
    assert inputs.shape == (3, 1, 8, 8) and inputs.dtype == np.float32
    assert labels.tolist() == [0, 1, 1]
    # pure red in grayscale is ITU-R 601 luma 0.299 * 255 = 76
    assert np.allclose(inputs[0], 76 / 255)
    assert np.allclose(inputs[1, 0], np.arange(64).reshape(8, 8) * 4 / 255)
    assert np.allclose(inputs[2], 1.0)  # 16x16 white resized to 8x8


def test_image_folder_rgb_normalized_and_channels_last(class_folder: Path) -> None:
    chw = ImageFolderData(class_folder, (3, 4, 4), mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.5])
    red, _ = next(chw.batches(1))
    assert red.shape == (1, 3, 4, 4)
    assert np.allclose(red[0, 0], 1.0) and np.allclose(red[0, 1], -2.0)
    hwc = ImageFolderData(class_folder, (4, 4, 3), mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 0.5])
    red_last, _ = next(hwc.batches(1))
    assert np.array_equal(red_last[0], red[0].transpose(1, 2, 0))


def test_flat_image_folder_is_unlabelled(tmp_path: Path) -> None:
    write_png(tmp_path / "one.png", np.zeros((8, 8)))
    data = ImageFolderData(tmp_path, (1, 8, 8))
    assert not data.has_labels
    assert next(data.batches(4))[1] is None


def test_unreadable_image_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.png").write_bytes(b"not a png at all")
    data = ImageFolderData(tmp_path, (1, 8, 8))
    with pytest.raises(SlimscopeError, match="'broken.png': cannot read image") as error:
        next(data.batches(1))
    assert "\n" not in str(error.value)


# -- arrays ---------------------------------------------------------------------------------------
def test_npz_round_trip(tmp_path: Path) -> None:
    inputs = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    labels = np.array([3, 1, 4, 1, 5])
    np.savez(tmp_path / "data.npz", x=inputs, y=labels)
    data = ArrayData(tmp_path / "data.npz")
    assert data.has_labels and len(data) == 5 and data.input_shape == (1, 8, 8)
    batch, batch_labels = next(data.batches(5))
    assert np.array_equal(batch, inputs) and batch_labels.tolist() == labels.tolist()


def test_npy_has_no_labels_and_open_data_fits_it_to_the_model(tmp_path: Path) -> None:
    inputs = np.random.default_rng(1).random((4, 8, 8))  # float64, no channel axis
    np.save(tmp_path / "inputs.npy", inputs)
    data = open_data(str(tmp_path / "inputs.npy"), DIGITS_INPUT)
    assert not data.has_labels
    batch, labels = next(data.batches(4))
    assert labels is None
    assert batch.shape == (4, 1, 8, 8) and batch.dtype == np.float32
    assert np.allclose(batch[:, 0], inputs)


# -- synthetic -------------------------------------------------------------------------------------
def test_synthetic_follows_the_spec_and_its_seed() -> None:
    data = SyntheticData(DIGITS_INPUT, count=6, seed=3)
    again = SyntheticData(DIGITS_INPUT, count=6, seed=3)
    other = SyntheticData(DIGITS_INPUT, count=6, seed=4)
    assert data.input_shape == (1, 8, 8) and len(data) == 6 and not data.has_labels
    assert np.array_equal(data.inputs, again.inputs)
    assert not np.array_equal(data.inputs, other.inputs)
    tokens = SyntheticData([TensorSpec("ids", (None, 12), "int64")], count=3)
    assert tokens.inputs.dtype == np.int64 and tokens.inputs.shape == (3, 12)


# -- open_data: what users type, and the one line they get back ---------------------------------
def bad_files(folder: Path) -> None:
    np.savez(folder / "mismatch.npz", inputs=np.zeros((4, 1, 8, 8), np.float32),
             labels=np.zeros(3, int))
    np.savez(folder / "nokeys.npz", images=np.zeros((4, 1, 8, 8), np.float32))
    np.save(folder / "wrongshape.npy", np.zeros((4, 3, 8, 8), np.float32))
    np.savez(folder / "floatlabels.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2))
    (folder / "empty").mkdir()
    (folder / "model.txt").write_text("hello")
    (folder / "corrupt.npy").write_bytes(b"garbage")


BAD_SPECS = [
    ("missing.npz", DIGITS_INPUT, "no such data"),
    ("nowhere/at/all", DIGITS_INPUT, "no such data"),
    ("mismatch.npz", DIGITS_INPUT, "3 labels for 4 inputs"),
    ("nokeys.npz", DIGITS_INPUT, "no inputs array"),
    ("wrongshape.npy", DIGITS_INPUT, r"shape \(3, 8, 8\).*takes \(1, 8, 8\)"),
    ("floatlabels.npz", DIGITS_INPUT, "labels must be one whole-number"),
    ("empty", DIGITS_INPUT, "no images found"),
    ("model.txt", DIGITS_INPUT, "unsupported data file"),
    ("corrupt.npy", DIGITS_INPUT, "not a readable numpy file"),
    ("demo", [TensorSpec("input", ("batch", 3, 32, 32))], r"takes \(3, 32, 32\)"),
    ("demo:validation", DIGITS_INPUT, "unknown digits split"),
    ("synthetic", [], "needs the model's input shape"),
    ("synthetic:lots", DIGITS_INPUT, "needs a whole number"),
    ("synthetic", [TensorSpec("image", ("batch", 3, "h", "w"))], "needs a fixed input size"),
    ("synthetic", [TensorSpec("a", ("batch", 4)), TensorSpec("sr", (), "int64")],
     "cannot guess the scalar input 'sr'"),
    ("empty", [TensorSpec("tokens", ("batch", 128), "int64")], "images need an input of"),
]


@pytest.mark.parametrize(("spec", "inputs", "message"), BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_specs_are_one_line_errors(tmp_path: Path, spec: str, inputs: list[TensorSpec],
                                       message: str) -> None:
    bad_files(tmp_path)
    target = spec if spec.split(":")[0] in ("demo", "synthetic") else str(tmp_path / spec)
    with pytest.raises(SlimscopeError, match=message) as error:
        open_data(target, inputs)
    assert "\n" not in str(error.value)


GOOD_SPECS = [
    ("demo", 450, True),
    ("demo:calibration", DIGITS_CALIBRATION_SIZE, True),
    ("synthetic", 64, False),
    ("synthetic:7", 7, False),
]


@pytest.mark.parametrize(("spec", "count", "labelled"), GOOD_SPECS, ids=[g[0] for g in GOOD_SPECS])
def test_good_specs_open(spec: str, count: int, labelled: bool) -> None:
    data = open_data(spec, DIGITS_INPUT)
    assert len(data) == count and data.has_labels is labelled
    assert data.input_shape == (1, 8, 8)


def test_open_data_reads_an_image_folder_at_the_model_size(class_folder: Path) -> None:
    data = open_data(str(class_folder), [TensorSpec("input", (None, 1, 4, 4))])
    assert isinstance(data, ImageFolderData) and data.input_shape == (1, 4, 4)


def test_array_source_refuses_mismatched_labels() -> None:
    with pytest.raises(SlimscopeError, match="2 labels for 3 inputs"):
        ArraySource(np.zeros((3, 2), np.float32), np.zeros(2, np.int64), "hand-made")


def test_array_files_asking_for_more_than_half_the_memory_are_refused(tmp_path: Path,
                                                                      monkeypatch) -> None:
    import engine.data as data_module

    path = tmp_path / "inputs.npy"
    np.save(path, np.zeros((64, 1, 8, 8), np.float32))
    assert len(open_data(str(path), DIGITS_INPUT)) == 64
    monkeypatch.setattr(data_module, "DATA_MEMORY_SHARE", 1e-9)
    with pytest.raises(SlimscopeError, match=r"'inputs.npy': needs .* GiB in memory.* fewer"):
        open_data(str(path), DIGITS_INPUT)


def test_text_arrays_beside_the_inputs_still_load(tmp_path: Path) -> None:
    """The guard takes numbers and text, refusing only what would be unpickled."""
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.zeros((5, 1, 8, 8), np.float32), words=np.array(["a", "bc"]))
    assert len(open_data(str(path), DIGITS_INPUT)) == 5
