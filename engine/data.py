"""Where evaluation and calibration samples come from, behind one small interface.

Every source hands out ``(inputs, labels)`` batches, labels ``(batch,)`` int64 or None. For a
model with one input, inputs are one array shaped ``(batch, *input_shape)``, as always. For a
model with several inputs they are a :class:`NamedInputs`: one array per input name, each with
its own sample axis (a recurrent state laid out ``[layers, batch, hidden]`` has it on axis 1),
or none for a constant fed unchanged with every batch (a sample rate). :func:`batch_length`,
:func:`take_samples` and :func:`pad_samples` handle both kinds, so runners need not ask which.

:func:`open_data` turns what a user typed ("demo", "synthetic", a folder, a .npy/.npz file)
into a source already checked against the model's inputs, so a mismatch is reported before
any work starts, as one line. The general file format is an ``.npz`` with one array per input
name (labels, if any, under ``y``/``labels``); a single-input model also takes ``x``/``inputs``
or an array named after its input. Each input's sample axis comes from the model's input spec
(its first dynamic axis; see :func:`spec_sample_axis`); an input the spec gives no sample axis
(a scalar), or whose array lacks that axis, is a constant. Without specs (TorchScript), the first
axis of every array that has one is the sample axis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
import math
import os
import re
import struct
from typing import Iterator, Literal, Mapping, Sequence, Union

import numpy as np

from engine.errors import SlimscopeError, one_line
from engine.formats.guard import quote
from engine.model import TensorSpec


class NamedInputs(dict):
    """One batch of a model with several inputs: arrays by input name (``dict[str, ndarray]``).

    `axes` gives each input's sample axis, or None for a constant fed unchanged with every
    batch. A plain dict passed instead is read as sample axis 0 for every array that has axes.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray],
                 axes: Mapping[str, int | None] | None = None) -> None:
        super().__init__(arrays)
        given = dict(axes or {})
        self.axes: dict[str, int | None] = {
            name: given[name] if name in given else (0 if np.ndim(array) else None)
            for name, array in self.items()}


#: A batch's model inputs: one array (one input), or arrays by input name (several).
Inputs = Union[np.ndarray, NamedInputs]
Batch = tuple[Inputs, "np.ndarray | None"]


def sample_axes(inputs: Mapping[str, np.ndarray]) -> dict[str, int | None]:
    """Each named input's sample axis (None: a constant)."""
    if isinstance(inputs, NamedInputs):
        return inputs.axes
    return NamedInputs(inputs).axes


def batch_length(inputs: "Inputs | Mapping[str, np.ndarray]") -> int:
    """How many samples a batch holds, whichever kind of inputs it has."""
    if isinstance(inputs, Mapping):
        for name, axis in sample_axes(inputs).items():
            if axis is not None:
                return int(np.shape(inputs[name])[axis])
        return 1
    return len(inputs)


