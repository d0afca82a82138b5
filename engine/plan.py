r"""A compression plan: plain data keyed by layer-name strings, resolved by priority.

A plan never holds live modules, so a plan saved from the GUI replays identically from the CLI
and on a fresh load of the same model. Settings come in three *sections* — ``pruning``,
``quantization`` and ``low_rank`` — given at four levels, resolved like torch's
``QConfigMapping``: **defaults < kinds < patterns < layers** (exact names).

* A section set at a higher level replaces the whole section from lower levels (fields are
  not merged one by one, so what a layer gets is always one readable block of the file).
* A section set to ``null`` switches that technique off for the matched layers; ``keep``
  (or ``{keep: true}``) switches all three off.
* Pattern keys are shell-style globs (``fnmatch``, case-sensitive); a key starting with
  ``re:`` is a regular expression that must match the whole name. When several patterns match
  a layer, the later one in the file wins. Regular expressions run on RE2 (``google-re2``),
  whose matching time is linear in the name's length, so ``re:(a+)+b`` cannot freeze the app;
  the price is that backreferences and lookarounds are refused with a clear error. Patterns
  are at most :data:`MAX_PATTERN_CHARS` long.
* Defaults and patterns apply a section only to layer kinds that can take it (a ``features.*``
  pattern does not try to quantize the BatchNorms it also matches). Kind and exact-name
  overrides are explicit, so asking them for something the kind cannot do is an error.
* Every kind, pattern and exact name must match at least one layer, otherwise resolution fails
  with :class:`PlanError`: we chose an error over a warning because a typo would otherwise
  silently compress nothing, and warnings are easy to miss in the CLI.

Value rules (checked per layer in :meth:`Plan.resolve`, the error names layer and field):
pruning ``amount`` in [0, 1); ``pattern`` "N:M" with 1 <= N <= M <= 64, M dividing the input
channels; quantization ``bits`` 2..8 or "fp16"/"bf16"; ``group_size`` dividing the row length
(``prod(weight.shape[1:])``, i.e. in_features, or in_channels*kh*kw for a conv); low-rank
``rank`` >= 1 and <= min(out, row length), a multiple of the layer's group size and N:M M
(it is the second factor's input), or ``energy`` in (0, 1]; ``structured`` only on
Conv1d/2d/3d and Linear; every ``magnitude-global`` layer shares one amount. Quantization
``method`` is "rtn" (round to nearest, the default), "gptq" (error-compensated, integer bits
only; ``act_order`` true/false, ``damping`` in (0, 1]) or "awq" (activation-aware input-channel
scales searched per layer, then round to nearest; ONNX MatMul/Gemm weights); pruning method "obs" takes an amount or
an N:M pattern; both need calibration data and layers whose input statistics can be collected
(:data:`STATISTICS_KINDS`). ``bias_correction: true`` beside the sections (any level) shifts
the bias of a pruned or quantized layer so its mean output on the calibration data is unchanged.

Example (YAML; JSON has the same structure)::

    version: 1
    defaults:
      pruning: {method: magnitude, amount: 0.5}
      quantization: {bits: 8, symmetric: true, granularity: per-channel, range: minmax}
    kinds:
      Linear:
        quantization: {bits: 4, symmetric: false, granularity: group, group_size: 32, range: mse}
      Conv2d:                      # GPTQ: rounding errors compensated from calibration data
        quantization: {bits: 4, method: gptq, act_order: true}
        bias_correction: true
    patterns:
      "features.*":
        pruning: {method: nm, pattern: "2:4"}
      're:features\.(3|7)':   # single quotes: YAML keeps the backslash
        pruning: {method: structured, amount: 0.25}
    layers:
      features.0: keep
      classifier.1:
        low_rank: {energy: 0.9}
        quantization: {bits: fp16}
      classifier.4:
        pruning: null
    activation_quant: {calibration: percentile, percentile: 99.99, smoothing: 0.5}
    recovery: {epochs: 2}          # validated by engine.finetune, kept here as data
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Union

import yaml

from engine.errors import PlanError
from engine.model import PRUNABLE_KINDS, QUANTIZABLE_KINDS
from engine.parsing import (MAX_JSON_BYTES, MAX_YAML_BYTES, check_depth, load_json, load_yaml,
                            quote, read_text)
from engine.safe_write import atomic_write_text

PLAN_VERSION = 1

PRUNING_METHODS = ("magnitude", "magnitude-global", "gradient", "taylor", "nm", "structured", "obs")
#: "rtn": round to nearest (the default); "gptq": GPTQ's error-compensated rounding.
#: "awq": activation-aware scaling searched per layer, then round to nearest (weight-only).
QUANTIZATION_METHODS = ("rtn", "gptq", "awq")
#: Methods that need layer-input statistics from calibration data (engine.calibration_stats).
STATISTICS_METHODS = frozenset({"obs", "gptq", "awq"})
#: GPTQ's default damping: a fraction of the mean of the Hessian's diagonal.
DEFAULT_DAMPING = 0.01
GRANULARITIES = ("per-tensor", "per-channel", "group")
RANGE_METHODS = ("minmax", "mse")
FLOAT_FORMATS = ("fp16", "bf16")
MIN_BITS, MAX_BITS = 2, 8
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: Longest pattern key: enough for any real name pattern, small enough to compile instantly.
MAX_PATTERN_CHARS = 1000
#: Longest "N:M" text and largest M: beyond 64 an N:M group is unstructured pruning in effect.
MAX_NM_CHARS, MAX_NM_GROUP = 16, 64
#: Quote lengths in messages: names in the "where" part, offending values after it.
_KEY_QUOTE, _VALUE_QUOTE = 48, 60

#: Kinds whose output channels torch-pruning can physically remove.
STRUCTURED_KINDS = frozenset({"Conv1d", "Conv2d", "Conv3d", "Linear"})
#: Kinds with an input dimension along which N:M groups make sense (not embeddings).
NM_KINDS = PRUNABLE_KINDS - {"Embedding", "Gather", "LSTM", "GRU", "RNN"}
#: Kinds whose layer-input statistics can be collected, so GPTQ and OBS can take them: torch's
#: (engine.calibration_stats) and ONNX's (engine.sensitivity_backends.collect_input_moments).
STATISTICS_KINDS = frozenset({"Linear", "Conv1d", "Conv2d", "Conv", "Gemm", "MatMul"})
#: Kinds the SVD method can split into two layers.
LOW_RANK_KINDS = frozenset({"Linear", "Conv2d", "Gemm", "MatMul"})

SECTIONS = ("pruning", "quantization", "low_rank")
#: A per-layer switch beside the sections: after pruning or quantization, shift the layer's
#: bias so its mean output on the calibration data is unchanged (engine.methods.bias_correction).
BIAS_CORRECTION = "bias_correction"


@dataclass(frozen=True)
class Pruning:
    """Remove weights: `amount` is the fraction removed; method "nm" takes `pattern` instead,
    and "obs" either (OBS-style pruning with compensation, unstructured or N:M)."""

    method: str = "magnitude"
    amount: float | None = None
    pattern: str | None = None  # "N:M": at most N non-zeros in every M inputs

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M) of the pattern; only meaningful for method "nm"."""

        def fail(field_name: str, problem: str) -> None:
            raise PlanError(f"pruning.{field_name} {problem}")

        return _parse_nm(self.pattern or "2:4", fail)

    @property
    def is_nm(self) -> bool:
        """Whether an N:M pattern (not an amount) says what goes."""
        return self.method == "nm" or (self.method == "obs" and self.pattern is not None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.is_nm:
            out["pattern"] = self.pattern or "2:4"
        else:
            out["amount"] = self.amount
        return out


@dataclass(frozen=True)
class Quantization:
    """Weight quantization: integer `bits` (uniform codes) or a float format ("fp16", "bf16").

    `method` "rtn" rounds each weight to the nearest code; "gptq" rounds column by column and
    compensates each error with the columns not yet rounded (needs calibration data), with
    `act_order` (largest-input columns first) and `damping` (added to the Hessian's diagonal);
    "awq" scales each input channel by mean|X|^a (a searched per layer on calibration data)
    before rounding to nearest, the activation divided back in the graph (ONNX only).
    """

    bits: int | str = 8
    symmetric: bool = True
    granularity: str = "per-channel"
    group_size: int | None = None
    range: str = "minmax"
    method: str = "rtn"
    act_order: bool = False
    damping: float = DEFAULT_DAMPING

    @property
    def is_float(self) -> bool:
        return self.bits in FLOAT_FORMATS

    def to_dict(self) -> dict[str, Any]:
        if self.is_float:
            return {"bits": self.bits}
        out: dict[str, Any] = {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity,
            "range": self.range,
        }
        if self.granularity == "group":
            out["group_size"] = self.group_size
        if self.method != "rtn":
            out["method"] = self.method
        if self.method == "gptq":
            out["act_order"] = self.act_order
            out["damping"] = self.damping
        return out


@dataclass(frozen=True)
class LowRank:
    """Factorize into two layers of a fixed `rank`, or the smallest rank keeping `energy`
    (fraction of the sum of squared singular values)."""

    rank: int | None = None
    energy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank} if self.rank is not None else {"energy": self.energy}


