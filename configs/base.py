"""Shared config structure. Each size file fills in the Gemma 3 dimensions and the run settings.

Sections: `model` (t5g2.model.ModelConfig), `train` (t5g2.train.config.TrainConfig), `mesh`,
`data`, `init`, `checkpoint`, `eval`, declared as typed dataclasses (t5g2/run_config.py, whose
defaults the sections below are built from) and validated together once at start
(`RunConfig.from_config`); override any field from the command line, e.g.
`--config.model.cross_attention=separate --config.mesh.fsdp=8`.
"""

import dataclasses

import ml_collections


def stack(*, num_layers, d_model, ffn_dim, num_heads, num_kv_heads, sliding_window,
          head_dim=256, query_pre_attn_scalar=256.0, global_rope_scale=1.0):
    """One Gemma 3 stack (t5g2.model.StackConfig): 5 local (theta 1e4) : 1 global (theta 1e6)
    layers by default."""
    from t5g2.model.config import StackConfig
    from t5g2.run_config import config_section

    return config_section(
        StackConfig, num_layers=num_layers, d_model=d_model, ffn_dim=ffn_dim,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window,
        global_rope_scale=global_rope_scale)


def model(encoder, *, vocab_size=262_144, decoder=None):
    """T5Gemma 2 (t5g2.model.ModelConfig) with the paper's defaults: tied embeddings, merged
    attention."""
    from t5g2.model import ModelConfig
    from t5g2.run_config import config_section

    return config_section(ModelConfig, encoder=encoder, vocab_size=vocab_size,
                          decoder=ml_collections.ConfigDict(decoder or encoder.to_dict()))


def vision(**overrides):
    """The SigLIP tower and projector (t5g2.model.VisionConfig): by default the released
    so400m/14 at 896 pixels, 256 tokens per image, frozen (`trainable="none"`)."""
    from t5g2.model.config import VisionConfig
    from t5g2.run_config import config_section

    return config_section(VisionConfig, **overrides)


VARIANTS = ("", "text")


def released_model(encoder, variant: str | None):
    """A released size's model section: T5Gemma 2 with the released tower, or text only for
    the variant "text" (`--config=configs/<size>.py:text`, the way to drop the tower, since a
    command-line override cannot set a section to None)."""
    variant = variant or ""
    if variant not in VARIANTS:
        from t5g2.configlib import ConfigError

        raise ConfigError(f"config variant {variant!r} is unknown; valid: '' (with the vision "
                          "tower) or 'text' (e.g. --config=configs/t5g2_270m.py:text)")
    cfg = model(encoder)
    if variant != "text":
        cfg.vision = vision()
    return cfg


# A tower for tests and CPU runs: 56 px, 4 x 4 patches pooled to 2 x 2 = 4 tokens per image.
TINY_VISION = dict(image_size=56, patch_size=14, d_model=32, ffn_dim=64, num_layers=2,
                   num_heads=2, tokens_per_image=4)


def train(*, batch_size, encoder_length, decoder_length, steps, learning_rate=1e-4,
          grad_accum_steps=1, log_every=10):
    """The train section (t5g2.train.config.TrainConfig): AdamW, 100 warmup steps then cosine
    decay, global-norm clipping 1.0 (the paper's), z-loss 1e-4. on_nonfinite: a step with a
    non-finite loss, gradient or update "stop"s the run (nothing non-finite is saved) or is
    "skip"ped (its update dropped; `max_skipped` in a row stop it)."""
    from t5g2.run_config import config_section
    from t5g2.train.config import TrainConfig

    return config_section(TrainConfig, batch_size=batch_size, encoder_length=encoder_length,
                          decoder_length=decoder_length, steps=steps,
                          learning_rate=learning_rate, grad_accum_steps=grad_accum_steps,
                          log_every=log_every, z_loss=1e-4)


def mesh(*, data=-1, fsdp=1, tensor=1):
    """ICI axis sizes (one may be -1 = the rest) and DCN sizes (slices / hosts) per axis."""
    from t5g2.run_config import MeshConfig, config_section

    return config_section(MeshConfig, data=data, fsdp=fsdp, tensor=tensor)


