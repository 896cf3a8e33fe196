"""Parameter counts of every size x ablation (embedding tying, cross-attention mode).

Counts are exact and abstract (no parameter memory). Run from the repository root:

    python -m benchmarks.param_counts              # JSON: one record per size x ablation
    python -m benchmarks.param_counts --markdown   # markdown tables for the README

Percentages saved are taken of the larger model: tying = (untied - tied) / untied with the same
attention; merging = (separate - merged) / separate with the same tying.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from t5g2.model import ModelConfig  # noqa: E402
from t5g2.model.params import count_params  # noqa: E402

SIZES = ("270m", "1b", "4b")
CROSS_MODES = ("merged", "separate", "global_only")
DEFAULT = (True, "merged")  # the paper's: tied embeddings, merged attention


def size_config(size: str, tie: bool, cross: str) -> ModelConfig:
    cd = importlib.import_module(f"configs.t5g2_{size}").get_config()
    cd.model.tie_embeddings = tie
    cd.model.cross_attention = cross
    return ModelConfig.from_config_dict(cd.model)


def count_all(sizes=SIZES) -> dict[tuple[str, bool, str], int]:
    return {(size, tie, cross): count_params(size_config(size, tie, cross))
            for size in sizes for tie in (True, False) for cross in CROSS_MODES}


def records(counts: dict[tuple[str, bool, str], int]) -> list[dict]:
    out = []
    for (size, tie, cross), n in counts.items():
        base = counts[(size, *DEFAULT)]
        out.append(dict(size=size, tie_embeddings=tie, cross_attention=cross, params=n,
                        delta_vs_tied_merged=n - base,
                        delta_vs_tied_merged_pct=round(100.0 * (n - base) / base, 3)))
    return out


def saved(smaller: int, larger: int) -> str:
    return f"{100.0 * (larger - smaller) / larger:.2f}%"


def markdown(counts: dict[tuple[str, bool, str], int]) -> str:
    sizes = list(dict.fromkeys(size for size, _, _ in counts))
    combos = [(tie, cross) for cross in CROSS_MODES for tie in (True, False)]

    def name(tie, cross):
        label = f"{'tied' if tie else 'untied'}+{cross}"
        return f"{label} (paper default)" if (tie, cross) == DEFAULT else label

    lines = ["| size | " + " | ".join(name(*c) for c in combos) + " |",
             "|---|" + "---:|" * len(combos)]
    for size in sizes:
        lines.append(f"| {size} | "
                     + " | ".join(f"{counts[(size, *c)]:,}" for c in combos) + " |")

    lines += ["", "Parameters saved, as a share of the larger model:", "",
              "| size | tying (merged) | tying (separate) | tying (global_only) "
              "| merging vs separate (tied) | merging vs separate (untied) "
              "| merging vs global_only (tied) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        c = {k[1:]: v for k, v in counts.items() if k[0] == size}
        cells = [saved(c[(True, cross)], c[(False, cross)]) for cross in CROSS_MODES]
        cells += [saved(c[(tie, "merged")], c[(tie, "separate")]) for tie in (True, False)]
        cells.append(saved(c[(True, "merged")], c[(True, "global_only")]))
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true",
                        help="print markdown tables instead of JSON")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    args = parser.parse_args(argv)
    counts = count_all(args.sizes)
    print(markdown(counts) if args.markdown else json.dumps(records(counts), indent=2))


if __name__ == "__main__":
    main()
