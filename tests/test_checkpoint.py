"""checkpoint.py on a small sharded state: save/restore, manifest, listing, params-only restore."""

import json

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cleanclip_jax import checkpoint, sharding, train_step


def make_state(step: int, mesh):
  """A TrainState whose kernel is split over the 8 devices, like an FSDP-sharded parameter."""
  kernel = NamedSharding(mesh, P('data', None))
  params = {'tower': {'kernel': jax.device_put(jnp.full((8, 4), float(step)), kernel)},
            'logit_scale': jnp.float32(step)}
  opt_state = optax.adamw(1e-3).init(params)
  return train_step.TrainState(step=jnp.int32(step), params=params, opt_state=opt_state,
                               rng=jax.random.PRNGKey(step))


def make_iterator():
  return iter(grain.MapDataset.range(1000).shuffle(seed=3).batch(4).to_iter_dataset())


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh({'data': -1, 'fsdp': 1})


def save_steps(workdir, mesh, steps, keep=3):
  config = ml_collections.ConfigDict({'seed': 1, 'name': 'test'})
  iterator = make_iterator()
  saver = checkpoint.Checkpointer(workdir, keep=keep)
  batches = {}
  for step in steps:
    next(iterator)
    saver.save(step, make_state(step, mesh), iterator, config)
    batches[step] = next(make_iterator_after(iterator))
  saver.close()
  return batches


def make_iterator_after(iterator):
  """A fresh iterator set to `iterator`'s position (what a restore should reproduce)."""
  other = make_iterator()
  other.set_state(iterator.get_state())
  return other


def test_save_restore_roundtrip_with_shardings_and_data_position(tmp_path, mesh):
  batches = save_steps(tmp_path, mesh, [1, 2, 3])
  assert checkpoint.committed_steps(tmp_path) == [1, 2, 3]
  restorer = checkpoint.Checkpointer(tmp_path)
  iterator = make_iterator()
  step, state = restorer.restore_latest(abstract(make_state(0, mesh)), iterator)
  restorer.close()
  assert step == 3 and int(state.step) == 3
  np.testing.assert_array_equal(state.params['tower']['kernel'], np.full((8, 4), 3.0))
  assert state.params['tower']['kernel'].sharding.spec == P('data', None)  # straight onto its sharding
  np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(next(iterator), batches[3])  # the data stream continues exactly


def test_keep_last_n(tmp_path, mesh):
  save_steps(tmp_path, mesh, [1, 2, 3, 4], keep=2)
  assert checkpoint.committed_steps(tmp_path) == [3, 4]


def test_manifest_covers_every_item_file(tmp_path, mesh):
  save_steps(tmp_path, mesh, [5])
  step_dir = tmp_path / 'checkpoints' / '5'
  manifest = json.loads((step_dir / checkpoint.MANIFEST_NAME).read_text())['files']
  assert {name.split('/')[0] for name in manifest} == {'state', 'data', 'config'}
  assert checkpoint.verify(step_dir) == []


def test_restore_params_forms_and_config(tmp_path, mesh):
  save_steps(tmp_path, mesh, [1, 2])
  newest = checkpoint.restore_params(tmp_path)
  assert isinstance(newest['tower']['kernel'], np.ndarray)
  np.testing.assert_array_equal(newest['tower']['kernel'], np.full((8, 4), 2.0))
  for path in (tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '1'):
    older = checkpoint.restore_params(path, step=1 if path.name == 'checkpoints' else None)
    assert float(older['logit_scale']) == 1.0
  target = abstract(make_state(0, mesh).params)
  placed = checkpoint.restore_params(tmp_path, abstract_params=target)
  assert placed['tower']['kernel'].sharding == target['tower']['kernel'].sharding
  assert checkpoint.load_config(tmp_path).name == 'test'
  with pytest.raises(checkpoint.NoCheckpointError, match='step 7'):
    checkpoint.restore_params(tmp_path, step=7)
  with pytest.raises(checkpoint.NoCheckpointError):
    checkpoint.restore_params(tmp_path / 'elsewhere')


def test_fresh_workdir_has_nothing_to_resume(tmp_path, mesh):
  restorer = checkpoint.Checkpointer(tmp_path)
  assert restorer.restore_latest(abstract(make_state(0, mesh)), make_iterator()) is None
  restorer.close()
  assert checkpoint.committed_steps(tmp_path) == []


def test_intact_checkpoint_of_another_state_is_an_error_not_quarantined(tmp_path, mesh):
  save_steps(tmp_path, mesh, [1, 2])
  other = make_state(0, mesh)
  other = other.replace(params={**other.params, 'tower': {'kernel': jnp.zeros((8, 6))}})
  restorer = checkpoint.Checkpointer(tmp_path)
  # Named before any array is read: which array, and both shapes.
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'checkpoints/2 is intact but does not match .*params/tower/kernel: '
                           r'checkpoint \(8, 4\), this run \(8, 6\)'):
    restorer.restore_latest(abstract(other), make_iterator())
  restorer.close()
  assert checkpoint.committed_steps(tmp_path) == [1, 2]  # nothing moved aside


