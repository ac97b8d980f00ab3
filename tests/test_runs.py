"""Loading a trained run: its checkpoints chosen or averaged, the errors that name what is wrong
with a workdir, and translating with it, compiled once per batch shape for the whole run."""

import jax
import pytest

import tiny_run
from transformer_jax import checkpoints, runs, steps, translation
from transformer_jax.tokenizer import train_tokenizer

SENTENCES = [f"the {a} {b} went to the {c}" for a in ("red", "old", "big") for b in ("cat", "dog")
             for c in ("market", "river", "house")] * 5


def saved_run(workdir, vocab_size: int = 48, attention_impl: str = "einsum"):
  """A workdir as training leaves it (also for tests/test_cli.py): a tokenizer of SENTENCES and
  checkpoints 1 and 2 of an untrained tiny model, whose saved config says `attention_impl` (the
  parameters are the same for all: "cudnn" is saved without running it)."""
  train_tokenizer(SENTENCES, vocab_size=vocab_size).save(workdir / "tokenizer.model")
  config = tiny_run.tiny_run_config(steps=4)
  config.model.vocab_size = vocab_size
  setup = steps.make_setup(config, jax.devices()[:1])
  config.model.attention_impl = attention_impl
  state = setup.init_state(0)
  manager = checkpoints.make_manager(str(workdir), config.train)
  for step in (1, 2):
    state = state.replace(step=state.step + 1)
    checkpoints.save(manager, state, {"next_index": step}, config)
  manager.wait_until_finished()
  manager.close()
  return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return saved_run(tmp_path_factory.mktemp("run"))


def test_a_run_loads_its_last_checkpoint_or_the_ones_asked_for(run_dir):
  assert runs.load_run(str(run_dir)).steps == [2]
  assert runs.load_run(str(run_dir), step=1).steps == [1]
  run = runs.load_run(str(run_dir), average_last=2)
  assert run.steps == [1, 2] and run.tokenizer.vocab_size == run.config.model.vocab_size == 48


def test_a_run_trained_with_cudnn_attention_translates_where_there_is_none(run_dir, tmp_path):
  """cuDNN's attention is a GPU's kernel for the paper's function: a run trained with it loads on a
  CPU with XLA's attention, and translates as the same run trained without it."""
  gpu_run = runs.load_run(str(saved_run(tmp_path, attention_impl="cudnn")))
  assert gpu_run.config.model.attention_impl == "dot_product"
  sentences = SENTENCES[:6]
  assert gpu_run.translate(sentences) == runs.load_run(str(run_dir)).translate(sentences)


def test_an_unusable_workdir_is_named_with_what_is_wrong(run_dir, tmp_path):
  with pytest.raises(runs.RunError, match="does not exist; train a model first"):
    runs.load_run(str(tmp_path / "nowhere"))
  with pytest.raises(runs.RunError, match="has no checkpoints"):
    runs.load_run(str(tmp_path))
  with pytest.raises(runs.RunError, match=r"has no checkpoint at step 3; it has \[1, 2\]"):
    runs.load_run(str(run_dir), step=3)
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "checkpoints").symlink_to(run_dir / "checkpoints")
  train_tokenizer(SENTENCES, vocab_size=40).save(broken / "tokenizer.model")
  with pytest.raises(runs.RunError, match="has 40 pieces but the checkpoint's model has vocab_size=48"):
    runs.load_run(str(broken))


class CompileCounter:
  """Counts XLA compilations inside a `with` block: jax's backend-compile events, and the programs
  it loads from the persistent compilation cache instead (which the test run shares between
  processes, tests/conftest.py)."""

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen_duration)
    jax.monitoring.register_event_listener(self._listen)
    return self

  def _listen_duration(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def _listen(self, event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      self.count += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen_duration)
    jax.monitoring.unregister_event_listener(self._listen)


def test_decoding_compiles_once_per_shape_for_the_whole_run(run_dir):
  """As validation passes do: the same run translating the same shapes again compiles nothing, and
  neither does the same model loaded again (its translate functions are `translation`'s, kept for
  the model and mesh, not for one Run or Setup)."""
  # Other tests in this process may have translated these shapes with an equal model (test_cli's
  # run): start from new translate functions, so that the first pass does compile.
  translation.translator.cache_clear()
  run = runs.load_run(str(run_dir))
  sentences = ["the red cat went to the market", "the old dog", "the big dog went to the house"]
  for beam_size in (1, 2):  # Greedy, as validation decodes, and beam search, as the test does.
    with CompileCounter() as first:
      expected = run.translate(sentences, beam_size=beam_size)
    for _ in range(2):  # Two more passes over the same shapes, as later validations make.
      with CompileCounter() as again:
        assert run.translate(sentences, beam_size=beam_size) == expected
      assert again.count == 0, f"beam {beam_size}: {again.count} compilations on a repeated pass"
    assert first.count >= 1
  reloaded = runs.load_run(str(run_dir))
  with CompileCounter() as again:
    assert reloaded.translate(sentences, beam_size=1) == run.translate(sentences, beam_size=1)
  assert again.count == 0
