"""Vision tower + projector forward time per image on this machine: t5g2's `VisionEncoder` (one
jitted call) against Hugging Face T5Gemma 2's `get_image_features` (the SigLIP tower and the
multimodal projector, torch) with the same weights and the same images, in the same run. Prints
one JSON object. From the repository root:

    python -m benchmarks.vision                      # the released tower, batch 1, float32
    python -m benchmarks.vision --batch 4 --dtypes float32,bfloat16 --attn sdpa,eager

The tower defaults to the released one (`t5g2.model.config.VisionConfig`: 896 px, patch 14,
27 layers, width 1152, 256 tokens per image); `--image_size`, `--num_layers`, ... change it, e.g.
for a quick run. Weights are the reference's random initialisation (the projection, zero there,
made random), converted to t5g2 by `t5g2.convert.hf_t5gemma2`; images are uniform in [-1, 1]
(already preprocessed). The text side is a one-layer stub of width `--text_width` (the
projector's output width): only the image path runs.

Per dtype: t5g2's first call (compiles) and the reference's first call are reported apart; then
`repeats` timed calls of each, their median over the batch as ms/image, and the largest absolute
difference between the two sides' image tokens (next to the largest token magnitude, to read it
by). bfloat16 casts the weights and computes in bfloat16 on both sides.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from t5g2.model.config import ModelConfig, VisionConfig  # noqa: E402

DTYPES = ("float32", "bfloat16")  # both sides cast weights and compute in it


def model_config(vision: VisionConfig, text_width: int, dtype: str,
                 query_chunk: int = 0) -> ModelConfig:
    """A T5Gemma 2 of one tiny text layer per stack, `text_width` wide, with `vision`;
    attention in query chunks of `query_chunk` (0: all queries at once)."""
    from configs import tiny

    base = ModelConfig.from_config_dict(tiny.get_config().model)
    stack = dataclasses.replace(base.encoder, num_layers=1, d_model=text_width)
    cfg = dataclasses.replace(base, encoder=stack, decoder=stack, vision=vision,
                              boi_token_id=base.image_token_id + 1, dtype=dtype,
                              param_dtype=dtype, attention_query_chunk=query_chunk)
    cfg.validate()
    return cfg


def reference_model(cfg: ModelConfig, attn: str, seed: int):
    """Hugging Face T5Gemma 2 for `cfg` (float32, eval): its own random initialisation, and a
    random projection (zero-initialised there, which would make every token zero)."""
    import torch
    from transformers import T5Gemma2ForConditionalGeneration

    from t5g2.convert import hf_t5gemma2

    hf_cfg = hf_t5gemma2.to_hf_config(dataclasses.replace(cfg, dtype="float32",
                                                          param_dtype="float32"))
    hf_cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(hf_cfg).float().eval()
    projector = model.model.encoder.multi_modal_projector
    with torch.no_grad():
        width = projector.mm_input_projection_weight.shape[0]
        projector.mm_input_projection_weight.normal_(0.0, width ** -0.5)
        projector.mm_soft_emb_norm.weight.normal_(0.0, 0.3)
    return model


def t5g2_vision(cfg: ModelConfig, state_dict):
    """t5g2's model with the reference's weights; (jitted forward of images [N, M, H, W, C],
    the number of vision parameters)."""
    import jax
    from flax import nnx

    from t5g2.convert import hf_t5gemma2
    from t5g2.model.params import abstract_model, load_params

    model = abstract_model(cfg)
    flat = hf_t5gemma2.from_hf_state_dict(state_dict, cfg)
    load_params(model, flat)
    parameters = sum(v.size for k, v in flat.items() if k.startswith("vision/"))
    del flat
    graphdef, state = nnx.split(model.vision)
    dtype = model.dtype

    @jax.jit
    def forward(state, images):
        return nnx.merge(graphdef, state)(images, dtype)

    return (lambda images: forward(state, images).block_until_ready()), parameters


def timed(call, repeats: int) -> tuple[float, list[float], Any]:
    """(first call's seconds, the next `repeats` calls' seconds, the last output)."""
    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return first, times, out


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ms_per_image(times: list[float], batch: int) -> float:
    return 1000 * statistics.median(times) / batch


def side_result(first: float, times: list[float], batch: int) -> dict[str, Any]:
    return dict(first_call_s=round(first, 4), times_s=[round(t, 4) for t in times],
                ms_per_image=round(ms_per_image(times, batch), 3))


def bench_dtype(cfg: ModelConfig, hf_models: dict, batch: int, repeats: int,
                seed: int) -> dict[str, Any]:
    """t5g2 and each reference attn implementation on one batch of images, in cfg.dtype."""
    import torch

    vision = cfg.vision
    size = vision.image_size
    pixels = np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(
        np.float32)
    torch_dtype = getattr(torch, cfg.dtype)
    state_dict = next(iter(hf_models.values())).state_dict()
    forward, parameters = t5g2_vision(cfg, state_dict)
    nhwc = pixels.transpose(0, 2, 3, 1)[:, None]  # [N, 1 image, H, W, C]
    first, times, ours = timed(lambda: forward(nhwc), repeats)
    ours = np.asarray(ours, np.float32).reshape(batch, vision.tokens_per_image, -1)
    ours_ms = ms_per_image(times, batch)
    out: dict[str, Any] = dict(t5g2=side_result(first, times, batch),
                               vision_parameters=int(parameters))
    progress(f"{cfg.dtype} t5g2: {out['t5g2']}")
    images = torch.from_numpy(pixels).to(torch_dtype)
    for attn, model in hf_models.items():
        if torch_dtype != torch.float32:  # a cast copy: the float32 weights stay as they are
            model = copy.deepcopy(model).to(torch_dtype)
        tower = model.model.encoder

        def call(tower=tower):
            with torch.no_grad():
                return tower.get_image_features(images).pooler_output

        first, times, theirs = timed(call, repeats)
        theirs = theirs.float().numpy()
        out[f"hf_{attn}"] = dict(side_result(first, times, batch),
                                 attn_implementation=tower.vision_tower.config._attn_implementation)
        out[f"hf_{attn}_ms_per_image_over_t5g2"] = round(ms_per_image(times, batch) / ours_ms, 3)
        out[f"max_abs_diff_hf_{attn}"] = float(np.abs(ours - theirs).max())
        out["max_abs_image_token"] = float(np.abs(theirs).max())
        progress(f"{cfg.dtype} hf_{attn}: {out[f'hf_{attn}']}")
        del model, tower
    return out


def run(vision: VisionConfig | None = None, *, text_width: int = 640, batch: int = 1,
        repeats: int = 3, dtypes=("float32",), attn=("sdpa",), query_chunk: int = 0,
        seed: int = 0) -> dict[str, Any]:
    """The whole benchmark as one JSON-able dict."""
    import torch

    from benchmarks.train_step import environment

    vision = vision or VisionConfig()
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch={batch} and repeats={repeats} must be >= 1")
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        raise ValueError(f"dtypes {sorted(unknown)}: valid are {', '.join(DTYPES)}")
    cfg = model_config(vision, text_width, "float32", query_chunk)
    hf_models = {a: reference_model(cfg, a, seed) for a in attn[:1]}
    for a in attn[1:]:  # the same weights under another attention implementation
        hf_models[a] = reference_model(cfg, a, seed)
        hf_models[a].load_state_dict(hf_models[attn[0]].state_dict())
    out: dict[str, Any] = dict(
        vision=dataclasses.asdict(vision), text_width=text_width, batch=batch, repeats=repeats,
        query_chunk=query_chunk,
        timing=("ms_per_image: the median of `repeats` warm calls over the batch; t5g2's first "
                "call compiles"),
        environment=environment())
    out["environment"].update(torch_num_threads=torch.get_num_threads())
    for dtype in dtypes:
        out[dtype] = bench_dtype(dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype),
                                 hf_models, batch, repeats, seed)
    out["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line (see the module docstring): prints the result as JSON, returns it."""
    import argparse
    import json

    defaults = VisionConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("image_size", "patch_size", "d_model", "ffn_dim", "num_layers", "num_heads",
                 "tokens_per_image"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"the tower's {name} (default: the released one's)")
    parser.add_argument("--text_width", type=int, default=640,
                        help="the projector's output width (the text model's)")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (median)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    parser.add_argument("--attn", default="sdpa",
                        help="the reference's attn_implementation(s), comma-separated: sdpa, eager")
    parser.add_argument("--query_chunk", type=int, default=0,
                        help="t5g2's attention query chunk (model.attention_query_chunk; 0: off)")
    parser.add_argument("--seed", type=int, default=0, help="weights and images")
    args = parser.parse_args(argv)
    vision = VisionConfig(**{name: getattr(args, name) for name in (
        "image_size", "patch_size", "d_model", "ffn_dim", "num_layers", "num_heads",
        "tokens_per_image")})
    vision.validate("vision")
    result = run(vision, text_width=args.text_width, batch=args.batch, repeats=args.repeats,
                 dtypes=tuple(args.dtypes.split(",")), attn=tuple(args.attn.split(",")),
                 query_chunk=args.query_chunk, seed=args.seed)
    print(json.dumps(result, indent=2))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