def data(source: str = "ul2"):
    """The batch source. "ul2": the UL2 pipeline, `data.ul2` = t5g2.data.pipeline.PipelineConfig
    less the fields the train config and seed set (lengths, global batch, seed); by default the
    embedded corpus and a sentencepiece model trained on it at first use. "seqio": the seqio
    task or mixture `data.seqio.task`, registered by importing the modules `data.seqio.modules`
    (t5g2.data.seqio_tasks.SeqioSource: packed, sharded by process; needs the `seqio` extra).
    "synthetic": a copy task; `distinct_batches=k` cycles through k batches (0: a new batch
    every step). `image_text`: image-text examples mixed into the UL2 rows
    (t5g2.data.image_text.ImageTextConfig; off while its `paths` is empty)."""
    from t5g2.data.image_text import ImageTextConfig
    from t5g2.data.pipeline import PipelineConfig
    from t5g2.run_config import UL2_SET_ELSEWHERE, SeqioConfig, config_section

    ul2 = {}
    for field in dataclasses.fields(PipelineConfig):
        if field.name in UL2_SET_ELSEWHERE:
            continue
        default = field.default
        if default is None or field.name == "mixture":  # optional, or a name or a list
            kind = {"str": str, "int": int, "tup": tuple}.get(str(field.type)[:3], object)
            default = ml_collections.FieldReference(default, field_type=kind)
        ul2[field.name] = default
    return ml_collections.ConfigDict(dict(source=source, distinct_batches=0,
                                          ul2=ml_collections.ConfigDict(ul2),
                                          image_text=config_section(ImageTextConfig),
                                          seqio=config_section(SeqioConfig)))


def init():
    """Where a fresh run's parameters come from (a workdir holding checkpoints always resumes):
    from_gemma3: a Hugging Face Gemma 3 directory, adapted into the encoder-decoder;
    from_t5gemma2: a Hugging Face T5Gemma 2 directory, to continue training; neither: random.
    vision_from: a checkpoint (T5Gemma 2, multimodal Gemma 3, SiglipVisionModel) whose tower (and
    projector, if it maps into this model's width) starts `model.vision` (t5g2/train/init.py)."""
    from t5g2.run_config import InitConfig, config_section

    return config_section(InitConfig)


def checkpoint(*, every=1000, keep=3, keep_period=0):
    """Orbax checkpoints under <workdir>/checkpoints: one every `every` steps (and at the end, and
    on SIGTERM), keeping the last `keep` plus every `keep_period`-th step (0: none). A run resumes
    from the latest, or from `restore_step`; `fallback` lets a corrupt latest checkpoint fall
    back to the newest good one instead of stopping."""
    from t5g2.run_config import CheckpointConfig, config_section

    return config_section(CheckpointConfig, every=every, keep=keep, keep_period=keep_period)


def evaluation(*, every=0, batches=2, holdout_documents=0, samples=0):
    """Held-out loss and token accuracy per denoiser of the UL2 mixture (t5g2/train/eval.py),
    logged every `every` steps and at the end (0: off; `python -m launch.eval` evaluates a
    checkpoint), over `batches` global batches per denoiser, from the last `holdout_documents`
    documents of data.ul2's source (then left out of training) or, with `source_paths` (paths or
    globs), from those files, read with data.ul2's kind and field. At the end of a
    single-process run, greedy generations for the first `samples` held-out inputs of each
    denoiser are printed next to their targets (t5g2/train/samples.py)."""
    from t5g2.train.eval import EvalConfig
    from t5g2.run_config import config_section

    return config_section(EvalConfig, every=every, batches=batches,
                          holdout_documents=holdout_documents, samples=samples)


def config(model_cfg, train_cfg, mesh_cfg, *, name):
    cfg = ml_collections.ConfigDict()
    cfg.name = name
    cfg.seed = 0
    cfg.model = model_cfg
    cfg.train = train_cfg
    cfg.mesh = mesh_cfg
    cfg.data = data()
    cfg.init = init()
    cfg.checkpoint = checkpoint()
    cfg.eval = evaluation()
    # Peak FLOP/s of one device for MFU; None: the device kind's published bf16 peak, or on
    # CPU a matmul measured at start.
    cfg.peak_flops_per_device = ml_collections.FieldReference(None, field_type=float)
    # Multi-host: how long the other processes wait to see the marker process 0 writes into the
    # workdir at start (t5g2/train/shared_workdir.py); a workdir not shared stops the run there.
    cfg.shared_workdir_timeout_s = 60.0
    return cfg


def adaptation_16k(model_cfg, *, name, batch_size=8):
    """16K-token adaptation, FSDP over every device, sized for 8 devices (8xH100, v5p-16); a
    v5p-8 is 4 devices: 270M and 1B fit, 4B does not (launch.aot --topology v5p-8)."""
    model_cfg.remat = "full"
    model_cfg.attention_query_chunk = 1024  # the xla path's query groups
    model_cfg.attention_impl = "auto"  # TPU: splash; GPU: cudnn, gpu_flash; elsewhere xla
    train_cfg = train(batch_size=batch_size, encoder_length=16_384, decoder_length=16_384,
                      steps=100_000)
    train_cfg.loss_chunk = 1024
    return config(model_cfg, train_cfg, mesh(data=1, fsdp=-1, tensor=1), name=name)
