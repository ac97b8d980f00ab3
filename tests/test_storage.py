"""Storage that fails: a checkpoint save or a metrics write that fails for a moment is tried again;
one that keeps failing stops the run with a message naming the path (exit status 75), and the
checkpoint before it stays complete and restorable."""

import pytest
from etils import epath

from test_paths import FakeGCS, bucket  # noqa: F401 (a fixture: gs:// served from memory)
from tiny_run import tiny_batches, tiny_setup
from transformer_jax import checkpoints, errors, paths, trainer


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
  """Metrics retries without their 1 s and 2 s pauses (a checkpoint's keep them: orbax's threads
  of the failed save end meanwhile)."""
  monkeypatch.setattr(paths.time, "sleep", lambda s: None)


def fail_writes(monkeypatch, inside: str, times: int):
  """The next `times` writes of orbax's metadata files under `inside` raise an I/O error, as an
  object store's failed upload would; the paths written are returned."""
  write_text, failed = epath.Path.write_text, []

  def flaky(self, *args, **kwargs):
    if inside in str(self) and len(failed) < times:
      failed.append(str(self))
      raise OSError(5, "Input/output error (injected)", str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", flaky)
  return failed


def test_a_save_that_fails_for_a_moment_is_tried_again(tmp_path, monkeypatch, caplog):
  config, setup = tiny_setup(steps=8, checkpoint_every=4)
  failed = fail_writes(monkeypatch, "checkpoints/4", times=1)
  state = trainer.train(config, str(tmp_path), setup, tiny_batches(config, setup))
  assert failed and int(state.step) == 8
  # orbax reports the failed asynchronous save of step 4 at the next save, which the retry makes.
  assert checkpoints.saved_steps(tmp_path)[-1] == 8
  assert (f"A checkpoint save to {tmp_path}/checkpoints failed (OSError: [Errno 5] Input/output "
          f"error (injected): '{tmp_path}/checkpoints/4.orbax-checkpoint-tmp/") in caplog.text
  assert "saving step 8 again in 1 s (attempt 2 of 3)" in caplog.text


def test_a_save_that_keeps_failing_stops_the_run_naming_the_path_and_keeps_the_last_one(
    tmp_path, monkeypatch):
  config, setup = tiny_setup(steps=8, checkpoint_every=4)
  fail_writes(monkeypatch, "checkpoints/8", times=10**6)
  with pytest.raises(errors.StorageError) as raised:
    trainer.train(config, str(tmp_path), setup, tiny_batches(config, setup))
  message = str(raised.value)
  assert f"saving checkpoint 8 to {tmp_path}/checkpoints failed 3 times" in message
  assert "Input/output error (injected)" in message and "checkpoints/8.orbax-checkpoint-tmp" in message
  assert "Checkpoint 4 is complete, and running the same command again resumes from it" in message
  assert raised.value.exit_code == 75
  monkeypatch.undo()
  assert checkpoints.saved_steps(tmp_path) == [4]
  manager, (restored, _) = checkpoints.restore_for_training(tmp_path, config.train, setup)
  manager.close()
  assert int(restored.step) == 4


def test_a_metrics_write_to_the_bucket_is_tried_again_then_stops_naming_the_object(
    bucket, monkeypatch):  # noqa: F811
  log = paths.AppendLog("gs://bucket/run/metrics.jsonl")
  open_file, failures = FakeGCS._open, []

  def flaky(self, path, mode="rb", **kwargs):
    if "w" in mode and len(failures) < failing[0]:
      failures.append(path)
      raise OSError(503, "Service Unavailable (injected)")
    return open_file(self, path, mode, **kwargs)

  monkeypatch.setattr(FakeGCS, "_open", flaky)
  failing = [2]
  log.write('{"step": 1}\n')  # Two failures, then the third try.
  assert len(failures) == 2
  assert paths.resolve("gs://bucket/run/metrics.jsonl").read_text() == '{"step": 1}\n'
  failing[0] = 10**6
  with pytest.raises(errors.StorageError, match=r"writing gs://bucket/run/metrics.jsonl failed 3 "
                                                r"times, the last with OSError: .*Service Unavailable"):
    log.write('{"step": 2}\n')
