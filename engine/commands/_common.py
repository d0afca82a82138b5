"""Pieces every subcommand shares: the model argument, loading, and writing results."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

from engine.errors import SlimscopeError
from engine.formats import LoadOptions, load_model
from engine.model import Model
from engine.safe_write import Input, check_outputs


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224), with a usage error for anything else."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected e.g. 1,3,224,224)")
    if not shape or any(dim <= 0 for dim in shape):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (dimensions must be positive)")
    return shape


def parse_named_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """'input_ids=1,128' -> ('input_ids', (1, 128)); a bare '1,3,224,224' has no name."""
    name, separator, shape = text.rpartition("=")
    if separator and not name.strip():
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (expected NAME=1,128)")
    return (name.strip() or None), parse_shape(shape)


def named_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]] | None:
    """The `--input-shape NAME=...` sizes, for synthetic data of models with dynamic inputs."""
    named = {name: shape for name, shape in args.input_shape if name is not None}
    return named or None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model file: .pt/.pth/.bin, TorchScript, .pt2, .onnx, "
                        ".safetensors (the format is read from the content), or 'demo'")
    parser.add_argument("--trust", action="store_true",
                        help="allow loading a pickled module, which runs code from the file")
    parser.add_argument("--input-shape", type=parse_named_shape, metavar="[NAME=]SHAPE",
                        action="append", default=[],
                        help="input shape such as 1,3,224,224, for MACs when the file has none; "
                             "NAME=1,128 sizes one named input for synthetic data (repeatable)")


def resolve_model_path(text: str) -> Path:
    if text == "demo":
        from engine.demo import DEMO_MODEL

        return DEMO_MODEL
    return Path(text)


def guard_outputs(args: argparse.Namespace, outputs: Sequence[str | Path | None],
                  *inputs: Input) -> None:
    """Before any work: refuse outputs that are inputs (the model always among them), folders,
    or not writable. Each refusal is one line."""
    check_outputs(outputs, [("model", resolve_model_path(args.model)), *inputs])


def load_from_args(args: argparse.Namespace) -> Model:
    unnamed = [shape for name, shape in args.input_shape if name is None]
    options = LoadOptions(trust=args.trust, input_shape=unnamed[-1] if unnamed else None)
    return load_model(resolve_model_path(args.model), options)


def write_json(data: Any, destination: str | None) -> None:
    """JSON to a file (atomically) or to stdout when `destination` is None or '-'.

    The top two levels are indented and every deeper value is one line from json's C encoder,
    written in batches: ``indent=2`` runs json's pure-Python encoder, whose 29M pieces took
    75 s for a 300k-layer report (and ``dumps`` held them all at once, 2 GiB).
    """
    if destination in (None, "-"):
        _write_json_pieces(data, sys.stdout)
        return
    from engine.safe_write import atomic_path, write_error

    with atomic_path(Path(destination)) as temp:
        try:
            with temp.open("w", encoding="utf-8") as stream:
                _write_json_pieces(data, stream)
        except OSError as exc:
            raise write_error(exc, Path(destination)) from None


#: Container levels laid out over lines; below them a value is one line (a layer, a row).
_JSON_OUTLINE_DEPTH = 2
_JSON_BATCH = 4096


def _write_json_pieces(data: Any, stream: IO[str]) -> None:
    encode = json.JSONEncoder(default=_json_default, allow_nan=True).encode
    batch: list[str] = []
    for piece in _json_pieces(data, encode, 0):
        batch.append(piece)
        if len(batch) >= _JSON_BATCH:
            stream.write("".join(batch))
            batch.clear()
    batch.append("\n")
    stream.write("".join(batch))


def _json_pieces(value: Any, encode: Callable[[Any], str], depth: int) -> Iterator[str]:
    if depth >= _JSON_OUTLINE_DEPTH or not isinstance(value, (dict, list, tuple)) or not value:
        yield encode(value)
        return
    inner, outer = "\n" + "  " * (depth + 1), "\n" + "  " * depth
    is_dict = isinstance(value, dict)
    yield "{" if is_dict else "["
    items = value.items() if is_dict else enumerate(value)
    for index, (key, item) in enumerate(items):
        yield ("," if index else "") + inner
        if is_dict:
            yield encode({key: 0})[1:-4] + ": "  # a key as json writes it (ints, bools...)
        yield from _json_pieces(item, encode, depth + 1)
    yield outer + ("}" if is_dict else "]")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def human_count(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:.0f}"


def print_progress(fraction: float, message: str = "") -> None:
    """A one-line progress bar on an interactive terminal; piped (a CI log, `tee`), a plain
    line every PIPED_PROGRESS_S at most, so long work shows it is alive without flooding."""
    global _last_piped_line
    if sys.stderr.isatty():
        print(f"\r[{fraction:5.1%}] {message[:70]:<70}", end="", file=sys.stderr, flush=True)
        return
    now = time.monotonic()
    if now - _last_piped_line >= PIPED_PROGRESS_S:
        _last_piped_line = now
        print(f"[{fraction:5.1%}] {message[:100]}", file=sys.stderr, flush=True)


#: Seconds between progress lines when stderr is not a terminal.
PIPED_PROGRESS_S = 5.0
_last_piped_line = time.monotonic()


def fail(message: str) -> None:
    raise SlimscopeError(message)