Section = Union[Pruning, Quantization, LowRank]
#: The sections one level sets; a key present with value None switches the technique off.
#: The BIAS_CORRECTION key holds a bool instead.
Sections = dict[str, Union[Section, bool, None]]


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer after resolution; all three None means the layer is kept
    (`bias_correction` then has nothing to correct)."""

    pruning: Pruning | None = None
    quantization: Quantization | None = None
    low_rank: LowRank | None = None
    bias_correction: bool = False

    @property
    def keep(self) -> bool:
        return self.pruning is None and self.quantization is None and self.low_rank is None

    def to_dict(self) -> dict[str, Any] | str:
        sections: dict[str, Any] = {k: getattr(self, k) for k in SECTIONS}
        if self.bias_correction:
            sections[BIAS_CORRECTION] = True
        return _sections_to_data(sections)


@dataclass(frozen=True)
class ActivationQuant:
    """Static int8 activation quantization, applied by the ONNX exporter after calibration."""

    calibration: str = "minmax"
    percentile: float = 99.999
    #: ONNX node names whose activations stay in float (whole-model int8 breaks some models;
    #: the activation sensitivity sweep says which nodes), honoured by the int8 exporter.
    keep_float: tuple[str, ...] = ()
    #: SmoothQuant's migration strength α in (0, 1), or None: before calibration, each
    #: MatMul/Gemm input channel is divided by max|X_j|^α / max|W_j|^(1−α) and the weight
    #: multiplied by it (engine.methods.smoothquant), so int8 activations lose less to outliers.
    smoothing: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"calibration": self.calibration}
        if self.calibration == "percentile":
            out["percentile"] = self.percentile
        if self.keep_float:
            out["keep_float"] = list(self.keep_float)
        if self.smoothing is not None:
            out["smoothing"] = self.smoothing
        return out


class LayerInfo(NamedTuple):
    """What resolution needs to know about a layer; `shape` None skips the shape checks."""

    name: str
    kind: str
    shape: tuple[int, ...] | None = None


LayerSource = Union[Mapping[str, str], Iterable[Any]]


@dataclass
class Plan:
    """Global defaults plus overrides by layer kind, name pattern and exact name."""

    defaults: Sections = field(default_factory=dict)
    kinds: dict[str, Sections] = field(default_factory=dict)
    patterns: dict[str, Sections] = field(default_factory=dict)
    layers: dict[str, Sections] = field(default_factory=dict)
    activation_quant: ActivationQuant | None = None
    #: Fine-tuning settings, validated by engine.finetune; carried here untouched.
    recovery: dict[str, Any] | None = None

    # -- resolution ---------------------------------------------------------------------
    def resolve(self, layers: LayerSource) -> dict[str, LayerPlan]:
        """Every layer's settings after priority resolution, checked against its kind and shape.

        `layers` is a name -> kind mapping, or an iterable of objects with ``name``, ``kind``
        and ``shape`` (e.g. :class:`engine.model.Layer`), or of ``(name, kind[, shape])`` tuples.
        """
        infos = _layer_infos(layers)
        self._check_overrides_match(infos)
        if not (self.defaults or self.kinds or self.patterns or self.layers):
            kept = LayerPlan()  # frozen, so one "keep" serves every layer (300k took 1.3 s)
            return dict.fromkeys((info.name for info in infos), kept)
        resolved = {info.name: self._resolve_one(info) for info in infos}
        _check_global_amount(resolved)
        return resolved

    def _resolve_one(self, info: LayerInfo) -> LayerPlan:
        chosen: dict[str, tuple[Section | None, str]] = {}
        for origin, sections, explicit in self._levels_for(info):
            for key, section in sections.items():
                if key != BIAS_CORRECTION and section is not None and not explicit \
                        and not _applies(key, section, info.kind):
                    continue
                chosen[key] = (section, origin)
        for key, (section, origin) in chosen.items():
            if section is not None and key != BIAS_CORRECTION:
                _check_section(info, key, section, origin)
        layer_plan = LayerPlan(**{key: section for key, (section, _) in chosen.items()})
        _check_rank_splits(info, layer_plan)
        return layer_plan

    def _levels_for(self, info: LayerInfo) -> Iterable[tuple[str, Sections, bool]]:
        """(where it came from, sections, explicit?) from lowest to highest priority."""
        yield "defaults", self.defaults, False
        if info.kind in self.kinds:
            yield f"kinds[{_key(info.kind)}]", self.kinds[info.kind], True
        for pattern, sections in self.patterns.items():
            if pattern_matches(pattern, info.name):
                yield f"patterns[{_key(pattern)}]", sections, False
        if info.name in self.layers:
            yield f"layers[{_key(info.name)}]", self.layers[info.name], True

    def _check_overrides_match(self, infos: list[LayerInfo]) -> None:
        names = {info.name for info in infos}
        kinds = {info.kind for info in infos}
        for kind in self.kinds:
            if kind not in kinds:
                raise PlanError(f"plan kinds[{_key(kind)}]: no layer of this kind in the model")
        for pattern in self.patterns:
            if not any(pattern_matches(pattern, name) for name in names):
                raise PlanError(f"plan patterns[{_key(pattern)}]: the pattern matches no layer")
        for name in self.layers:
            if name not in names:
                raise PlanError(f"layer {_key(name)}: no layer of this name in the model")

    # -- plain data ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": PLAN_VERSION}
        if self.defaults:
            out["defaults"] = _sections_to_data(self.defaults)
        for level in ("kinds", "patterns", "layers"):
            table = getattr(self, level)
            if table:
                out[level] = {key: _sections_to_data(s) for key, s in table.items()}
        if self.activation_quant is not None:
            out["activation_quant"] = self.activation_quant.to_dict()
        if self.recovery is not None:
            out["recovery"] = self.recovery
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """A plan from plain data; anything malformed, of any type or depth, is one PlanError."""
        if not isinstance(data, Mapping):
            raise PlanError(f"plan: expected a mapping at the top level, got {_value(data)}")
        check_depth(data, "plan", error=PlanError)
        _reject_unknown(
            "plan", data,
            {"version", "defaults", "kinds", "patterns", "layers", "activation_quant", "recovery"},
        )
        version = data.get("version", PLAN_VERSION)
        if not _is_int(version) or version != PLAN_VERSION:
            raise PlanError(f"plan version: {_value(version)} is not supported (expected {PLAN_VERSION})")
        tables: dict[str, dict[str, Sections]] = {}
        for level in ("kinds", "patterns", "layers"):
            raw = data.get(level)
            if raw is None:
                raw = {}
            if not isinstance(raw, Mapping):
                raise PlanError(f"plan {level}: expected a mapping of names to settings, got {_value(raw)}")
            tables[level] = {}
            for k, v in raw.items():
                name = _name_key(level, k)
                tables[level][name] = _sections_from_data(f"{level}[{_key(name)}]", v)
        for pattern in tables["patterns"]:
            _compile_pattern(pattern)
        recovery = data.get("recovery")
        if recovery is not None and not isinstance(recovery, Mapping):
            raise PlanError(f"plan recovery: expected a mapping, got {_value(recovery)}")
        defaults = data.get("defaults")
        return cls(
            defaults=_sections_from_data("defaults", {} if defaults is None else defaults),
            kinds=tables["kinds"],
            patterns=tables["patterns"],
            layers=tables["layers"],
            activation_quant=_activation_from_data(data.get("activation_quant")),
            recovery=dict(recovery) if recovery is not None else None,
        )

    def save(self, path: str | Path) -> None:
        """Write YAML (.yaml/.yml) or JSON (.json), chosen by the file extension."""
        path = Path(path)
        data = self.to_dict()
        if _is_yaml(path):
            text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
        else:
            text = json.dumps(data, indent=2) + "\n"
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a YAML or JSON plan, bounded in size and nesting (see engine.parsing)."""
        path = Path(path)
        is_yaml = _is_yaml(path)
        limit = MAX_YAML_BYTES if is_yaml else MAX_JSON_BYTES
        text = read_text(path, what="plan", limit=limit, error=PlanError)
        where = f"plan {quote(path.name)}"
        data = load_yaml(text, where, error=PlanError) if is_yaml else load_json(text, where, error=PlanError)
        return cls.from_dict({} if data is None else data)


