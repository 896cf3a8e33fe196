"""UL2 mixture-of-denoisers in numpy: T5's span corruption and the prefix-LM (S) denoiser.

One example is a raw chunk of tokens turned into `{"inputs", "targets"}` (int32, EOS appended to
both). Every random draw comes from the `np.random.Generator` the caller passes, so an example is
a pure function of that generator's seed (the pipeline uses `default_rng([seed, ..., index])`).

Span denoisers ("span") port T5's `random_spans_noise_mask` and `noise_span_to_unique_sentinel`
(t5/data/preprocessors.py): for L raw tokens, noise = round(L*r) clamped to [1, L'-1] with
L' = max(L, 2), spans = max(1, round(noise/mu)); the noise and the kept tokens are each split into
`spans` positive parts by a uniformly random composition and interleaved kept, noise, kept, ...,
noise (the chunk starts with kept tokens and ends with noise, as in T5 without `random_roll`).
Noise span k becomes sentinel `sentinel_ids[k]` in the inputs; the targets are sentinel k followed
by the removed tokens of span k, for every k in order. T5 does this arithmetic in float32 inside
TensorFlow; here the mask and `random_spans_helper` share one float64 formula, so the chunk
length the helper picks always fills the inputs exactly as computed.

Prefix denoisers ("prefix"), the S denoiser:
* `prefix_split="t5gemma2"` (T5Gemma 2's S, mu=3L/4, r=.75, n=1): the last round(L*r) tokens are
  one noise span, so inputs = [mode] prefix sentinel_0 EOS and targets = sentinel_0 suffix EOS;
  `noise_density` is the target fraction (default 0.75).
* `prefix_split="random"` (T5's `prefix_lm`, as in the UL2 paper's appendix code): the split point
  is uniform in [1, L-1]; inputs = [mode] prefix EOS, targets = suffix EOS, no sentinel.
  `noise_density` and `mean_span_length` are not used.

The mode token ("[R]", "[X]", "[S]", or UL2's "[NLU]"/"[NLG]"/"[S2S]" via `rename_mode_tokens`)
is prepended to the inputs when the denoiser names one and the caller gives its id.

`raw_length` says how many raw tokens one example of a denoiser takes at given lengths, and
`spans_needed` how many sentinels it then uses, so the pipeline can check the vocabulary up front.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import numpy as np

__all__ = ["DenoiserError", "Denoiser", "Mixture", "MIXTURES", "UL2_MODE_TOKEN_NAMES",
           "mixture_from_config", "rename_mode_tokens", "random_spans_helper", "raw_length",
           "spans_needed", "random_spans_noise_mask", "denoise", "merge_back", "sample_denoiser"]

KINDS = ("span", "prefix")
PREFIX_SPLITS = ("t5gemma2", "random")


class DenoiserError(ValueError):
    """A denoiser, mixture or length setting cannot work; the message names what and why."""


# ------------------------------------------------------------------------------ configuration

@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser; see the module doc for what each kind does with its fields."""
    name: str                       # "R1", "X2", "S", ...
    kind: str                       # "span" | "prefix"
    mean_span_length: float = 3.0   # span kind: mu
    noise_density: float | None = None  # span: r (default .15); prefix/t5gemma2: the target
                                        # fraction (default .75, T5Gemma 2's)
    mode_token: str | None = None   # prepended to the inputs when not None (and its id is given)
    prefix_split: str = "t5gemma2"  # prefix kind: "t5gemma2" | "random"

    def __post_init__(self):
        where = f"denoiser {self.name!r}"
        if self.noise_density is None:
            object.__setattr__(self, "noise_density", 0.75 if self.kind == "prefix" else 0.15)
        if not isinstance(self.name, str) or not self.name:
            raise DenoiserError(f"denoiser name={self.name!r} must be a non-empty string")
        if self.kind not in KINDS:
            raise DenoiserError(f"{where}: kind={self.kind!r} is not one of {KINDS}")
        if self.mode_token is not None and (not isinstance(self.mode_token, str)
                                            or not self.mode_token):
            raise DenoiserError(f"{where}: mode_token={self.mode_token!r} must be a non-empty "
                                "string or None")
        if self.kind == "prefix" and self.prefix_split not in PREFIX_SPLITS:
            raise DenoiserError(f"{where}: prefix_split={self.prefix_split!r} is not one of "
                                f"{PREFIX_SPLITS}")
        if not _is_number(self.noise_density) or not 0 < self.noise_density < 1:
            raise DenoiserError(f"{where}: noise_density={self.noise_density!r} must be a number "
                                "with 0 < noise_density < 1")
        if not _is_number(self.mean_span_length) or not self.mean_span_length >= 1 \
                or not math.isfinite(self.mean_span_length):
            raise DenoiserError(f"{where}: mean_span_length={self.mean_span_length!r} must be a "
                                "finite number >= 1")
        if self.kind == "span" and self.noise_density * (1 + 1 / self.mean_span_length) > 1:
            raise DenoiserError(
                f"{where}: noise_density={self.noise_density} with mean_span_length="
                f"{self.mean_span_length} leaves fewer kept tokens than noise spans (every span "
                "needs a kept token before it); lower noise_density or raise mean_span_length")

    @property
    def uses_mode_token(self) -> bool:
        return self.mode_token is not None


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Denoisers and their sampling weights (per example, not per token)."""
    denoisers: tuple[Denoiser, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "denoisers", tuple(self.denoisers))
        object.__setattr__(self, "weights", tuple(self.weights))
        if not self.denoisers:
            raise DenoiserError("a mixture needs at least one denoiser")
        if len(self.weights) != len(self.denoisers):
            raise DenoiserError(f"mixture has {len(self.denoisers)} denoisers but "
                                f"{len(self.weights)} weights")
        for d, w in zip(self.denoisers, self.weights):
            if not _is_number(w) or not 0 < w < math.inf:
                raise DenoiserError(f"denoiser {d.name!r}: weight={w!r} must be a positive "
                                    "finite number")
        names = [d.name for d in self.denoisers]
        if len(set(names)) != len(names):
            raise DenoiserError(f"mixture denoiser names {names} must be distinct")

    @property
    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.weights, np.float64)
        return w / w.sum()


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _span(name, mu, r, mode):
    return Denoiser(name, "span", mean_span_length=mu, noise_density=r, mode_token=mode)


MIXTURES: dict[str, Mixture] = {
    # T5Gemma 2 (arXiv 2512.14856): (3,.15), (12,.5), (32,.15), (32,.5) and the S denoiser
    # (mu=3L/4, r=.75, n=1), sampled 1:1:1:1:4.
    "t5gemma2": Mixture(
        denoisers=(_span("R1", 3, 0.15, "[R]"), _span("X1", 12, 0.5, "[X]"),
                   _span("X2", 32, 0.15, "[X]"), _span("X3", 32, 0.5, "[X]"),
                   Denoiser("S", "prefix", noise_density=0.75, mode_token="[S]",
                            prefix_split="t5gemma2")),
        weights=(1, 1, 1, 1, 4)),
    # The original UL2 seven denoisers (arXiv 2205.05131 Table 1) with T5's random prefix-LM
    # split. The paper's mixing proportions are unconfirmed: the appendix code samples the
    # per-denoiser datasets with rates=None, i.e. uniformly, which is what this preset does.
    "ul2": Mixture(
        denoisers=(_span("R1", 3, 0.15, "[R]"), _span("R2", 8, 0.15, "[R]"),
                   _span("X1", 3, 0.5, "[X]"), _span("X2", 8, 0.5, "[X]"),
                   _span("X3", 64, 0.15, "[X]"), _span("X4", 64, 0.5, "[X]"),
                   Denoiser("S", "prefix", mode_token="[S]", prefix_split="random")),
        weights=(1,) * 7),
}

# UL2's names for the paradigm tokens (R -> [NLU], X -> [NLG], S -> [S2S]).
UL2_MODE_TOKEN_NAMES = {"[R]": "[NLU]", "[X]": "[NLG]", "[S]": "[S2S]"}
_MODE_TOKEN_PRESETS = {"ul2": UL2_MODE_TOKEN_NAMES}

_ENTRY_FIELDS = ("name", "kind", "mean_span_length", "noise_density", "mode_token", "weight",
                 "prefix_split")


def rename_mode_tokens(mixture: Mixture, names: Mapping[str, str] = UL2_MODE_TOKEN_NAMES
                       ) -> Mixture:
    """The mixture with its mode tokens renamed by `names` (default [R]/[X]/[S] -> UL2's)."""
    return dataclasses.replace(mixture, denoisers=tuple(
        dataclasses.replace(d, mode_token=names.get(d.mode_token, d.mode_token))
        for d in mixture.denoisers))


def mixture_from_config(cfg: Any) -> Mixture:
    """A Mixture from config data.

    `cfg` is a Mixture; a preset name ("t5gemma2", "ul2"); a mapping {"preset": name,
    "mode_tokens": "ul2" or {old: new}}; or a list of dicts (or ConfigDicts) with the keys
    name, kind, mean_span_length, noise_density, mode_token, weight (default 1), prefix_split.
    Errors name the entry and the field.
    """
    if isinstance(cfg, Mixture):
        return cfg
    if isinstance(cfg, str):
        return _preset(cfg)
    mapping = _as_dict(cfg)
    if mapping is not None:
        unknown = sorted(set(mapping) - {"preset", "mode_tokens"})
        if unknown or "preset" not in mapping:
            raise DenoiserError(f"mixture config {mapping!r}: a mapping needs 'preset' and may "
                                f"have 'mode_tokens' (unknown keys: {unknown})")
        mixture = _preset(mapping["preset"])
        names = mapping.get("mode_tokens")
        if names is None:
            return mixture
        if isinstance(names, str):
            if names not in _MODE_TOKEN_PRESETS:
                raise DenoiserError(f"mixture config: mode_tokens={names!r} is not one of "
                                    f"{sorted(_MODE_TOKEN_PRESETS)} or a mapping old -> new")
            names = _MODE_TOKEN_PRESETS[names]
        renames = _as_dict(names)
        if renames is None:
            raise DenoiserError(f"mixture config: mode_tokens={names!r} must be a preset name "
                                f"{sorted(_MODE_TOKEN_PRESETS)} or a mapping old -> new")
        return rename_mode_tokens(mixture, renames)
    if isinstance(cfg, (list, tuple)):
        if not cfg:
            raise DenoiserError("mixture config is an empty list; give at least one denoiser")
        denoisers, weights = [], []
        for i, entry in enumerate(cfg):
            denoiser, weight = _entry(i, entry)
            denoisers.append(denoiser)
            weights.append(weight)
        return Mixture(tuple(denoisers), tuple(weights))
    raise DenoiserError(f"mixture config {cfg!r} must be a preset name {sorted(MIXTURES)}, a "
                        "{'preset': ...} mapping or a list of denoiser dicts")


def _preset(name) -> Mixture:
    if name not in MIXTURES:
        raise DenoiserError(f"unknown mixture preset {name!r}; presets: {sorted(MIXTURES)}")
    return MIXTURES[name]


def _as_dict(x) -> dict | None:
    if isinstance(x, Mapping):
        return dict(x)
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
        return dict(x.to_dict())
    return None


def _entry(i: int, entry) -> tuple[Denoiser, float]:
    fields = _as_dict(entry)
    if fields is None:
        raise DenoiserError(f"mixture entry {i} ({entry!r}) must be a dict with keys "
                            f"{_ENTRY_FIELDS}")
    label = f"mixture entry {i} ({fields.get('name', '?')!r})"
    unknown = sorted(set(fields) - set(_ENTRY_FIELDS))
    if unknown:
        raise DenoiserError(f"{label}: unknown field(s) {unknown}; valid: {_ENTRY_FIELDS}")
    for key in ("name", "kind"):
        if key not in fields:
            raise DenoiserError(f"{label}: missing field {key!r}")
    weight = fields.pop("weight", 1.0)
    if not _is_number(weight) or not 0 < weight < math.inf:
        raise DenoiserError(f"{label}: weight={weight!r} must be a positive finite number")
    try:
        return Denoiser(**fields), float(weight)
    except DenoiserError as e:
        raise DenoiserError(f"{label}: {e}") from None


# ------------------------------------------------------------------------------ arithmetic

def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a raw chunk of `length` tokens: T5's arithmetic."""
    length = max(length, 2)
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(1, int(round(noise / mean_span_length)))
    return noise, spans


def _span_lengths_of(length, noise_density, mean_span_length, extra_inputs=1, extra_targets=1):
    """(inputs, targets) lengths of a span-corrupted chunk, EOS included, no mode token."""
    noise, spans = _span_counts(length, noise_density, mean_span_length)
    return (max(length, 2) - noise + spans * extra_inputs + 1,
            noise + spans * extra_targets + 1)


@functools.lru_cache(maxsize=256)
def random_spans_helper(inputs_length: int, noise_density: float, mean_span_length: float,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """(raw tokens T, targets length) so that corrupting T tokens fills `inputs_length` exactly.

    T5's `random_spans_helper`: start at T = inputs_length - 1 and grow T while the corrupted
    inputs (kept tokens + one sentinel per span + EOS) still fit; with noise_density 0.5 and
    targets longer than inputs, T and targets are both lowered by one (so targets == inputs).
    """
    def lengths(t):
        return _span_lengths_of(t, noise_density, mean_span_length,
                                extra_tokens_per_span_inputs, extra_tokens_per_span_targets)

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    inputs, targets = lengths(tokens)
    if noise_density == 0.5 and targets > inputs:
        tokens -= 1
        targets -= 1
    return tokens, targets


def _example_lengths(denoiser: Denoiser, length: int) -> tuple[int, int, int]:
    """(inputs, targets, sentinels) of one example made from `length` raw tokens, mode included."""
    mode = int(denoiser.uses_mode_token)
    if denoiser.kind == "span":
        inputs, targets = _span_lengths_of(length, denoiser.noise_density,
                                           denoiser.mean_span_length)
        return inputs + mode, targets, _span_counts(length, denoiser.noise_density,
                                                    denoiser.mean_span_length)[1]
    if denoiser.prefix_split == "t5gemma2":
        noise = _prefix_noise(length, denoiser.noise_density)
        return mode + length - noise + 2, noise + 2, 1
    # random split: the longest inputs (prefix L-1) and the longest targets (suffix L-1)
    return mode + length, length, 0


def _prefix_noise(length: int, fraction: float) -> int:
    """Tokens in the target of T5Gemma 2's S denoiser: round(L*r) in [1, L-1]."""
    return min(max(int(round(length * fraction)), 1), length - 1)


def raw_length(denoiser: Denoiser, inputs_length: int, targets_length: int) -> int:
    """Raw tokens one example takes so its inputs (mode token and EOS included) fill
    `inputs_length`; DenoiserError if its targets would not fit `targets_length`.

    Span denoisers: `random_spans_helper` at inputs_length minus the mode token, so the inputs
    are exactly inputs_length long (one less where T5's density-0.5 rule lowered the chunk by a
    token to keep targets <= inputs). Prefix denoisers: the largest L whose inputs and targets
    both fit (for the random split, whatever the split point).
    """
    for name, value in (("inputs_length", inputs_length), ("targets_length", targets_length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DenoiserError(f"denoiser {denoiser.name}: {name}={value!r} must be an "
                                "integer >= 1")
    return _raw_length(denoiser, int(inputs_length), int(targets_length))


@functools.lru_cache(maxsize=1024)
def _raw_length(denoiser: Denoiser, inputs_length: int, targets_length: int) -> int:
    what = f"denoiser {denoiser.name} ({_describe(denoiser)})"
    if denoiser.kind == "span":
        budget = inputs_length - int(denoiser.uses_mode_token)
        tokens = random_spans_helper(budget, denoiser.noise_density, denoiser.mean_span_length)[0]
        if tokens < 2:
            raise DenoiserError(
                f"{what} cannot fit one kept token, one sentinel and EOS"
                f"{' after its mode token' if denoiser.uses_mode_token else ''} in "
                f"inputs_length={inputs_length}; use inputs_length >= "
                f"{_example_lengths(denoiser, 2)[0]}")
        targets = _example_lengths(denoiser, tokens)[1]
        if targets > targets_length:
            raise DenoiserError(
                f"{what} at inputs_length={inputs_length} takes {tokens} raw tokens and makes "
                f"targets of {targets} tokens, more than targets_length={targets_length}; use "
                f"targets_length >= {targets}")
        return tokens

    def fits(length):
        inputs, targets, _ = _example_lengths(denoiser, length)
        return inputs <= inputs_length and targets <= targets_length

    if not fits(2):
        inputs, targets, _ = _example_lengths(denoiser, 2)
        raise DenoiserError(
            f"{what} needs inputs_length >= {inputs} and targets_length >= {targets} for its "
            f"shortest example (2 raw tokens); got inputs_length={inputs_length}, "
            f"targets_length={targets_length}")
    lo, hi = 2, inputs_length + targets_length  # fits(lo); both lengths grow with L
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _describe(d: Denoiser) -> str:
    if d.kind == "span":
        return f"span, mean_span_length={d.mean_span_length}, noise_density={d.noise_density}"
    if d.prefix_split == "random":
        return "prefix, random split"
    return f"prefix, last {d.noise_density:g} of the chunk is the target"


def spans_needed(denoiser: Denoiser, inputs_length: int, targets_length: int) -> int:
    """Sentinels the longest example of `denoiser` at these lengths uses."""
    return _example_lengths(denoiser, raw_length(denoiser, inputs_length, targets_length))[2]


# ------------------------------------------------------------------------------ randomness

def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random composition of num_items into num_segments positive parts.

    T5 shuffles n-1 slots holding k-1 ones; choosing the k-1 cut points uniformly without
    replacement is the same distribution.
    """
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False, shuffle=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [num_items]))).astype(np.int64)


def _random_span_lengths(length: int, noise_density: float, mean_span_length: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept lengths, noise lengths) of the alternating spans of a chunk of max(length, 2)."""
    padded = max(length, 2)
    noise, spans = _span_counts(length, noise_density, mean_span_length)
    if spans > padded - noise:
        raise DenoiserError(
            f"{padded} raw tokens with noise_density={noise_density}, mean_span_length="
            f"{mean_span_length} give {spans} noise spans but only {padded - noise} kept tokens")
    return (_random_segmentation(padded - noise, spans, rng),
            _random_segmentation(noise, spans, rng))


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask (bool [length], True = noise): alternating kept/noise spans, see module."""
    if length == 0:
        return np.zeros(0, bool)
    if noise_density == 0:
        return np.zeros(length, bool)
    kept, noise = _random_span_lengths(length, noise_density, mean_span_length, rng)
    return _mask_from_lengths(kept, noise)[:length]


def _mask_from_lengths(kept: np.ndarray, noise: np.ndarray) -> np.ndarray:
    runs = np.stack([kept, noise], axis=1).reshape(-1)
    return np.repeat(np.tile(np.array([False, True]), len(kept)), runs)


def denoise(tokens: np.ndarray, denoiser: Denoiser, rng: np.random.Generator, *,
            sentinel_ids: np.ndarray, eos_id: int, mode_id: int | None) -> dict[str, np.ndarray]:
    """One example from a raw chunk: {"inputs", "targets"} int32, EOS appended to both.

    The mode token is prepended when the denoiser has one and `mode_id` is given. Raises
    DenoiserError if the example needs more sentinels than `sentinel_ids` holds.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DenoiserError(f"denoise takes one chunk of token ids, got shape {tokens.shape}")
    length = len(tokens)
    if length < 2:
        raise DenoiserError(f"denoiser {denoiser.name} needs at least 2 raw tokens, got {length}")
    sentinel_ids = np.asarray(sentinel_ids)
    if denoiser.kind == "span":
        kept, noise = _random_span_lengths(length, denoiser.noise_density,
                                           denoiser.mean_span_length, rng)
    elif denoiser.prefix_split == "t5gemma2":
        n = _prefix_noise(length, denoiser.noise_density)
        kept, noise = np.array([length - n]), np.array([n])
    else:
        split = int(rng.integers(1, length))
        inputs, targets = tokens[:split], tokens[split:]
        return _finish(inputs, targets, denoiser, eos_id=eos_id, mode_id=mode_id)
    spans = len(kept)
    if spans > len(sentinel_ids):
        raise DenoiserError(
            f"denoiser {denoiser.name} made {spans} noise spans from {length} raw tokens but "
            f"only {len(sentinel_ids)} sentinel ids were given; the vocabulary needs at least "
            f"{spans} sentinels (see spans_needed)")
    mask = _mask_from_lengths(kept, noise)
    sentinels = sentinel_ids[:spans]
    inputs = _with_sentinels(tokens[~mask], np.cumsum(kept), sentinels)
    targets = _with_sentinels(tokens[mask], np.cumsum(noise) - noise, sentinels)
    return _finish(inputs, targets, denoiser, eos_id=eos_id, mode_id=mode_id)


def _with_sentinels(kept: np.ndarray, offsets: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """`kept` with sentinel k inserted before kept[offsets[k]] (offsets non-decreasing)."""
    out = np.empty(len(kept) + len(sentinels), np.int32)
    at = offsets + np.arange(len(sentinels))
    is_sentinel = np.zeros(len(out), bool)
    is_sentinel[at] = True
    out[at] = sentinels
    out[~is_sentinel] = kept
    return out


def _finish(inputs, targets, denoiser, *, eos_id, mode_id) -> dict[str, np.ndarray]:
    head = [mode_id] if denoiser.uses_mode_token and mode_id is not None else []
    eos = np.array([eos_id], np.int32)
    return {"inputs": np.concatenate([np.asarray(head, np.int32), inputs, eos]).astype(np.int32),
            "targets": np.concatenate([targets, eos]).astype(np.int32)}


def merge_back(inputs, targets, sentinel_ids, *, eos_id: int, mode_id: int | None = None
               ) -> np.ndarray:
    """The raw tokens an example was made from: each sentinel of the inputs replaced by its span
    from the targets; targets before the first sentinel (the random prefix split) go last.

    Raises DenoiserError if the example is malformed (missing EOS, sentinels out of order).
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    for side, x in (("inputs", inputs), ("targets", targets)):
        if len(x) == 0 or x[-1] != eos_id:
            raise DenoiserError(f"{side} {x.tolist()[-8:]} do not end with EOS {eos_id}")
    inputs, targets = inputs[:-1], targets[:-1]
    if mode_id is not None and len(inputs) and inputs[0] == mode_id:
        inputs = inputs[1:]
    sentinel_ids = np.asarray(sentinel_ids)
    in_at = np.flatnonzero(np.isin(inputs, sentinel_ids))
    out_at = np.flatnonzero(np.isin(targets, sentinel_ids))
    expected = sentinel_ids[:len(in_at)]
    if len(in_at) != len(out_at) or not np.array_equal(inputs[in_at], expected) \
            or not np.array_equal(targets[out_at], expected):
        raise DenoiserError(f"sentinels in inputs {inputs[in_at].tolist()[:8]} and targets "
                            f"{targets[out_at].tolist()[:8]} are not sentinel_ids[0..k] in order")
    kept = np.split(inputs, in_at)        # kept_0, S_0 kept_1, ...
    removed = np.split(targets, out_at)   # before, S_0 X_0, S_1 X_1, ...
    pieces = [kept[0]]
    for k in range(len(in_at)):
        pieces += [removed[k + 1][1:], kept[k + 1][1:]]
    pieces.append(removed[0])
    return np.concatenate(pieces).astype(np.int32)


def sample_denoiser(mixture: Mixture, rng: np.random.Generator) -> int:
    """Index of a denoiser drawn with the mixture's weights."""
    cumulative = np.cumsum(mixture.probabilities)
    return int(min(np.searchsorted(cumulative, rng.random(), side="right"),
                   len(cumulative) - 1))
