"""Data: the tfds parallel corpora and the grain input pipeline (never imports flax)."""
