"""Where evaluation and calibration samples come from, behind one small interface.

Every source hands out ``(inputs, labels)`` batches of numpy arrays, inputs shaped
``(batch, *input_shape)`` and labels ``(batch,)`` int64 or None. Sources are single-input:
a model with several inputs is refused with a clear error rather than fed half its data.
:func:`open_data` turns what a user typed ("demo", "synthetic", a folder, a .npy/.npz file)
into a source already checked against the model's inputs, so a mismatch is reported before
any work starts, as one line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from engine.errors import SlimscopeError, one_line
from engine.model import TensorSpec

Batch = tuple[np.ndarray, "np.ndarray | None"]

#: The demo's fixed split: any change here changes the recorded demo accuracy.
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_CALIBRATION_SIZE = 128
DIGITS_INPUT_SHAPE = (1, 8, 8)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_SYNTHETIC_COUNT = 64
DIGITS_SPLITS = ("train", "test", "calibration")


class DataSource(ABC):
    """A fixed, ordered collection of samples; iterating twice gives the same batches."""

    #: Short name for messages: a file or folder name, "demo digits (test)", ...
    name: str
    #: Shape of one sample, without the batch axis.
    input_shape: tuple[int, ...]
    has_labels: bool

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _slice(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` as one batch."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and the GUI: what the data is and how much of it."""

    def batches(self, batch_size: int) -> Iterator[Batch]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self._slice(start, min(start + batch_size, len(self)))

    def head(self, count: int) -> DataSource:
        """The first `count` samples, for quick estimates on a large source."""
        return _Head(self, count) if count < len(self) else self


class _Head(DataSource):
    def __init__(self, source: DataSource, count: int) -> None:
        self._source = source
        self._count = max(0, count)
        self.name = source.name
        self.input_shape = source.input_shape
        self.has_labels = source.has_labels

    def __len__(self) -> int:
        return self._count

    def _slice(self, start: int, stop: int) -> Batch:
        return self._source._slice(start, stop)

    def describe(self) -> str:
        return f"first {self._count} of {self._source.describe()}"


