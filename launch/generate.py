"""Generate text from a training run's checkpoint or a Hugging Face T5Gemma 2 directory
(t5g2/generate.py: encode once, cached decode).

    python -m launch.generate --workdir workdir/tiny --prompt "The data pipeline" [--prompt ...]
    python -m launch.generate --workdir <run> --prompts prompts.jsonl --max_new_tokens 64 \
        --temperature 0.8 --top_k 40 --top_p 0.95 --seed 0 --json
    python -m launch.generate --hf <dir with config.json, safetensors, tokenizer.model> ...
    python -m launch.generate --hf <multimodal dir> --image cat.jpg \
        --prompt "<start_of_image> What is in this picture?"

Exactly one of --workdir and --hf. Each prompt is read as the run's prefix-LM (S) denoiser
reads its input: [mode token] + prompt + EOS (`--mode_token=` for none). The tokenizer is the
run's own, or the directory's tokenizer.model (t5g2/inference_source.py): a directory written by
`launch.export` names the run's mode tokens too, so it generates what the run does; another has
none, and then the default is no mode token. A prompt may be as long as the run's training
lengths (a directory's max_position_embeddings) x --context_scale. `--prompts` is a JSONL file of
{"prompt": "..."} lines. The generated text goes to stdout, one line per prompt (or one JSON
object with `--json`); time to first token (encoder + prefill + first token, a warm call),
decode tokens/s after it, and peak memory (the device's, where it reports one, and the host
process's) go to stderr, and into the JSON.

Images (`--image PATH`, repeatable; a model with a vision tower): each `<start_of_image>` marker
in the prompts is where the next image goes, in order across the prompts (the first prompt's
markers take the first images), so several prompts with images generate in one batch. Each
marker becomes the image's token block as the reference processor lays it out, and the images
are decoded and preprocessed as it does (t5g2/data/images.py). The numbers of markers and images
must agree: a prompt with images but no marker is refused, as `Gemma3Processor` refuses it
(write the marker where the image belongs, e.g. at the start).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
from absl import flags

from launch import cli
from t5g2.configlib import ConfigError
from t5g2.data import images
from t5g2.data.images import IMAGE_MARKER

_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's workdir (a path or gs:// URL)"
                               "; or give --hf")
_HF = flags.DEFINE_string("hf", None, "a Hugging Face T5Gemma 2 directory (config.json, "
                          "safetensors, tokenizer.model); or give --workdir")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the latest)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)")
_PROMPTS = flags.DEFINE_string("prompts", None, 'a JSONL file of {"prompt": "..."} lines')
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate per prompt, at most")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample from the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample from the nucleus of this mass (1: all)")
_SEED = flags.DEFINE_integer("seed", 0, "the sampling PRNG seed")
_MODE_TOKEN = flags.DEFINE_string("mode_token", None, "the denoiser mode token to lead each "
                                  "prompt ('' for none; default [S] where the model has mode "
                                  "tokens, else none)")
_CONTEXT_SCALE = flags.DEFINE_float("context_scale", 1.0, "run at this many times the training "
                                    "context (global layers' RoPE interpolated)")
_DTYPE = flags.DEFINE_string("dtype", None, "compute dtype (default: the run's, or the "
                             "directory's parameter dtype), e.g. float32")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object with texts and timings")
_IMAGE = flags.DEFINE_multi_string("image", [], "an image file (repeatable): the images fill the "
                                   "prompts' <start_of_image> markers in order")


def read_prompts(prompts: list[str], path: str | None) -> list[str]:
    """The --prompt values, then the --prompts file's; an empty one or a bad line is an error."""
    texts = list(prompts)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompts={path}: {e}") from e
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--prompts={path} line {number} is not JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f'--prompts={path} line {number}: give {{"prompt": "..."}}')
            texts.append(row["prompt"])
    if not texts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    for i, text in enumerate(texts, 1):
        if not text.strip():
            raise ConfigError(f"prompt {i} is empty")
    return texts


def read_images(paths: list[str], texts: list[str]) -> list[list]:
    """Each prompt's decoded images (uint8 [H, W, 3]): the --image files fill the prompts'
    markers in order. A count that does not match, or a missing or undecodable file, is a
    ConfigError naming it; read before the model is, so a mistake costs no loading."""
    markers = [text.count(IMAGE_MARKER) for text in texts]
    if sum(markers) != len(paths):
        raise ConfigError(
            f"{len(paths)} --image file(s) but {sum(markers)} {IMAGE_MARKER} marker(s) in the "
            f"prompts: give one --image per marker and put one {IMAGE_MARKER} where each image "
            "goes (the images fill the markers in order, across the prompts)")
    decoded = []
    for path in paths:
        try:
            decoded.append(images.load_image(path))
        except images.ImageError as e:
            raise ConfigError(f"--image={path}: {e.problem}") from e
    starts = np.cumsum([0, *markers])
    return [decoded[a:b] for a, b in zip(starts, starts[1:])]


