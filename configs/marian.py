"""Fine-tune a Hugging Face Marian translation model, such as a published opus-mt model.

  python train.py --config configs/marian.py:/path/to/opus-mt-en-de --workdir runs/finetune \
      --config.data.text_train=train.tsv --config.data.text_validation=dev.tsv \
      --config.data.text_test=test.tsv

The directory is the model as `transformers` saves it (config.json, the weights, source.spm,
target.spm, vocab.json). The architecture comes from it (`transformer_jax.marian.model_fields`):
swish activations, a logits bias and LayerNorm epsilon 1e-5, as Marian's models have; the run
starts from its weights (`init_from`) and keeps using its tokenizer. The training recipe is a
fine-tuning one: a constant learning rate of 5e-5 after a short warm-up, small batches.
"""

import json
import os

from transformer_jax.config import base_config
from transformer_jax.marian import model_fields


def get_config(directory: str):
  config = base_config()
  config.model.update(model_fields(directory))
  config.init_from = directory
  tokenizer_config = os.path.join(directory, "tokenizer_config.json")
  if os.path.exists(tokenizer_config):
    with open(tokenizer_config, encoding="utf-8") as f:
      languages = json.load(f)
    for side in ("source_lang", "target_lang"):
      if isinstance(languages.get(side), str):
        config.data[side] = languages[side]
  # The beam size: generation_config.json, or config.json in models converted before it existed.
  for name in ("config.json", "generation_config.json"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        config.decode.beam_size = int(json.load(f).get("num_beams", config.decode.beam_size))
  config.data.dataset = "text"
  config.data.tokens_per_batch = 4096
  config.train.schedule = "constant"
  config.train.learning_rate = 5e-5
  config.train.warmup_steps = 200
  config.train.num_steps = 10_000
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.checkpoint_every = 500
  return config