class ArraySource(DataSource):
    """Samples already in memory; the base of every source small enough to hold at once."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray | None, name: str) -> None:
        if labels is not None and len(labels) != len(inputs):
            raise SlimscopeError(
                f"{name}: {len(labels)} labels for {len(inputs)} inputs; "
                "they must be the same length"
            )
        self.name = name
        self.inputs = inputs
        self.labels = labels
        self.input_shape = tuple(inputs.shape[1:])
        self.has_labels = labels is not None

    def __len__(self) -> int:
        return len(self.inputs)

    def _slice(self, start: int, stop: int) -> Batch:
        labels = None if self.labels is None else self.labels[start:stop]
        return self.inputs[start:stop], labels

    def describe(self) -> str:
        labelled = "labelled" if self.has_labels else "unlabelled"
        shape = "x".join(map(str, self.input_shape))
        return f"{self.name}: {len(self)} {labelled} samples of {shape}"


class DigitsData(ArraySource):
    """scikit-learn's bundled 8x8 digits, split exactly as the demo model was trained and tested.

    'calibration' is the first :data:`DIGITS_CALIBRATION_SIZE` training samples: data a
    quantizer may look at without touching the test split.
    """

    def __init__(self, split: Literal["train", "test", "calibration"] = "test") -> None:
        if split not in DIGITS_SPLITS:
            raise SlimscopeError(f"unknown digits split {split!r} "
                                 f"(choose {', '.join(DIGITS_SPLITS)})")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        labels = digits.target.astype(np.int64)
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
            stratify=labels,
        )
        inputs, targets = {
            "train": (x_train, y_train),
            "test": (x_test, y_test),
            "calibration": (x_train[:DIGITS_CALIBRATION_SIZE], y_train[:DIGITS_CALIBRATION_SIZE]),
        }[split]
        self.split = split
        super().__init__(np.ascontiguousarray(inputs), np.ascontiguousarray(targets),
                         f"demo digits ({split})")


class ArrayData(ArraySource):
    """Samples from a .npy file (inputs only) or a .npz file (inputs/x, optional labels/y)."""

    INPUT_KEYS = ("inputs", "x")
    LABEL_KEYS = ("labels", "y")

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise SlimscopeError(f"{path}: no such data file")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SlimscopeError(
                f"{path.name}: not a readable numpy file ({one_line(exc)})") from None
        if isinstance(loaded, np.ndarray):
            inputs, labels = loaded, None
        else:
            with loaded:
                inputs = _pick(loaded, self.INPUT_KEYS, path, required=True)
                labels = _pick(loaded, self.LABEL_KEYS, path, required=False)
        if inputs.ndim < 2:
            raise SlimscopeError(
                f"{path.name}: inputs have shape {inputs.shape}; expected (samples, ...) with at "
                "least one axis per sample"
            )
        if labels is not None:
            labels = _as_labels(labels, path.name)
        super().__init__(inputs, labels, path.name)


class ImageFolderData(DataSource):
    """Images in one subfolder per class (class index = sorted subfolder name), or a flat
    folder of unlabelled images. Images are decoded per batch, so large folders cost no memory.

    Pixels are scaled to [0, 1] (as the demo digits are), then normalized per channel with
    `mean`/`std` when given. `input_shape` is (C, H, W), or (H, W, C) for channels-last models.
    """

    def __init__(
        self,
        folder: str | Path,
        input_shape: Sequence[int],
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise SlimscopeError(f"{folder}: no such folder")
        self.folder = folder
        self.name = folder.name
        self.input_shape = tuple(int(d) for d in input_shape)
        self._channels_last, channels, self._size = _image_layout(self.input_shape)
        self._mode = {1: "L", 3: "RGB"}[channels]
        self._mean = _per_channel(mean, channels, "mean", 0.0)
        self._std = _per_channel(std, channels, "std", 1.0)
        if np.any(self._std == 0):
            raise SlimscopeError("image std must not contain zeros")
        self.class_names = sorted(p.name for p in folder.iterdir() if p.is_dir()
                                  and not p.name.startswith("."))
        if self.class_names:
            self._files = [(f, index) for index, name in enumerate(self.class_names)
                           for f in _images_in(folder / name)]
        else:
            self._files = [(f, -1) for f in _images_in(folder)]
        if not self._files:
            raise SlimscopeError(f"{folder}: no images found (expected one subfolder per class)")
        self.has_labels = bool(self.class_names)

    def __len__(self) -> int:
        return len(self._files)

    def _slice(self, start: int, stop: int) -> Batch:
        chunk = self._files[start:stop]
        inputs = np.stack([self._read(path) for path, _ in chunk])
        labels = (np.array([label for _, label in chunk], dtype=np.int64)
                  if self.has_labels else None)
        return inputs, labels

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                pixels = image.convert(self._mode).resize(self._size, Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as exc:
            raise SlimscopeError(f"{path.name}: cannot read image ({one_line(exc)})") from None
        array = np.asarray(pixels, dtype=np.float32).reshape(self._size[1], self._size[0], -1)
        array = (array / 255.0 - self._mean) / self._std  # HWC, channels broadcast last
        return array if self._channels_last else np.ascontiguousarray(array.transpose(2, 0, 1))

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.has_labels:
            return (f"image folder {self.name}: {len(self)} images in "
                    f"{len(self.class_names)} classes, as {shape}")
        return f"image folder {self.name}: {len(self)} unlabelled images, as {shape}"


class SyntheticData(ArraySource):
    """Seeded random inputs shaped like the model's input, for fidelity checks without data.

    Floats are standard normal, integers (token ids) uniform in [0, 100), booleans fair coins.
    The batch axis is the first axis when it is dynamic (or static); other dynamic axes have
    no size to guess, so they are refused.
    """

    def __init__(self, input_specs: Sequence[TensorSpec], count: int = DEFAULT_SYNTHETIC_COUNT,
                 seed: int = 0) -> None:
        spec = _single_input(input_specs, "synthetic data")
        sample_shape = spec.shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in sample_shape):
            raise SlimscopeError(
                f"synthetic data needs a fixed input size, but input {spec.name!r} has shape "
                f"{_shape_text(spec.shape)}; give real data instead"
            )
        if count < 1:
            raise SlimscopeError(f"synthetic data needs at least one sample, not {count}")
        rng = np.random.default_rng(seed)
        shape = (count, *sample_shape)
        dtype = _numpy_dtype(spec.dtype)
        kind = dtype.kind if dtype is not None else "?"
        if kind == "f":
            inputs = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        elif kind in "iu":
            inputs = rng.integers(0, 100, shape).astype(dtype)
        elif kind == "b":
            inputs = rng.random(shape) < 0.5
        else:
            raise SlimscopeError(f"cannot make synthetic data of type {spec.dtype}")
        super().__init__(inputs, None, f"synthetic (seed {seed})")


def open_data(spec: str, model_inputs: Sequence[TensorSpec], *,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              ) -> DataSource:
    """The source a user named, checked against the model's inputs.

    `spec` is "demo" (the digits test split; "demo:train" / "demo:calibration" for the others),
    "synthetic" or "synthetic:COUNT", a folder of images, or a .npy/.npz file.
    `mean`/`std` apply to image folders only.
    """
    kind, _, argument = spec.partition(":")
    if kind == "demo":
        source: DataSource = DigitsData(argument or "test")  # type: ignore[arg-type]
    elif kind == "synthetic":
        if argument and not argument.isdigit():
            raise SlimscopeError(f"synthetic:COUNT needs a whole number, not {argument!r}")
        count = int(argument) if argument else DEFAULT_SYNTHETIC_COUNT
        return SyntheticData(model_inputs, count=count)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            input_spec = _single_input(model_inputs, "an image folder")
            shape = input_spec.shape[1:]
            if not all(isinstance(d, int) and d > 0 for d in shape):
                raise SlimscopeError(
                    f"cannot size images for input {input_spec.name!r} of shape "
                    f"{_shape_text(input_spec.shape)}: its image size is not fixed"
                )
            return ImageFolderData(path, shape, mean=mean, std=std)  # type: ignore[arg-type]
        if path.suffix.lower() in (".npy", ".npz"):
            source = ArrayData(path)
        elif path.exists():
            raise SlimscopeError(f"{path.name}: unsupported data file (use a folder of images, "
                                 ".npy or .npz)")
        else:
            raise SlimscopeError(f"{spec}: no such data (expected 'demo', 'synthetic', a folder "
                                 "of images, or a .npy/.npz file)")
    return _conform(source, model_inputs) if model_inputs else source


def _conform(source: DataSource, model_inputs: Sequence[TensorSpec]) -> DataSource:
    """`source` fitted to the model's single input: same per-sample shape and dtype, or an
    error naming both shapes. Arrays that differ only by size-1 axes (8x8 vs 1x8x8) are
    reshaped, since that is what the user meant.
    """
    spec = _single_input(model_inputs, "evaluation data")
    wanted = spec.shape[1:]
    have = source.input_shape
    if not _shape_matches(have, wanted):
        squeezed_have = tuple(d for d in have if d != 1)
        squeezed_wanted = tuple(d for d in wanted if d != 1)
        if not (isinstance(source, ArraySource) and all(isinstance(d, int) for d in wanted)
                and squeezed_have == squeezed_wanted):
            raise SlimscopeError(
                f"{source.name} has samples of shape {_shape_text(have)}, but "
                f"the model input {spec.name!r} takes {_shape_text(wanted)} per sample"
            )
        source.inputs = source.inputs.reshape(len(source), *wanted)
        source.input_shape = tuple(wanted)  # type: ignore[arg-type]
    dtype = _numpy_dtype(spec.dtype)
    if isinstance(source, ArraySource) and dtype is not None:
        if source.inputs.dtype != dtype:
            if source.inputs.dtype.kind == "f" and dtype.kind in "iub":
                raise SlimscopeError(f"the data holds {source.inputs.dtype} values, but the model "
                                     f"input {spec.name!r} takes {spec.dtype}")
            source.inputs = source.inputs.astype(dtype)
    return source


def _numpy_dtype(name: str) -> np.dtype | None:
    """The numpy dtype to feed for a TensorSpec dtype; bfloat16 inputs are fed as float32,
    which runners cast, and names numpy does not know give None.
    """
    if name == "bfloat16":
        return np.dtype(np.float32)
    try:
        return np.dtype(name)
    except TypeError:
        return None


def _single_input(model_inputs: Sequence[TensorSpec], purpose: str) -> TensorSpec:
    if not model_inputs:
        raise SlimscopeError(f"{purpose} needs the model's input shape, which this file does not "
                             "record")
    if len(model_inputs) > 1:
        names = ", ".join(spec.name for spec in model_inputs)
        raise SlimscopeError(f"{purpose} feeds one input, but this model takes "
                             f"{len(model_inputs)} ({names})")
    return model_inputs[0]


def _shape_matches(have: Sequence[int], wanted: Sequence[int | str | None]) -> bool:
    return len(have) == len(wanted) and all(
        not isinstance(w, int) or w <= 0 or h == w for h, w in zip(have, wanted))


def _shape_text(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _image_layout(shape: tuple[int, ...]) -> tuple[bool, int, tuple[int, int]]:
    """(channels_last, channels, (width, height)) of a per-sample image shape."""
    if len(shape) == 3 and shape[0] in (1, 3):
        return False, shape[0], (shape[2], shape[1])
    if len(shape) == 3 and shape[2] in (1, 3):
        return True, shape[2], (shape[1], shape[0])
    raise SlimscopeError(f"images need an input of (1 or 3, H, W) or (H, W, 1 or 3) per sample, "
                         f"not {_shape_text(shape)}")


def _per_channel(values: Sequence[float] | None, channels: int, what: str,
                 default: float) -> np.ndarray:
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size == 1:
        return np.repeat(array, channels)
    if array.size != channels:
        raise SlimscopeError(f"image {what} has {array.size} values for {channels} channels")
    return array


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _pick(archive: "np.lib.npyio.NpzFile", keys: Sequence[str], path: Path,
          required: bool) -> np.ndarray | None:
    for key in keys:
        if key in archive.files:
            return archive[key]
    if required:
        raise SlimscopeError(f"{path.name}: no inputs array (name it one of {', '.join(keys)}; "
                             f"found {', '.join(archive.files) or 'nothing'})")
    return None


def _as_labels(labels: np.ndarray, name: str) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SlimscopeError(f"{name}: labels must be one whole-number class index per sample, "
                             f"not {labels.dtype} of shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise SlimscopeError(f"{name}: labels must not be negative")
    return labels.astype(np.int64)