# -- patterns ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _compile_pattern(pattern: str) -> Any:
    """A compiled matcher with ``fullmatch``: RE2 for ``re:`` keys, Python's re for globs.

    Globs need no RE2: ``fnmatch.translate`` (Python 3.11+) emits atomic groups, which keep
    even a many-star glob linear. Python's own compile checks ``re:`` syntax first, so a typo
    gets the familiar message and only RE2's limits get the linear-time one.
    """
    where = f"plan patterns[{_key(pattern)}]"
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PlanError(f"{where}: the pattern is {len(pattern)} characters long, "
                        f"more than the {MAX_PATTERN_CHARS} allowed")
    if not pattern.startswith("re:"):
        return re.compile(fnmatch.translate(pattern))
    expression = pattern[3:]
    try:
        with warnings.catch_warnings():  # e.g. "possible nested set": not for the user's stderr
            warnings.simplefilter("ignore")
            re.compile(expression)
    except (re.error, RecursionError, OverflowError) as exc:
        raise PlanError(f"{where}: invalid regular expression ({_short(exc)})") from None
    return _linear_regex(where, expression)


def _linear_regex(where: str, expression: str) -> Any:
    try:
        import re2  # google-re2: linear-time matching
    except ImportError:
        raise PlanError(f"{where}: re: patterns need the google-re2 package "
                        "(pip install google-re2); use a glob instead") from None
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own lines on stderr
    try:
        return re2.compile(expression, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PlanError(f"{where}: the linear-time matcher refuses it ({_short(reason, 50)}); "
                        "avoid backreferences and lookarounds, or use a glob") from None


def pattern_matches(pattern: str, name: str) -> bool:
    """Glob match, or full regular-expression match for keys starting with ``re:``."""
    return _compile_pattern(pattern).fullmatch(name) is not None


# -- checks ------------------------------------------------------------------------------
def kind_accepts(kind: str, key: str, pruning_method: str = "magnitude") -> bool:
    """Whether a layer of this kind can take plan section `key` at all (for pruning and
    quantization, by this method): the check resolution makes, also used by the GUI to skip
    layers a bulk edit would fail on."""
    if key == "pruning":
        kinds = {"structured": STRUCTURED_KINDS, "nm": NM_KINDS,
                 "obs": STATISTICS_KINDS}.get(pruning_method, PRUNABLE_KINDS)
        return kind in kinds
    if key == "quantization":
        return kind in (STATISTICS_KINDS if pruning_method in STATISTICS_METHODS
                        else QUANTIZABLE_KINDS)
    if key == BIAS_CORRECTION:
        return True
    return kind in LOW_RANK_KINDS


def _applies(key: str, section: Section, kind: str) -> bool:
    method = section.method if isinstance(section, (Pruning, Quantization)) else "magnitude"
    return kind_accepts(kind, key, method)


def row_length(shape: tuple[int, ...]) -> int:
    """Elements per output row: what group sizes must divide (resolution checks it)."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _check_section(info: LayerInfo, key: str, section: Section, origin: str) -> None:
    """Raise PlanError naming the layer and field when `section` cannot apply to `info`."""

    def fail(field_name: str, problem: str) -> None:
        raise PlanError(f"layer {_key(info.name)} ({_kind(info.kind)}, from {origin}): "
                        f"{key}.{field_name} {problem}")

    if not _applies(key, section, info.kind):
        what = (f"{key}.method {_value(section.method)}"
                if isinstance(section, Pruning) or (isinstance(section, Quantization)
                                                    and section.method != "rtn") else key)
        raise PlanError(f"layer {_key(info.name)} (from {origin}): {what} cannot apply to "
                        f"{_kind(info.kind)} layers")
    shape = info.shape
    if isinstance(section, Pruning):
        if section.is_nm:
            n, m = _parse_nm(section.pattern or "2:4", fail)
            if shape is not None and len(shape) > 1 and shape[1] % m:
                fail("pattern", f"{_value(section.pattern)}: M={m} does not divide the {shape[1]} "
                                "input channels")
        elif not _is_number(section.amount) or not 0 <= section.amount < 1:
            fail("amount", f"= {_value(section.amount)} must be a number in [0, 1)")
    elif isinstance(section, Quantization):
        if section.is_float:
            return
        if not _is_int(section.bits) or not MIN_BITS <= section.bits <= MAX_BITS:
            fail("bits", f"= {_value(section.bits)} must be an integer {MIN_BITS}..{MAX_BITS} "
                         f"or one of {', '.join(FLOAT_FORMATS)}")
        if section.granularity == "group":
            size = section.group_size
            if not _is_int(size) or size < 1:
                fail("group_size", f"= {_value(size)} must be a positive integer")
            if shape is not None and row_length(shape) % size:
                fail("group_size", f"= {size} does not divide the input dimension {row_length(shape)}")
    elif isinstance(section, LowRank):
        if section.rank is not None:
            if not _is_int(section.rank) or section.rank < 1:
                fail("rank", f"= {_value(section.rank)} must be a positive integer")
            if shape is not None and section.rank > min(shape[0], row_length(shape)):
                fail("rank", f"= {section.rank} exceeds the full rank {min(shape[0], row_length(shape))}")
        elif not _is_number(section.energy) or not 0 < section.energy <= 1:
            fail("energy", f"= {_value(section.energy)} must be a number in (0, 1]")


def _check_rank_splits(info: LayerInfo, layer_plan: LayerPlan) -> None:
    """A fixed rank is the second factor's input dimension, so group and N:M sizes must divide it."""
    low_rank, quant, pruning = layer_plan.low_rank, layer_plan.quantization, layer_plan.pruning
    if low_rank is None or low_rank.rank is None:
        return
    sizes = []
    if quant is not None and not quant.is_float and quant.granularity == "group":
        sizes.append(("quantization.group_size", quant.group_size))
    if pruning is not None and pruning.is_nm:
        sizes.append(("pruning.pattern M", pruning.nm[1]))
    for what, size in sizes:
        if low_rank.rank % size:
            raise PlanError(
                f"layer {_key(info.name)}: low_rank.rank {low_rank.rank} must be a multiple of {what} {size}, "
                "which splits the second factor's input"
            )


def _check_global_amount(resolved: Mapping[str, LayerPlan]) -> None:
    """Global magnitude pruning uses one threshold, so it needs one amount."""
    first: tuple[str, float] | None = None
    for name, layer_plan in resolved.items():
        pruning = layer_plan.pruning
        if pruning is None or pruning.method != "magnitude-global":
            continue
        if first is None:
            first = (name, pruning.amount)
        elif pruning.amount != first[1]:
            raise PlanError(
                f"layer {_key(name)}: pruning.amount {_value(pruning.amount)} differs from "
                f"{_value(first[1])} on {_key(first[0])}; magnitude-global layers share one amount"
            )


def _parse_nm(pattern: Any, fail: Any) -> tuple[int, int]:
    """(N, M) of an "N:M" text; bounded before any int() so 5,000 digits are one clear line."""
    match = None
    if isinstance(pattern, str) and len(pattern) <= MAX_NM_CHARS:
        match = re.fullmatch(r"\s*(\d{1,6})\s*:\s*(\d{1,6})\s*", pattern)
    if not match:
        fail("pattern", f"= {_value(pattern)} must look like 'N:M', e.g. '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n > m or m > MAX_NM_GROUP:
        fail("pattern", f"= {_value(pattern)} needs 1 <= N <= M <= {MAX_NM_GROUP}")
    return n, m


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- reading and writing plain data -----------------------------------------------------------
_SECTION_FIELDS = {
    "pruning": (Pruning, {"method", "amount", "pattern"}),
    "quantization": (Quantization, {"bits", "symmetric", "granularity", "group_size", "range",
                                    "method", "act_order", "damping"}),
    "low_rank": (LowRank, {"rank", "energy"}),
}


def _sections_to_data(sections: Mapping[str, Section | bool | None]) -> dict[str, Any] | str:
    if len(sections) == len(SECTIONS) and all(sections.get(k) is None for k in SECTIONS):
        return "keep"
    return {key: (section if isinstance(section, bool) or section is None else section.to_dict())
            for key, section in sections.items()}


def _sections_from_data(where: str, raw: Any) -> Sections:
    if raw == "keep" or (isinstance(raw, Mapping) and len(raw) == 1 and raw.get("keep") is True):
        return {key: None for key in SECTIONS}
    if not isinstance(raw, Mapping):
        raise PlanError(f"plan {where}: expected a mapping of sections or 'keep', got {_value(raw)}")
    _reject_unknown(f"plan {where}", raw, {*SECTIONS, BIAS_CORRECTION})
    out: Sections = {}
    for key, value in raw.items():
        if key == BIAS_CORRECTION:
            if not isinstance(value, bool):
                raise PlanError(f"plan {where}.{key}: expected true or false, got {_value(value)}")
            out[key] = value
        else:
            out[key] = _section_from_data(f"{where}.{key}", key, value)
    return out


def _section_from_data(where: str, key: str, raw: Any) -> Section | None:
    """One section, its fields type-checked here; ranges that depend on the layer (amount in
    [0, 1), bits 2..8, a rank within the shape) are checked at resolution, naming the layer."""
    if raw is None:
        return None
    cls, fields = _SECTION_FIELDS[key]
    if not isinstance(raw, Mapping):
        raise PlanError(f"plan {where}: expected a mapping, got {_value(raw)}")
    _reject_unknown(f"plan {where}", raw, fields)
    if key == "pruning":
        method = _choice(f"{where}.method", raw.get("method", "magnitude"), PRUNING_METHODS)
        if method == "obs" and "pattern" in raw:
            if "amount" in raw:
                raise PlanError(f"plan {where}: give amount or pattern for method 'obs', not both")
        if method == "nm" or (method == "obs" and "pattern" in raw):
            pattern = raw.get("pattern", "2:4")
            if not isinstance(pattern, str):
                raise PlanError(f"plan {where}.pattern: {_value(pattern)} must be text like '2:4' "
                                "(quote it in YAML, which reads a bare 2:4 as the number 124)")
            if len(pattern) > MAX_NM_CHARS:
                raise PlanError(f"plan {where}.pattern: {_value(pattern)} is too long for 'N:M' "
                                f"(at most {MAX_NM_CHARS} characters)")
            return Pruning(method, pattern=pattern)
        if "amount" not in raw:
            raise PlanError(f"plan {where}.amount: required for method {method!r}")
        return Pruning(method, amount=_typed(f"{where}.amount", raw["amount"], _is_number, "a number"))
    if key == "quantization":
        method = _choice(f"{where}.method", raw.get("method", "rtn"), QUANTIZATION_METHODS)
        act_order, damping = _gptq_options(where, raw, method)
        granularity = _choice(f"{where}.granularity", raw.get("granularity", "per-channel"), GRANULARITIES)
        range_method = _choice(f"{where}.range", raw.get("range", "minmax"), RANGE_METHODS)
        symmetric = raw.get("symmetric", True)
        if not isinstance(symmetric, bool):
            raise PlanError(f"plan {where}.symmetric: expected true or false, got {_value(symmetric)}")
        bits = raw.get("bits", 8)
        if not _is_int(bits) and not (isinstance(bits, str) and bits in FLOAT_FORMATS):
            raise PlanError(f"plan {where}.bits: {_value(bits)} must be an integer "
                            f"{MIN_BITS}..{MAX_BITS} or one of {', '.join(FLOAT_FORMATS)}")
        if granularity == "group" and "group_size" not in raw:
            raise PlanError(f"plan {where}.group_size: required for granularity 'group'")
        group_size = raw.get("group_size") if granularity == "group" else None
        if group_size is not None:
            _typed(f"{where}.group_size", group_size, _is_int, "an integer")
        if method != "rtn" and not _is_int(bits):
            raise PlanError(f"plan {where}.bits: {_value(bits)} cannot go with method "
                            f"{method!r}, which makes integer codes (bits {MIN_BITS}..{MAX_BITS})")
        return Quantization(bits=bits, symmetric=symmetric, granularity=granularity,
                            group_size=group_size, range=range_method, method=method,
                            act_order=act_order, damping=damping)
    if ("rank" in raw) == ("energy" in raw):
        raise PlanError(f"plan {where}: give exactly one of rank or energy")
    if "rank" in raw:
        return LowRank(rank=_typed(f"{where}.rank", raw["rank"], _is_int, "an integer"))
    return LowRank(energy=_typed(f"{where}.energy", raw["energy"], _is_number, "a number"))


def _gptq_options(where: str, raw: Mapping[str, Any], method: str) -> tuple[bool, float]:
    """act_order and damping: GPTQ's options, refused for other methods rather than ignored."""
    if method != "gptq":
        for name in ("act_order", "damping"):
            if name in raw:
                raise PlanError(f"plan {where}.{name}: only for method 'gptq' "
                                f"(this section's method is {method!r})")
        return False, DEFAULT_DAMPING
    act_order = raw.get("act_order", False)
    if not isinstance(act_order, bool):
        raise PlanError(f"plan {where}.act_order: expected true or false, got {_value(act_order)}")
    damping = raw.get("damping", DEFAULT_DAMPING)
    if not _is_number(damping) or not 0 < damping <= 1 or not math.isfinite(damping):
        raise PlanError(f"plan {where}.damping: {_value(damping)} must be a number in (0, 1]")
    return act_order, float(damping)


def _activation_from_data(raw: Any) -> ActivationQuant | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise PlanError(f"plan activation_quant: expected a mapping, got {_value(raw)}")
    _reject_unknown("plan activation_quant", raw,
                    {"calibration", "percentile", "keep_float", "smoothing"})
    calibration = _choice("activation_quant.calibration", raw.get("calibration", "minmax"),
                          CALIBRATION_METHODS)
    percentile = raw.get("percentile", ActivationQuant.percentile)
    if not _is_number(percentile) or not 0 < percentile <= 100:
        raise PlanError(f"plan activation_quant.percentile: {_value(percentile)} must be in (0, 100]")
    keep_float = raw.get("keep_float", [])
    if not isinstance(keep_float, list) or not all(isinstance(name, str) for name in keep_float):
        raise PlanError(f"plan activation_quant.keep_float: expected a list of node names, got "
                        f"{_value(keep_float)}")
    smoothing = raw.get("smoothing")
    if smoothing is not None and (not _is_number(smoothing) or not math.isfinite(smoothing)
                                  or not 0 < smoothing < 1):
        raise PlanError(f"plan activation_quant.smoothing: {_value(smoothing)} must be a number "
                        "in (0, 1) (SmoothQuant's alpha, 0.5 is usual)")
    return ActivationQuant(calibration, float(percentile), tuple(keep_float),
                           float(smoothing) if smoothing is not None else None)


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise PlanError(f"plan {where}: {_value(value)} is not one of {', '.join(allowed)}")
    return value


def _typed(where: str, value: Any, check: Any, expected: str) -> Any:
    if not check(value):
        raise PlanError(f"plan {where}: expected {expected}, got {_value(value)}")
    return value


def _reject_unknown(where: str, raw: Mapping[Any, Any], allowed: set[str]) -> None:
    for name in raw:
        if not isinstance(name, str) or name not in allowed:
            # the name is cut shorter than other keys: the list of fields takes the room
            raise PlanError(f"{where}: unknown field {quote(name, 32)} "
                            f"(expected {', '.join(sorted(allowed))})")


def _name_key(level: str, key: Any) -> str:
    """A kinds/patterns/layers key as text: YAML reads ``0:`` (a Sequential's first layer) as
    an integer, which is accepted; anything else that is not text is refused."""
    if isinstance(key, str):
        return key
    if _is_int(key) and abs(key) < 1 << 63:
        return str(key)
    raise PlanError(f"plan {level}: the key {_key(key)} is not a name (expected text)")


def _key(value: Any) -> str:
    """A name (layer, kind, pattern) as quoted in the "where" part of a message."""
    return quote(value, _KEY_QUOTE)


def _value(value: Any) -> str:
    """An offending value as quoted after the "where" part of a message."""
    return quote(value, _VALUE_QUOTE)


def _kind(kind: Any) -> str:
    """A layer kind, unquoted when it is a plain identifier (as every real kind is)."""
    return kind if isinstance(kind, str) and kind.isidentifier() and len(kind) <= 40 else _key(kind)


def _short(exc: Any, limit: int = 80) -> str:
    """An exception's text on one line, cut to `limit` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _layer_infos(layers: LayerSource) -> list[LayerInfo]:
    if isinstance(layers, Mapping):
        return [LayerInfo(str(name), str(kind)) for name, kind in layers.items()]
    infos = []
    for item in layers:
        if isinstance(item, tuple):
            infos.append(LayerInfo(*item))
        else:
            shape = getattr(item, "shape", None)
            infos.append(LayerInfo(item.name, item.kind, tuple(shape) if shape is not None else None))
    return infos


def _is_yaml(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return True
    if suffix == ".json":
        return False
    raise PlanError(f"plan {quote(path.name)}: unknown extension {quote(suffix, 24)} "
                    "(use .yaml, .yml or .json)")
