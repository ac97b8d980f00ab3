"""The offline quick start: a small Transformer on the Bible en-de corpus, sized for a 2-core CPU.

Same architecture and training recipe as base (post-LN, shared embeddings, label smoothing 0.1,
Adam with the paper's schedule), narrower and shallower: N=3, d_model=256, d_ff=1024, h=4 (d_k=64
as in base), an 8,000-piece vocabulary, packed rows of 128 tokens and a 30-minute training budget.
Three departures, each chosen on validation (BENCHMARKS.md): a learning-rate cooldown at the end of
the budget, no dropout, and the final parameters for the test instead of a checkpoint average.
"""

from transformer_jax.config import base_config


def get_config():
  config = base_config()
  config.model.vocab_size = 8000
  config.model.d_model = 256
  config.model.d_ff = 1024
  config.model.num_heads = 4
  config.model.num_layers = 3
  config.model.max_len = 128
  # A departure, chosen on validation: 30 minutes are about 7 epochs of this corpus, too short for
  # the paper's P_drop=0.1 to pay for itself. Without dropout (a step is also a few % cheaper)
  # validation BLEU on all 1,525 verses (beam 4) was 29.9 against 28.8, and every BLEU threshold
  # came earlier; P_drop=0.2 was 0.33 nats behind at step 1,000 and was stopped there; P_drop=0.05
  # tied (29.5 on validation against 29.6 and 29.9 for two runs of this config).
  config.model.dropout_rate = 0.0
  config.data.dataset = "bible"
  config.data.tokens_per_batch = 4096
  config.data.packing = True  # One batch shape (one compilation) and little padding.
  config.train.num_steps = 100_000  # The time budget ends the run first.
  config.train.time_budget_minutes = 30.0
  # Chosen on validation (never the test): with the paper's schedule, 400 warm-up steps instead of
  # 1,000 (the same learning rate from step 1,000 on) gave validation loss 2.53 against 2.80 at
  # step 1,000 (greedy BLEU 15.5 against 14.1); doubling the learning rate instead gave 2.82.
  config.train.warmup_steps = 400
  # A departure, chosen on validation: the learning rate falls linearly to 0 over the budget's last
  # 20% (6 minutes; Hägele et al. 2024 found 20% matches a cosine schedule of known length). The
  # paper's schedule ends a 30-minute run at half its peak rate; with the cooldown validation loss
  # ended at 2.00 instead of 2.14 and greedy BLEU at 28.1 instead of 24.7 (BENCHMARKS.md). A
  # cooldown over the last 40% memorised more and scored lower (29.4 on validation).
  config.train.cooldown_fraction = 0.2
  config.train.log_every = 20
  config.train.eval_every = 250  # Time to quality is read off the validation passes.
  # Section 6.1 averages the last 5 checkpoints. After a cooldown to rate 0 the final parameters
  # did better on all 1,525 validation verses (beam 4): 28.8 against 28.0 for the average of the
  # last 5 (with dropout 0.1), 29.9 against 29.1 (without); the 128-verse greedy check that picks
  # between the two chose the average once in two, so the test takes the final parameters.
  config.train.checkpoint_every = 100
  config.train.checkpoints_to_average = 1
  config.train.eval_bleu_sentences = 128
  return config