def _along(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return array[(slice(None),) * axis + (slice(start, stop),)]


def take_samples(inputs: "Inputs | Mapping[str, np.ndarray]", start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of a batch; constants are passed along whole."""
    if isinstance(inputs, Mapping):
        axes = sample_axes(inputs)
        return NamedInputs({name: array if axes[name] is None
                            else _along(array, axes[name], start, stop)  # type: ignore[arg-type]
                            for name, array in inputs.items()}, axes)
    return inputs[start:stop]


def pad_samples(inputs: "Inputs | Mapping[str, np.ndarray]", size: int) -> Inputs:
    """The batch grown to `size` samples by repeating its last one (a fixed-batch model takes
    no fewer); the caller drops the extra outputs."""
    missing = size - batch_length(inputs)
    if missing <= 0:
        return inputs  # type: ignore[return-value]

    def grown(array: np.ndarray, axis: int) -> np.ndarray:
        last = _along(array, axis, array.shape[axis] - 1, array.shape[axis])
        return np.concatenate([array, np.repeat(last, missing, axis=axis)], axis=axis)

    if isinstance(inputs, Mapping):
        axes = sample_axes(inputs)
        return NamedInputs({name: array if axes[name] is None else grown(array, axes[name])
                            for name, array in inputs.items()}, axes)
    return grown(inputs, 0)


def spec_sample_axis(spec: TensorSpec, batch: int | None = None) -> int | None:
    """The sample axis of a model input: its first dynamic axis. A fully static input has it
    where its size is the model's fixed `batch` (axis 1 of silero's ``[2, 1, 128]`` state when
    the batch is 1), else on axis 0. A scalar input has none: it is a constant."""
    if not spec.shape:
        return None
    for axis, size in enumerate(spec.shape):
        if not (isinstance(size, int) and size > 0):
            return axis
    if batch is not None and spec.shape[0] != batch and batch in spec.shape:
        return spec.shape.index(batch)
    return 0


def _static_batch(specs: Sequence[TensorSpec]) -> int | None:
    """The batch of a model whose inputs are all static: its first input's first size."""
    shaped = [spec for spec in specs if spec.shape]
    if shaped and all(spec.is_static for spec in shaped):
        return int(shaped[0].shape[0])  # type: ignore[arg-type]
    return None

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

    #: Random inputs made from the model's specs (exporters calibrate differently on them).
    synthetic: bool = False

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


class NamedArrayData(DataSource):
    """Samples of a model with several inputs, one array per input name, held in memory.

    Every sampled array holds the same number of samples along its own axis; constants (axis
    None) go with every batch unchanged.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], axes: Mapping[str, int | None],
                 labels: np.ndarray | None, name: str) -> None:
        counts = {key: array.shape[axes[key]] for key, array in arrays.items()
                  if axes.get(key) is not None}
        if not counts:
            raise SlimscopeError(f"{name}: no array has a sample axis, so there are no samples")
        if len(set(counts.values())) > 1:
            told = ", ".join(f"{quote(key)} {count}" for key, count in counts.items())
            raise SlimscopeError(f"{name}: the inputs hold different numbers of samples ({told})")
        count = next(iter(counts.values()))
        if labels is not None and len(labels) != count:
            raise SlimscopeError(f"{name}: {len(labels)} labels for {count} inputs; "
                                 "they must be the same length")
        self.name = name
        self.inputs = NamedInputs(arrays, axes)
        self.labels = labels
        self.count = count
        self.has_labels = labels is not None
        #: Per input, the shape of one sample (a constant's whole shape).
        self.input_shapes = {key: _without_axis(array.shape, self.inputs.axes[key])
                             for key, array in arrays.items()}
        first = next(key for key in arrays if self.inputs.axes[key] is not None)
        self.input_shape = self.input_shapes[first]

    def __len__(self) -> int:
        return self.count

    def _slice(self, start: int, stop: int) -> Batch:
        labels = None if self.labels is None else self.labels[start:stop]
        return take_samples(self.inputs, start, stop), labels

    def describe(self) -> str:
        labelled = "labelled" if self.has_labels else "unlabelled"
        parts = []
        for key, shape in self.input_shapes.items():
            axis = self.inputs.axes[key]
            text = "x".join(map(str, shape)) or "scalar"
            if axis is None:
                text += " constant"
            elif axis:
                text += f" (samples on axis {axis})"
            parts.append(f"{key} {text}")
        return f"{self.name}: {len(self)} {labelled} samples of {', '.join(parts)}"


def _without_axis(shape: Sequence[int], axis: int | None) -> tuple[int, ...]:
    return tuple(shape) if axis is None else tuple(shape[:axis]) + tuple(shape[axis + 1:])


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
    """Samples from a .npy file (inputs only) or a .npz file (inputs/x, optional labels/y; a
    single-input model's inputs may also be named after its input)."""

    INPUT_KEYS = ("inputs", "x")
    LABEL_KEYS = ("labels", "y")

    def __init__(self, path: str | Path, input_name: str | None = None) -> None:
        path = Path(path)
        loaded = _load_numpy(path)
        if isinstance(loaded, np.ndarray):
            inputs, labels = loaded, None
        else:
            keys = (*self.INPUT_KEYS, input_name) if input_name else self.INPUT_KEYS
            inputs = _pick(loaded, keys, path, required=True)
            labels = _pick(loaded, self.LABEL_KEYS, path, required=False)
        if inputs.ndim < 2:
            raise SlimscopeError(
                f"{path.name}: inputs have shape {inputs.shape}; expected (samples, ...) with at "
                "least one axis per sample"
            )
        if labels is not None:
            labels = _as_labels(labels, path.name)
        super().__init__(inputs, labels, path.name)


def _load_numpy(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy's array, or every array of an .npz by name, read only after
    :func:`_array_headers` has checked what each header claims."""
    import zipfile

    headers = _array_headers(path)
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in headers}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SlimscopeError(
            f"{quote(path.name)}: not a readable numpy file ({one_line(exc)})") from None


def _npz_holds_named_inputs(path: Path, model_inputs: Sequence[TensorSpec]) -> bool:
    """Whether an .npz is one array per input name rather than today's x/y layout: always for
    a model with several inputs; without input specs (TorchScript), when it holds several
    numeric arrays besides the labels (an x with a text array beside it stays x/y data)."""
    if len(model_inputs) > 1:
        return True
    if model_inputs:
        return False
    numeric = [key for key, (_shape, dtype) in _array_headers(path).items()
               if key not in ArrayData.LABEL_KEYS and dtype.kind in "fiub"]
    return len(numeric) > 1


def _check_input_names(where: str, stored: Sequence[str],
                       model_inputs: Sequence[TensorSpec]) -> None:
    """One array per model input name and nothing else, or one line naming the first mismatch."""
    wanted = [spec.name for spec in model_inputs]
    missing = [name for name in wanted if name not in stored]
    if missing:
        raise SlimscopeError(f"{where} has no array for the model input {quote(missing[0])} "
                             f"(it holds {', '.join(map(quote, stored)) or 'nothing'}; give one "
                             f"array per input: {', '.join(map(quote, wanted))})")
    extra = [key for key in stored if key not in wanted]
    if extra:
        raise SlimscopeError(f"{where} holds {quote(extra[0])}, which is not a model input "
                             f"(the inputs are {', '.join(map(quote, wanted))})")


def named_array_data(path: Path, model_inputs: Sequence[TensorSpec]) -> NamedArrayData:
    """An .npz with one array per model input name, checked against the input specs: every
    input present and nothing else, per-sample sizes as the spec fixes them, dtypes cast
    (floats are never cast to integers). Arrays keep the model's input order."""
    archive = _load_numpy(path)
    if isinstance(archive, np.ndarray):
        raise SlimscopeError(f"{quote(path.name)}: a model with several inputs needs an .npz "
                             "with one array per input name")
    labels = _pick(archive, ArrayData.LABEL_KEYS, path, required=False)
    label_key = next((k for k in ArrayData.LABEL_KEYS if k in archive), None)
    stored = {key: array for key, array in archive.items() if key != label_key}
    if not model_inputs:  # text arrays beside the inputs (a word list) are not inputs
        stored = {key: array for key, array in stored.items() if array.dtype.kind in "fiub"}
    if labels is not None:
        labels = _as_labels(labels, path.name)
    if not model_inputs:  # no specs (TorchScript): the first axis is the sample axis
        count = next((len(a) for a in stored.values() if a.ndim), 0)
        axes = {key: 0 if a.ndim and len(a) == count else None for key, a in stored.items()}
        return NamedArrayData(stored, axes, labels, path.name)
    _check_input_names(path.name, list(stored), model_inputs)
    batch = _static_batch(model_inputs)
    arrays: dict[str, np.ndarray] = {}
    axes: dict[str, int | None] = {}
    for spec in model_inputs:
        arrays[spec.name], axes[spec.name] = _fit_input(stored[spec.name], spec, batch, path.name)
    ranks = {spec.name: len(spec.shape) for spec in model_inputs}
    short = [key for key, axis in axes.items() if axis is not None and arrays[key].ndim < ranks[key]]
    counts = {arrays[key].shape[axis] for key, axis in axes.items()
              if axis is not None and key not in short}
    size = counts.pop() if len(counts) == 1 else 1
    for key in short:  # one value for every sample: repeated along the input's sample axis
        arrays[key] = np.repeat(np.expand_dims(arrays[key], axes[key]), size, axis=axes[key])
    return NamedArrayData(arrays, axes, labels, path.name)


def _fit_input(array: np.ndarray, spec: TensorSpec, batch: int | None, where: str
               ) -> tuple[np.ndarray, int | None]:
    """`array` checked against one input spec and cast to its dtype, with its sample axis."""
    axis = spec_sample_axis(spec, batch)
    rank = len(spec.shape)
    if array.ndim == rank:
        per_sample = _without_axis(array.shape, axis)
        wanted = _without_axis(spec.shape, axis)  # type: ignore[arg-type]
    elif axis is not None and array.ndim == rank - 1:  # one value for every sample
        per_sample, wanted = array.shape, _without_axis(spec.shape, axis)  # type: ignore[arg-type]
    else:
        raise SlimscopeError(f"{where}: input {quote(spec.name)} has shape {array.shape}, but "
                             f"the model takes {_shape_text(spec.shape)}")
    if not _shape_matches(per_sample, wanted):
        raise SlimscopeError(f"{where}: input {quote(spec.name)} has samples of shape "
                             f"{_shape_text(per_sample)}, but the model takes "
                             f"{_shape_text(wanted)} per sample")
    dtype = _numpy_dtype(spec.dtype)
    if dtype is not None and array.dtype != dtype:
        if array.dtype.kind == "f" and dtype.kind in "iub":
            raise SlimscopeError(f"{where}: input {quote(spec.name)} holds {array.dtype} values, "
                                 f"but the model takes {spec.dtype}")
        if array.dtype.kind not in "fiub":
            raise SlimscopeError(f"{where}: input {quote(spec.name)} holds {array.dtype} values, "
                                 "which no model input takes")
        array = array.astype(dtype)
    return array, axis


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
        from PIL import Image

        bomb = SlimscopeError(f"{quote(path.name)}: refusing an image of more than "
                              f"{Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb?)")
        try:
            with Image.open(path) as image:  # reads the header only
                if image.width * image.height > Image.MAX_IMAGE_PIXELS:
                    raise bomb
                pixels = image.convert(self._mode).resize(self._size, Image.Resampling.BILINEAR)
        except Image.DecompressionBombError:
            raise bomb from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            # Pillow's decoders report a corrupt file with any of these.
            raise SlimscopeError(f"{quote(path.name)}: cannot read image ({one_line(exc)})"
                                 ) from None
        array = np.asarray(pixels, dtype=np.float32).reshape(self._size[1], self._size[0], -1)
        array = (array / 255.0 - self._mean) / self._std  # HWC, channels broadcast last
        return array if self._channels_last else np.ascontiguousarray(array.transpose(2, 0, 1))

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.has_labels:
            return (f"image folder {self.name}: {len(self)} images in "
                    f"{len(self.class_names)} classes, as {shape}")
        return f"image folder {self.name}: {len(self)} unlabelled images, as {shape}"


#: Integer inputs named like these get ones (attention masks) or zeros (segment ids), since
#: random values there mean nothing a real input would hold.
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)
_ZERO_NAME = re.compile(r"token_type|segment", re.IGNORECASE)
#: Token ids are drawn below this, which every vocabulary of a real text model exceeds.
SYNTHETIC_ID_RANGE = 100


def _synthetic_array(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator
                     ) -> np.ndarray:
    """Random values fit for one input: floats standard normal, ids in a safe range, masks of
    ones, segment ids zero, booleans fair coins (masks all true)."""
    dtype = _numpy_dtype(spec.dtype)
    kind = dtype.kind if dtype is not None else "?"
    _check_fits_in_memory(f"synthetic data for input {quote(spec.name)}",
                          {spec.name: (shape, np.dtype(np.float32) if dtype is None else dtype)})
    if kind == "f":
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    if kind in "iu":
        if _MASK_NAME.search(spec.name):
            return np.ones(shape, dtype)
        if _ZERO_NAME.search(spec.name):
            return np.zeros(shape, dtype)
        return rng.integers(0, SYNTHETIC_ID_RANGE, shape).astype(dtype)
    if kind == "b":
        return np.ones(shape, bool) if _MASK_NAME.search(spec.name) else rng.random(shape) < 0.5
    raise SlimscopeError(f"cannot make synthetic data of type {spec.dtype} for input "
                         f"{quote(spec.name)}")


def _synthetic_shape(spec: TensorSpec, axis: int | None, count: int,
                     shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The whole array shape for `count` samples: the spec's sizes, with `shapes` filling the
    dynamic axes other than the sample axis (whose entry there is ignored)."""
    given = shapes.get(spec.name)
    if given is not None and len(given) != len(spec.shape):
        raise SlimscopeError(f"the shape given for input {quote(spec.name)} has {len(given)} "
                             f"axes, but the model takes {_shape_text(spec.shape)}")
    if axis is None and not spec.shape:
        if spec.name not in shapes:
            raise SlimscopeError(
                f"synthetic data cannot guess the scalar input {quote(spec.name)} (a setting "
                "such as a sample rate); give an .npz with one array per input name")
    sizes = []
    for index, size in enumerate(spec.shape):
        fixed = isinstance(size, int) and size > 0
        if index == axis:
            sizes.append(count)
        elif given is not None and int(given[index]) > 0:
            if fixed and int(given[index]) != size:
                raise SlimscopeError(
                    f"the shape given for input {quote(spec.name)} sets axis {index} to "
                    f"{int(given[index])}, but the model fixes it at {size} in "
                    f"{_shape_text(spec.shape)}")
            sizes.append(int(given[index]))
        elif fixed:
            sizes.append(size)
        else:
            raise SlimscopeError(
                f"synthetic data needs a fixed input size, but input {quote(spec.name)} has "
                f"shape {_shape_text(spec.shape)}; give its shape (e.g. --input-shape "
                f"{spec.name}=1,...) or real data instead")
    return tuple(sizes)


class SyntheticData(ArraySource):
    """Seeded random inputs shaped like the model's single input, for fidelity checks without
    data (see :func:`synthetic_data`, which also serves models with several inputs).

    The batch axis is the first axis when it is dynamic (or static); other dynamic axes take
    their size from `shapes` (input name -> whole shape), or are refused.
    """

    synthetic = True

    def __init__(self, input_specs: Sequence[TensorSpec], count: int = DEFAULT_SYNTHETIC_COUNT,
                 seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        spec = _single_input(input_specs, "synthetic data")
        if count < 1:
            raise SlimscopeError(f"synthetic data needs at least one sample, not {count}")
        shape = _synthetic_shape(spec, 0, count, shapes or {})
        inputs = _synthetic_array(spec, shape, np.random.default_rng(seed))
        super().__init__(inputs, None, f"synthetic (seed {seed})")


class SyntheticNamedData(NamedArrayData):
    """Seeded random inputs for a model with several inputs, each following its own spec
    (dtype, sample axis; `shapes` fills other dynamic axes)."""

    synthetic = True

    def __init__(self, input_specs: Sequence[TensorSpec], count: int = DEFAULT_SYNTHETIC_COUNT,
                 seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        if count < 1:
            raise SlimscopeError(f"synthetic data needs at least one sample, not {count}")
        rng = np.random.default_rng(seed)
        batch = _static_batch(input_specs)
        arrays, axes = {}, {}
        for spec in input_specs:
            axis = spec_sample_axis(spec, batch)
            given = dict(shapes or {})
            if axis is None and spec.name in given:  # a scalar given as a value, e.g. sr=16000
                dtype = _numpy_dtype(spec.dtype) or np.dtype(np.float32)
                value = np.asarray(given[spec.name]).reshape(-1)
                if value.size != 1:
                    raise SlimscopeError(f"the scalar input {quote(spec.name)} takes one value")
                arrays[spec.name], axes[spec.name] = value[0].astype(dtype).reshape(()), None
                continue
            shape = _synthetic_shape(spec, axis, count, given)
            arrays[spec.name], axes[spec.name] = _synthetic_array(spec, shape, rng), axis
        super().__init__(arrays, axes, None, f"synthetic (seed {seed})")


def synthetic_data(input_specs: Sequence[TensorSpec], count: int = DEFAULT_SYNTHETIC_COUNT,
                   seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None
                   ) -> DataSource:
    """Synthetic inputs for whatever inputs the model has (one array, or arrays by name)."""
    if len(input_specs) > 1:
        return SyntheticNamedData(input_specs, count, seed, shapes)
    return SyntheticData(input_specs, count, seed, shapes)


def open_data(spec: str, model_inputs: Sequence[TensorSpec], *,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              shapes: Mapping[str, Sequence[int]] | None = None) -> DataSource:
    """The source a user named, checked against the model's inputs.

    `spec` is "demo" (the digits test split; "demo:train" / "demo:calibration" for the others),
    "synthetic" or "synthetic:COUNT" (optionally followed by ``;NAME=SHAPE`` parts giving
    inputs' sizes, see :func:`synthetic_spec`), a folder of images, or a .npy/.npz file.
    `mean`/`std` apply to image folders only; `shapes` (input name -> whole shape, or a value
    for a scalar input) fills the dynamic sizes synthetic data cannot guess.
    """
    kind, _, argument = spec.partition(":")
    if kind == "demo":
        source: DataSource = DigitsData(argument or "test")  # type: ignore[arg-type]
    elif kind == "synthetic":
        count, given = parse_synthetic_spec(spec)
        if not model_inputs:
            _single_input(model_inputs, "synthetic data")
        return synthetic_data(model_inputs, count=count, shapes={**given, **(shapes or {})})
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            return ImageFolderData(path, _image_input_shape(model_inputs), mean=mean, std=std)
        if path.suffix.lower() == ".npz" and _npz_holds_named_inputs(path, model_inputs):
            return named_array_data(path, model_inputs)
        if path.suffix.lower() in (".npy", ".npz"):
            source = ArrayData(path, model_inputs[0].name if len(model_inputs) == 1 else None)
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


def _pick(archive: Mapping[str, np.ndarray], keys: Sequence[str], path: Path,
          required: bool) -> np.ndarray | None:
    for key in keys:
        if key in archive:
            return archive[key]
    if required:
        raise SlimscopeError(f"{path.name}: no inputs array (name it one of {', '.join(keys)}; "
                             f"found {', '.join(map(quote, archive)) or 'nothing'})")
    return None


def _as_labels(labels: np.ndarray, name: str) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SlimscopeError(f"{name}: labels must be one whole-number class index per sample, "
                             f"not {labels.dtype} of shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise SlimscopeError(f"{name}: labels must not be negative")
    return labels.astype(np.int64)




# -- what a use case runs on --------------------------------------------------------------------
#: Data the bundled demo model uses when none is named, by role (the CLI's and the app's default).
DEMO_DEFAULTS = {"evaluation": "demo", "calibration": "demo:calibration", "train": "demo:train"}


@dataclass(frozen=True)
class DataSpec:
    """The data a use case runs on, as :func:`open_data` specs, one per role; None is none.

    One type for the CLI's ``--data/--calibration/--train-data/--samples`` and the app's data
    choices, so both faces hand the engine the same thing (engine.workflows). `evaluation` is
    what metrics, sensitivity and plan checks measure on; `calibration` feeds gradient scores,
    tracing, int8 calibration and the choice of the best recovery step (the first evaluation
    samples when None); `train` is what recovery learns from. `limit` caps the evaluation
    samples (0: all); `shapes` fills dynamic input sizes synthetic data cannot guess.
    """

    evaluation: str | None = None
    calibration: str | None = None
    train: str | None = None
    limit: int = 0
    shapes: Mapping[str, Sequence[int]] | None = field(default=None, hash=False)

    def effective(self, model_is_demo: bool) -> "DataSpec":
        """The spec with the demo's defaults filled in: the demo model evaluates on "demo",
        calibrates on "demo:calibration" and trains on "demo:train"; any other model has no data
        until someone names some (then calibration and training data follow the demo only when
        evaluation is the demo)."""
        evaluation = self.evaluation or (DEMO_DEFAULTS["evaluation"] if model_is_demo else None)
        demo = evaluation == DEMO_DEFAULTS["evaluation"]
        return replace(self, evaluation=evaluation,
                       calibration=self.calibration or (DEMO_DEFAULTS["calibration"] if demo else None),
                       train=self.train or (DEMO_DEFAULTS["train"] if demo else None))

    def open(self, model_inputs: Sequence[TensorSpec]) -> "OpenedData":
        """Every named source, opened and checked against the model's inputs (one line if one
        does not fit); `limit` applies to the evaluation data."""
        def opened(spec: str | None) -> DataSource | None:
            return open_data(spec, model_inputs, shapes=self.shapes) if spec else None

        evaluation = opened(self.evaluation)
        if evaluation is not None and self.limit:
            evaluation = evaluation.head(self.limit)
        return OpenedData(evaluation, opened(self.calibration), opened(self.train))

    def read_inputs(self) -> list[tuple[str, Path | None]]:
        """The files and folders this spec reads, labelled, for refusing them as outputs."""
        from engine.safe_write import data_input

        return [data_input("data", self.evaluation), data_input("calibration data", self.calibration),
                data_input("training data", self.train)]


@dataclass(frozen=True)
class OpenedData:
    """The sources a :class:`DataSpec` names, opened (None where it names none)."""

    evaluation: DataSource | None = None
    calibration: DataSource | None = None
    train: DataSource | None = None


# -- does this data fit this model? (asked before any work, e.g. by the app's data dialog) ----
#: Separates the parts of a synthetic spec: ``synthetic:64;input_ids=1,16;sr=16000``.
SPEC_PART_SEPARATOR = ";"


def synthetic_spec(count: int = DEFAULT_SYNTHETIC_COUNT,
                   shapes: Mapping[str, Sequence[int] | int | float] | None = None) -> str:
    """The spec string :func:`open_data` reads as synthetic data of `count` samples whose
    inputs take the given sizes (input name -> whole shape, the sample axis' entry ignored; or
    a value for a scalar input). Kept in one string so a project file and the CLI's ``--data``
    carry it unchanged."""
    parts = [f"synthetic:{int(count)}"]
    for name, shape in (shapes or {}).items():
        if SPEC_PART_SEPARATOR in name:
            raise SlimscopeError(f"input {quote(name)} has a {SPEC_PART_SEPARATOR!r} in its name, "
                                 "so its size cannot go in a data spec; give an .npz instead")
        sizes = [shape] if isinstance(shape, (int, float)) else list(shape)
        parts.append(f"{name}={','.join(str(size) for size in sizes)}")
    return SPEC_PART_SEPARATOR.join(parts)


def parse_synthetic_spec(spec: str) -> tuple[int, dict[str, tuple[int | float, ...]]]:
    """(count, sizes by input name) of a spec :func:`synthetic_spec` wrote ("synthetic",
    "synthetic:64", "synthetic:64;input_ids=1,16")."""
    head, *parts = spec.split(SPEC_PART_SEPARATOR)
    argument = head.partition(":")[2]
    if argument and not argument.isdigit():
        raise SlimscopeError(f"synthetic:COUNT needs a whole number, not {quote(argument)}")
    count = int(argument) if argument else DEFAULT_SYNTHETIC_COUNT
    if count < 1:
        raise SlimscopeError(f"synthetic data needs at least one sample, not {count}")
    shapes: dict[str, tuple[int | float, ...]] = {}
    for part in parts:
        name, equals, sizes = part.rpartition("=")
        if not equals or not name:
            raise SlimscopeError(f"{quote(part)} in the data spec is not NAME=SIZES "
                                 "(e.g. input_ids=1,16)")
        try:
            shapes[name] = tuple(float(size) if "." in size or "e" in size.lower() else int(size)
                                 for size in sizes.split(",") if size.strip())
        except ValueError:
            raise SlimscopeError(f"{quote(part)} in the data spec: sizes must be numbers "
                                 "separated by commas") from None
    return count, shapes


def missing_sizes(model_inputs: Sequence[TensorSpec]) -> list[tuple[str, int, str]]:
    """The sizes synthetic data cannot take from the model: (input name, axis, the size's name
    in the file or "" when it has none) for every dynamic axis that is not the input's sample
    axis, and (name, -1, "") for every scalar input (a setting such as a sample rate)."""
    batch = _static_batch(model_inputs)
    missing: list[tuple[str, int, str]] = []
    for spec in model_inputs:
        if not spec.shape:
            missing.append((spec.name, -1, ""))
            continue
        sample = spec_sample_axis(spec, batch)
        for axis, size in enumerate(spec.shape):
            if axis != sample and not (isinstance(size, int) and size > 0):
                missing.append((spec.name, axis, size if isinstance(size, str) else ""))
    return missing


def digits_fit(model_inputs: Sequence[TensorSpec]) -> str | None:
    """None when the demo digits (1×8×8 float images) fit the model's inputs, else one line why
    not. A model that records no inputs (TorchScript) may still take them."""
    if not model_inputs:
        return None
    if len(model_inputs) > 1:
        return (f"the demo digits feed one input, but this model takes {len(model_inputs)} "
                f"({', '.join(map(quote, (spec.name for spec in model_inputs)))})")
    spec = model_inputs[0]
    per_sample = tuple(spec.shape[1:])
    wanted = DIGITS_INPUT_SHAPE
    fixed = [d for d in per_sample if not (isinstance(d, int) and d > 0)]
    squeezed = tuple(d for d in per_sample if d != 1)
    dtype = _numpy_dtype(spec.dtype)
    if fixed or squeezed != tuple(d for d in wanted if d != 1) or (dtype is not None
                                                                  and dtype.kind != "f"):
        return (f"the demo digits are {_shape_text(wanted)} float images, but input "
                f"{quote(spec.name)} takes {_shape_text(per_sample)} {spec.dtype} per sample")
    return None


def check_data_fits(model_inputs: Sequence[TensorSpec], spec: str) -> str | None:
    """None when the data `spec` names (as :func:`open_data` reads it) fits the model's inputs
    by names, dtypes and shapes, else the one-line reason. Reads only what it must: array
    files' headers, an image folder's listing; nothing is decoded, so the app may ask it on
    every keystroke. What it cannot know (inputs a file does not record) it lets pass; the
    worker's :func:`open_data` checks again."""
    try:
        _check_fits(model_inputs, spec)
    except SlimscopeError as exc:
        return one_line(exc)
    return None


def _check_fits(model_inputs: Sequence[TensorSpec], spec: str) -> None:
    kind, _, argument = spec.partition(":")
    if kind == "demo":
        if argument and argument not in DIGITS_SPLITS:
            raise SlimscopeError(f"unknown digits split {quote(argument)} "
                                 f"(choose {', '.join(DIGITS_SPLITS)})")
        reason = digits_fit(model_inputs)
        if reason:
            raise SlimscopeError(reason)
        return
    if kind == "synthetic":
        count, shapes = parse_synthetic_spec(spec)
        if not model_inputs:
            _single_input(model_inputs, "synthetic data")
        batch = _static_batch(model_inputs)
        for input_spec in model_inputs:
            axis = spec_sample_axis(input_spec, batch) if len(model_inputs) > 1 else 0
            if not input_spec.shape and input_spec.name in shapes:
                if len(shapes[input_spec.name]) != 1:
                    raise SlimscopeError(f"the scalar input {quote(input_spec.name)} takes one value")
                continue
            _synthetic_shape(input_spec, axis, count, shapes)  # raises naming what is missing
            _synthetic_array(input_spec, (0,), np.random.default_rng(0))  # a dtype it can make
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        _image_input_shape(model_inputs)
        has_images = any(_images_in(path)) or any(
            _images_in(sub) for sub in path.iterdir() if sub.is_dir() and not sub.name.startswith("."))
        if not has_images:
            raise SlimscopeError(f"{path.name}: no images found (expected one subfolder per class)")
        return
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        if path.exists():
            raise SlimscopeError(f"{path.name}: unsupported data file (use a folder of images, "
                                 ".npy or .npz)")
        raise SlimscopeError(f"{quote(spec)}: no such data (expected 'demo', 'synthetic', a "
                             "folder of images, or a .npy/.npz file)")
    headers = _array_headers(path)
    if not model_inputs:
        return
    if suffix == ".npz" and len(model_inputs) > 1:
        _check_named_headers(path.name, headers, model_inputs)
        return
    input_spec = _single_input(model_inputs, "evaluation data")
    if suffix == ".npy":
        shape, dtype = headers[""]
    else:
        key = next((k for k in (*ArrayData.INPUT_KEYS, input_spec.name) if k in headers), None)
        if key is None:
            raise SlimscopeError(f"{path.name}: no inputs array (name it one of "
                                 f"{', '.join((*ArrayData.INPUT_KEYS, input_spec.name))}; found "
                                 f"{', '.join(map(quote, headers)) or 'nothing'})")
        shape, dtype = headers[key]
    per_sample, wanted = shape[1:], tuple(input_spec.shape[1:])
    if len(shape) < 2:
        raise SlimscopeError(f"{path.name}: inputs have shape {shape}; expected (samples, ...) "
                             "with at least one axis per sample")
    if not _shape_matches(per_sample, wanted):
        squeezed = tuple(d for d in per_sample if d != 1)
        if not (all(isinstance(d, int) for d in wanted)
                and squeezed == tuple(d for d in wanted if d != 1)):
            raise SlimscopeError(f"{path.name} has samples of shape {_shape_text(per_sample)}, "
                                 f"but the model input {quote(input_spec.name)} takes "
                                 f"{_shape_text(wanted)} per sample")
    _check_dtype(path.name, input_spec, dtype)


def _check_named_headers(where: str, headers: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                         model_inputs: Sequence[TensorSpec]) -> None:
    """:func:`named_array_data`'s checks on array headers: one array per input name, nothing
    else, per-sample sizes as the spec fixes them, dtypes that cast."""
    stored = {key: value for key, value in headers.items() if key not in ArrayData.LABEL_KEYS}
    _check_input_names(where, list(stored), model_inputs)
    batch = _static_batch(model_inputs)
    for spec in model_inputs:
        shape, dtype = stored[spec.name]
        axis = spec_sample_axis(spec, batch)
        rank = len(spec.shape)
        if len(shape) == rank:
            per_sample = _without_axis(shape, axis)
        elif axis is not None and len(shape) == rank - 1:
            per_sample = tuple(shape)
        else:
            raise SlimscopeError(f"{where}: input {quote(spec.name)} has shape {tuple(shape)}, "
                                 f"but the model takes {_shape_text(spec.shape)}")
        expected = _without_axis(spec.shape, axis)  # type: ignore[arg-type]
        if not _shape_matches(per_sample, expected):
            raise SlimscopeError(f"{where}: input {quote(spec.name)} has samples of shape "
                                 f"{_shape_text(per_sample)}, but the model takes "
                                 f"{_shape_text(expected)} per sample")
        _check_dtype(where, spec, dtype)


def _check_dtype(where: str, spec: TensorSpec, have: np.dtype) -> None:
    wanted = _numpy_dtype(spec.dtype)
    if wanted is None or have == wanted:
        return
    if have.kind == "f" and wanted.kind in "iub":
        raise SlimscopeError(f"{where}: input {quote(spec.name)} holds {have} values, but the "
                             f"model takes {spec.dtype}")
    if have.kind not in "fiub":
        raise SlimscopeError(f"{where}: input {quote(spec.name)} holds {have} values, which no "
                             "model input takes")


#: One data file may ask for at most this share of the machine's memory: arrays are read whole.
DATA_MEMORY_SHARE = 0.5
#: Array dtypes a data file may hold: numbers, and text (a word list beside the inputs).
_DATA_KINDS = frozenset("biufUS")


def _array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in a .npy ("" as the key) or .npz, from the headers
    alone (a multi-gigabyte file costs a few reads), each checked before any array is read:
    only a regular file; an .npz without duplicate names or zip bombs; numbers or text, never
    Python objects (they would be unpickled); no header claiming more bytes than follow it;
    all arrays together within :data:`DATA_MEMORY_SHARE` of this machine's memory."""
    import zipfile

    from engine.formats.guard import check_zip, element_count, regular_file

    if not path.exists():
        raise SlimscopeError(f"{quote(str(path))}: no such data file")
    file_size = regular_file(path, "data", SlimscopeError).st_size
    name = quote(path.name)

    def header(stream: "object", stored: int, key: str) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(stream)  # type: ignore[arg-type]
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = reader(stream)  # type: ignore[arg-type]
        where = f"{name}: array {quote(key)}" if key else name
        if dtype.kind not in _DATA_KINDS or dtype.hasobject:
            raise SlimscopeError(f"{where} holds {quote(str(dtype))} values; data files hold "
                                 "numbers or text (Python objects would have to be unpickled)")
        need = element_count(where, shape) * dtype.itemsize
        follows = stored - stream.tell()  # type: ignore[attr-defined]
        if need > follows:
            raise SlimscopeError(f"{where}: its header claims {_shape_text(shape)} {dtype} "
                                 f"({need} bytes), but only {follows} bytes follow it")
        return tuple(int(d) for d in shape), np.dtype(dtype)

    headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        if path.suffix.lower() == ".npy":
            with path.open("rb") as stream:
                headers[""] = header(stream, file_size, "")
        else:
            with zipfile.ZipFile(path) as archive:
                check_zip(archive, file_size, path.name)
                for info in archive.infolist():
                    if info.filename.endswith(".npy"):
                        key = info.filename[:-len(".npy")]
                        with archive.open(info) as stream:
                            headers[key] = header(stream, info.file_size, key)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SlimscopeError(f"{name}: not a readable numpy file ({one_line(exc)})") from None
    _check_fits_in_memory(name, headers)
    return headers


def _check_fits_in_memory(name: str, headers: Mapping[str, tuple[tuple[int, ...], np.dtype]]
                          ) -> None:
    need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX: no honest figure to hold it to
        return
    if need > DATA_MEMORY_SHARE * memory:
        raise SlimscopeError(f"{name}: needs {need / 2**30:.1f} GiB in memory, more than "
                             f"half of this machine's {memory / 2**30:.1f} GiB; use fewer or "
                             "smaller samples")


def _image_input_shape(model_inputs: Sequence[TensorSpec]) -> tuple[int, ...]:
    """The per-sample shape images are sized to for the model's one input ((1 or 3, H, W) or
    channels last, H and W fixed), or a SlimscopeError saying why images cannot feed it."""
    spec = _single_input(model_inputs, "an image folder")
    shape = spec.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise SlimscopeError(f"cannot size images for input {quote(spec.name)} of shape "
                             f"{_shape_text(spec.shape)}: its image size is not fixed")
    _image_layout(tuple(shape))  # type: ignore[arg-type]
    return tuple(shape)  # type: ignore[arg-type]


def image_folder_fit(model_inputs: Sequence[TensorSpec]) -> str | None:
    """None when images can be sized for the model's one input ((1 or 3, H, W) or channels
    last, H and W fixed), else one line why not."""
    try:
        _image_input_shape(model_inputs)
    except SlimscopeError as exc:
        return one_line(exc)
    return None


def synthetic_values_text(spec: TensorSpec) -> str:
    """What synthetic data puts in an input, in a few words (as :func:`_synthetic_array` does)."""
    dtype = _numpy_dtype(spec.dtype)
    kind = dtype.kind if dtype is not None else "?"
    if not spec.shape:
        return "the value you give"
    if kind == "f":
        return "random normal floats"
    if kind in "iu":
        if _MASK_NAME.search(spec.name):
            return "ones (a mask)"
        if _ZERO_NAME.search(spec.name):
            return "zeros (segment ids)"
        return f"random integers 0–{SYNTHETIC_ID_RANGE - 1} (token ids)"
    if kind == "b":
        return "all true (a mask)" if _MASK_NAME.search(spec.name) else "random true/false"
    return f"none: type {spec.dtype} cannot be made up"


def shape_text(shape: Sequence[int | str | None]) -> str:
    """``(batch, 3, 224, 224)``: a shape as messages show it, dynamic sizes by name or "?"."""
    return _shape_text(shape)
