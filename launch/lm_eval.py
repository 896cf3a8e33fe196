"""EleutherAI's lm-evaluation-harness with the t5g2 model registered: `lm_eval`'s own command line.

    python -m launch.lm_eval run --model t5g2 --model_args workdir=workdir/tiny,dtype=float32 \
        --tasks <tasks> [--include_path <dir of task yamls>] [--output_path <dir> --log_samples]
    python -m launch.lm_eval run --model t5g2 --model_args hf=<T5Gemma 2 dir> --tasks <tasks>

`--model_args`: exactly one of workdir (a training run) and hf (a Hugging Face T5Gemma 2
directory with its tokenizer.model); step (a run's checkpoint, default the latest), dtype (the
compute dtype, e.g. float32; default the run's / the directory's), mode_token (default [S], the
prefix-LM denoiser's, where the model has mode tokens; empty for none), max_encoder_length /
max_decoder_length (default the run's lengths, or the directory's max_position_embeddings, x
context_scale), context_scale (t5g2.model.config.ModelConfig.with_longer_context), max_gen_toks
(generate_until's default, 256) and seed (of sampled generation, 0); lm_eval's own
`--batch_size` sets the rows per call. See t5g2/lm_eval_model.py.
"""

from __future__ import annotations

from launch import cli


def main() -> None:
    cli.setup_logging()
    import t5g2.lm_eval_model  # noqa: F401  (registers the model "t5g2")
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except cli.KNOWN_ERRORS as e:
        cli.fail(str(e))


if __name__ == "__main__":
    main()