def encoder_rows(source, texts: list[str], head: list[int], with_images: bool) -> list[list[int]]:
    """Each prompt's encoder ids: head + the prompt (its image markers expanded into image token
    blocks when there are images) + EOS."""
    vocab, cfg = source.vocab, source.model_cfg
    if not with_images:
        return [head + [int(t) for t in vocab.encode(text)] + [vocab.eos_id] for text in texts]
    rows = []
    for i, text in enumerate(texts, 1):
        try:
            ids = images.encode_with_images(
                vocab.encode, text, text.count(IMAGE_MARKER),
                tokens_per_image=cfg.vision.tokens_per_image, boi_id=cfg.boi_token_id,
                image_id=cfg.image_token_id, eoi_id=cfg.eoi_token_id, where=f"prompt {i}")
        except images.ImageError as e:  # e.g. the text spells an image token itself
            raise ConfigError(str(e)) from e
        rows.append(head + ids.tolist() + [vocab.eos_id])
    return rows


def image_batch(per_prompt: list[list], size: int) -> np.ndarray:
    """[prompts, most images of a prompt, size, size, 3] preprocessed; unused slots zero."""
    batch = np.zeros((len(per_prompt), max(map(len, per_prompt)), size, size, 3), np.float32)
    for row, decoded in enumerate(per_prompt):
        for slot, image in enumerate(decoded):
            batch[row, slot] = images.preprocess(image, size)
    return batch


def main(argv):
    del argv
    cli.setup_logging()
    texts = read_prompts(_PROMPT.value, _PROMPTS.value)
    if _MAX_NEW.value <= 0:
        raise ConfigError(f"--max_new_tokens={_MAX_NEW.value} must be a positive integer")
    per_prompt = read_images(_IMAGE.value, texts) if _IMAGE.value else None
    import jax

    from t5g2.generate import Sampling, generate
    from t5g2.inference_source import open_source

    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    source = open_source(_WORKDIR.value, _HF.value, step=_STEP.value,
                         context_scale=_CONTEXT_SCALE.value, dtype=_DTYPE.value)
    head = source.mode_head(_MODE_TOKEN.value)
    if per_prompt is None and source.model_cfg.vision is not None:
        read_images([], texts)  # a multimodal model's markers need images
    pixels = None
    if per_prompt is not None:
        if source.model_cfg.vision is None:
            raise ConfigError(f"--image given but {source.name} is a text-only model (no vision "
                              "tower): leave out --image, or load a multimodal model")
        pixels = image_batch(per_prompt, source.model_cfg.vision.image_size)
    rows = encoder_rows(source, texts, head, pixels is not None)
    enc = np.full((len(rows), max(map(len, rows))), source.model_cfg.pad_id, np.int32)
    for i, row in enumerate(rows):
        enc[i, :len(row)] = row
    limit = source.max_positions
    for i, row in enumerate(rows, 1):
        if len(row) > limit:
            raise ConfigError(f"prompt {i} is {len(row)} tokens with its mode token and EOS, "
                              f"longer than the model's context of {limit} ("
                              + ("its training lengths" if source.step is not None else
                                 "config.json's max_position_embeddings")
                              + f" x --context_scale={_CONTEXT_SCALE.value:g}): shorten it or "
                              "raise --context_scale")
    key = jax.random.key(_SEED.value)

    def timed(max_new_tokens):  # a compiling call, then the measured one
        call = lambda: generate(source.model, enc, max_new_tokens=max_new_tokens,  # noqa: E731
                                sampling=sampling, key=key, max_positions=limit,
                                encoder_images=pixels)
        call()
        began = time.perf_counter()
        out = call()
        return out, time.perf_counter() - began

    _, first = timed(1)
    out, total = timed(_MAX_NEW.value)
    new_tokens = int(out.lengths.sum())
    decoded = [source.decode(out.tokens[i, :out.lengths[i]]) for i in range(len(texts))]
    stats = dict(prompts=len(texts), images=len(_IMAGE.value), new_tokens=new_tokens,
                 time_to_first_token_s=first,
                 decode_tokens_per_s=(new_tokens - len(texts)) / max(total - first, 1e-9),
                 peak_host_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                 * 1024)
    device_stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in device_stats:
        stats["peak_device_memory_bytes"] = int(device_stats["peak_bytes_in_use"])
    if _JSON.value:
        print(json.dumps(dict(step=source.step, source=source.name, results=[
            dict(prompt=t, text=d, tokens=out.tokens[i, :out.lengths[i]].tolist(),
                 encoder_tokens=rows[i])
            for i, (t, d) in enumerate(zip(texts, decoded))], **stats)))
    else:
        for text, generated in zip(texts, decoded):
            print(f"{text}\n  -> {generated}")
    print("%s: %d prompts, %d new tokens; time to first token %.3f s, decode %.1f "
          "tokens/s, peak host memory %.0f MiB%s" % (
              source.name if source.step is None else f"step {source.step}", len(texts),
              new_tokens, first, stats["decode_tokens_per_s"],
              stats["peak_host_memory_bytes"] / 2**20,
              f", peak device memory {stats['peak_device_memory_bytes'] / 2**20:.0f} MiB"
              if "peak_device_memory_bytes" in stats else ""), file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
