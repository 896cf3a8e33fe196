"""A tiny T5Gemma 2 for tests and the CPU main job (a short UL2 run on the embedded corpus):
12 layers (two global), GQA 4/2, window 8.

Small enough to train in seconds on one CPU core, large enough that every mechanism matters:
sequences longer than the window, two global layers, grouped-query attention with 2 kv heads,
head_dim != query_pre_attn_scalar, an EOI id inside the vocabulary.
"""

from configs import base


def get_config():
    enc = base.stack(num_layers=12, d_model=64, ffn_dim=128, num_heads=4, num_kv_heads=2,
                     head_dim=16, query_pre_attn_scalar=24.0, sliding_window=8,
                     global_rope_scale=8.0)
    model = base.model(enc, vocab_size=512)
    model.eoi_token_id = 500
    model.image_token_id = 501
    model.boi_token_id = 502  # with a tower (`model.vision = base.vision(**base.TINY_VISION)`)
    model.dtype = "float32"
    model.remat = "save_dots"  # on CPU the fastest: fewer stacked residuals around the layer scan
    train = base.train(batch_size=8, encoder_length=128, decoder_length=128, steps=300,
                       learning_rate=3e-3, log_every=25)
    train.warmup_steps = 20
    cfg = base.config(model, train, base.mesh(), name="tiny")
    # UL2 on the embedded corpus with a 480-piece sentencepiece model trained on it at first
    # use: + 10 sentinels (what the T5Gemma 2 mixture needs at 128/128) stays below the EOI id.
    cfg.data.ul2.vocab_size = 480
    cfg.checkpoint.every = 100
    # Held-out loss per denoiser every 100 steps, from the corpus's last 16 documents; at the
    # end, a greedy sample of each denoiser's first held-out input.
    cfg.eval.update(every=100, batches=2, holdout_documents=16, samples=1)
    return cfg