def test_failed_read_of_a_fitting_checkpoint_is_not_called_a_mismatch(tmp_path, mesh, monkeypatch):
  save_steps(tmp_path, mesh, [1])
  restorer = checkpoint.Checkpointer(tmp_path)

  def broken_read(*args, **kwargs):
    raise OSError(5, 'Input/output error')
  monkeypatch.setattr(restorer._manager, 'restore', broken_read)
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=r'checkpoints/1 failed: OSError: .*Input/output error.*arrays match') as info:
    restorer.restore_latest(abstract(make_state(0, mesh)), make_iterator())
  assert 'new --workdir' not in str(info.value)
  monkeypatch.undo()
  restorer.close()
  assert checkpoint.committed_steps(tmp_path) == [1]


def test_state_mismatches_names_missing_extra_and_reshaped_arrays(tmp_path, mesh):
  save_steps(tmp_path, mesh, [1])
  state_dir = tmp_path / 'checkpoints' / '1' / 'state'
  same = make_state(5, mesh)
  assert checkpoint.state_mismatches(state_dir, abstract(same)) == []
  # A dtype alone is no mismatch (restore converts it).
  assert checkpoint.state_mismatches(state_dir, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.dtype == jnp.float32 else x.dtype),
      same)) == []
  params = {'tower': {'kernel': jnp.zeros((8, 6))}, 'head': jnp.zeros(3)}  # no logit_scale
  other = same.replace(params=params, opt_state=optax.adamw(1e-3).init(params))
  problems = checkpoint.state_mismatches(state_dir, abstract(other), limit=100)
  assert 'params/head: not in the checkpoint (this run: (3,))' in problems
  assert "params/logit_scale: in the checkpoint (), not in this run's state" in problems
  assert 'params/tower/kernel: checkpoint (8, 4), this run (8, 6)' in problems
  assert 'opt_state/0/mu/tower/kernel: checkpoint (8, 4), this run (8, 6)' in problems
  assert len(problems) == 9  # 3 each for params, mu and nu
  assert checkpoint.state_mismatches(state_dir, abstract(other), limit=2)[2] == '... and 7 more'


def test_relative_workdir(tmp_path, mesh, monkeypatch):
  # `--workdir runs/x` is how the README launches; orbax itself only accepts absolute paths.
  monkeypatch.chdir(tmp_path)
  save_steps('runs/x', mesh, [1])
  assert checkpoint.committed_steps('runs/x') == [1]
  params = checkpoint.restore_params('runs/x')
  np.testing.assert_array_equal(params['tower']['kernel'], np.full((8, 4), 1.0))


def test_manifest_problems_say_which_file_fails_and_how(tmp_path):
  # A file-level fake (no orbax): the callers decide on `fault`, never on the message's wording.
  step_dir = tmp_path / 'checkpoints' / '3'
  (step_dir / 'state').mkdir(parents=True)
  for name in ('gone', 'short', 'flipped', 'fine'):
    (step_dir / 'state' / name).write_bytes(b'abcd')
  checkpoint.write_manifest(step_dir)
  (step_dir / 'state' / 'gone').unlink()
  (step_dir / 'state' / 'short').write_bytes(b'abc')
  (step_dir / 'state' / 'flipped').write_bytes(b'abcD')
  found = {(p.file, p.fault) for p in checkpoint.manifest_problems(step_dir)}
  assert found == {('state/gone', checkpoint.Fault.MISSING),
                   ('state/short', checkpoint.Fault.WRONG_SIZE),
                   ('state/flipped', checkpoint.Fault.CORRUPTED)}
  assert {p.file for p in checkpoint.manifest_problems(step_dir, checksums=False)} == {
      'state/gone', 'state/short'}
  (step_dir / checkpoint.MANIFEST_NAME).write_text('{"files": ')
  assert [p.fault for p in checkpoint.manifest_problems(step_dir)] == [checkpoint.Fault.MALFORMED]
  (step_dir / checkpoint.MANIFEST_NAME).unlink()
  assert [(p.file, p.fault) for p in checkpoint.manifest_problems(step_dir)] == [
      (checkpoint.MANIFEST_NAME, checkpoint.Fault.MISSING)]


def test_a_save_again_of_a_step_has_another_save_id(tmp_path):
  step_dir = tmp_path / '3'
  assert checkpoint.save_id(step_dir) is None
  (step_dir / 'state').mkdir(parents=True)
  (step_dir / 'state' / 'data').write_bytes(b'same bytes')
  checkpoint.write_manifest(step_dir)
  first = checkpoint.save_id(step_dir)
  assert first and checkpoint.save_id(step_dir) == first  # reading it changes nothing
  checkpoint.write_manifest(step_dir)  # the same files saved again: the manifest has its own time
  assert checkpoint.save_id(step_dir) not in (None, first)
