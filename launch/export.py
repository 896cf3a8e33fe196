"""Export a training run's checkpoint as a Hugging Face T5Gemma 2 directory.

    python -m launch.export --workdir workdir/tiny --out /tmp/t5g2_hf [--step 300]
    python -m launch.export --workdir <16K run> --out <dir> --context_scale 8   # for 128K inputs

The result loads with `transformers.T5Gemma2ForConditionalGeneration.from_pretrained(out)`;
exporting itself needs neither torch nor transformers. Only merged-attention runs export (the
Hugging Face T5Gemma 2 has no separate cross-attention). The run's sentencepiece model is written
too when the run used the UL2 pipeline.
"""

from __future__ import annotations

from absl import flags

from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "the training run's workdir (a path or a gs:// URL)")
_OUT = flags.DEFINE_string("out", None, "the Hugging Face directory to write")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the latest)")
_CONTEXT_SCALE = flags.DEFINE_float(
    "context_scale", 1.0, "run the model at this many times its training context: the global "
    "layers' linear RoPE scale is multiplied by it (written to config.json's rope_parameters)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a non-empty --out directory")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    cli.setup_logging()
    from t5g2.train.export import export

    result = export(_WORKDIR.value, _OUT.value, step=_STEP.value, overwrite=_OVERWRITE.value,
                    context_scale=_CONTEXT_SCALE.value)
    print(f"exported step {result.step} to {result.out}: {', '.join(result.files)}")


if __name__ == "__main__":
    cli.run(main)
