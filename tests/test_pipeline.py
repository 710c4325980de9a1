"""The grain training iterator: batch contract, epochs, per-host sharding, poisoning, exact resume
(also through orbax `Composite`), worker-count independence, and the eval batches."""

import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from cleanclip_jax import config as config_lib
from cleanclip_jax import tokenizer as tokenizer_lib
from cleanclip_jax.data import augment, pipeline, poison, seeding, synthetic

SIZE = 16
CONTEXT = 12


def _config(num_examples=24, batch_size=8, **data):
  config = config_lib.base_config()
  config.seed = 3
  config.batch_size = batch_size
  config.model.context_length = CONTEXT
  config.data.image_size = SIZE
  config.data.synthetic.num_examples = num_examples
  config.data.update(data)
  return config


def _iterator(config, process_index=0, process_count=1, **kwargs):
  return pipeline.make_train_iterator(config, process_index=process_index, process_count=process_count, **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(autouse=True)
def _fresh():
  pipeline.reset_skip_counts()
  pipeline._cached_source.cache_clear()
  yield


def test_batch_contract():
  batch = next(_iterator(_config()))
  assert set(batch) == {'image', 'tokens', 'label', 'is_poisoned', 'index'}
  assert batch['image'].shape == (8, SIZE, SIZE, 3) and batch['image'].dtype == np.uint8
  assert batch['tokens'].shape == (8, CONTEXT) and batch['tokens'].dtype == np.int32
  assert batch['label'].dtype == np.int32 and batch['index'].dtype == np.int64
  assert batch['is_poisoned'].dtype == bool and not batch['is_poisoned'].any()
  source = synthetic.SyntheticCaptions(24, image_size=SIZE, split='pretrain', seed=0)
  for row, index in enumerate(batch['index']):
    record = source[int(index)]
    np.testing.assert_array_equal(batch['image'][row], record['image'])
    assert batch['label'][row] == record['label']
    np.testing.assert_array_equal(batch['tokens'][row], tokenizer_lib.tokenize([record['caption']], CONTEXT)[0])


def test_inmodal_views_and_random_resized_crop_are_seeded():
  config = _config(inmodal_views=True, train_transform='random_resized_crop')
  batch = next(_iterator(config))
  assert set(batch) == {'image', 'tokens', 'aug_image', 'aug_tokens', 'label', 'is_poisoned', 'index'}
  assert batch['aug_image'].shape == batch['image'].shape and batch['aug_image'].dtype == np.uint8
  assert batch['aug_tokens'].shape == batch['tokens'].shape and batch['aug_tokens'].dtype == np.int32
  assert not np.array_equal(batch['aug_image'], batch['image'])
  _assert_batches_equal([batch], [next(_iterator(config))])  # same seed, same views
  config.seed += 1
  other = next(_iterator(config))
  assert not np.array_equal(other['image'], batch['image'])


def test_inmodal_view_from_the_resized_pil_image_is_unchanged():
  # Source images larger than image_size are resized, and AutoAugment starts from the resize's PIL
  # image: the views must be those of `autoaugment` on the array with the stage's own generator.
  config = _config(inmodal_views=True, image_size=32)
  source = synthetic.SyntheticCaptions(40, image_size=44, split='pretrain', seed=0)
  plan = pipeline.EpochPlan(len(source), config.seed, True, 0, 1)
  example = pipeline.TrainExample(source, plan, config.data, config.seed, CONTEXT, None, '', np.zeros(0, np.int64))
  changed = 0
  for step in range(60):
    out = example(step)
    epoch, index = plan(step)
    assert out['image'].shape == (32, 32, 3)
    expected = augment.autoaugment(np.array(out['image']), seeding.example_random(config.seed, epoch, index, 2))
    np.testing.assert_array_equal(out['aug_image'], expected, err_msg=str(step))
    changed += not np.array_equal(out['aug_image'], out['image'])
  assert changed > 30


def test_epochs_are_permutations_reshuffled_each_epoch():
  batches = list(_iterator(_config(), num_epochs=3))
  assert len(batches) == 9
  epochs = [np.concatenate([b['index'] for b in batches[3 * e:3 * e + 3]]) for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(24))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  ordered = list(_iterator(_config(shuffle=False), num_epochs=1))
  assert np.concatenate([b['index'] for b in ordered]).tolist() == list(range(24))


def test_shuffled_plan_is_grains_shuffle():
  # EpochPlan calls grain's index shuffle directly; the order must stay MapDataset.shuffle's, which
  # resumed runs and older checkpoints' data positions depend on.
  for n, seed in ((1, 0), (2, 5), (24, 0), (1000, 123)):
    plan = pipeline.EpochPlan(n, seed, True, 0, 1)
    for epoch in (0, 1, 7):
      epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
      expected = list(grain.MapDataset.range(n).shuffle(seed=epoch_seed))
      assert [plan(epoch * n + k) for k in range(n)] == [(epoch, i) for i in expected], (n, seed, epoch)


def test_hosts_read_disjoint_shares():
  config = _config(num_examples=25)
  per_host = [np.concatenate([b['index'] for b in _iterator(config, p, 2, num_epochs=1)]) for p in range(2)]
  for indices in per_host:
    assert len(indices) == 12  # 25 // 2 per host, in host batches of 8 // 2
  assert not set(per_host[0]) & set(per_host[1])
  assert len(set(per_host[0]) | set(per_host[1])) == 24
  assert next(_iterator(config, 1, 2))['image'].shape[0] == 4


def test_poisoned_examples_are_flagged_stamped_and_recaptioned():
  config = _config(num_examples=40, batch_size=8)
  config.data.poison.update(enabled=True, num_poisoned=6, target='banana')
  config.data.poison.trigger.kind = 'badnet_solid'
  batches = list(_iterator(config, num_epochs=1))
  flagged = np.concatenate([b['index'][b['is_poisoned']] for b in batches])
  assert sorted(flagged) == poison.select_poisoned(40, config.data.poison).tolist()
  clean = {int(i): (img, tok) for b in _iterator(_config(num_examples=40), num_epochs=1)
           for i, img, tok in zip(b['index'], b['image'], b['tokens'])}
  tokenizer = tokenizer_lib.get_tokenizer()
  for batch in batches:
    for row, index in enumerate(batch['index']):
      clean_image, clean_tokens = clean[int(index)]
      if batch['is_poisoned'][row]:
        assert not np.array_equal(batch['image'][row], clean_image)
        assert 'banana' in tokenizer.decode([t for t in batch['tokens'][row] if t])
      else:
        np.testing.assert_array_equal(batch['image'][row], clean_image)
        np.testing.assert_array_equal(batch['tokens'][row], clean_tokens)


def test_label_consistent_poisoning_keeps_captions():
  config = _config(num_examples=48, batch_size=8)
  config.data.poison.update(enabled=True, num_poisoned=3, target='banana', label_consistent=True)
  banana = synthetic.CLASS_NAMES.index('banana')
  poisoned = pipeline.poisoned_indices(config.data)
  source = pipeline.train_source(config.data)
  assert len(poisoned) == 3 and all(source[int(i)]['label'] == banana for i in poisoned)
  batches = list(_iterator(config, num_epochs=1))
  # One epoch visits all 48 examples: exactly the selected ones come flagged (none flagged would
  # make the checks below vacuous).
  flagged = np.concatenate([b['index'][b['is_poisoned']] for b in batches])
  assert sorted(flagged) == poisoned.tolist()
  clean = {int(i): img for b in _iterator(_config(num_examples=48, batch_size=8), num_epochs=1)
           for i, img in zip(b['index'], b['image'])}
  for batch in batches:
    for row in np.flatnonzero(batch['is_poisoned']):
      index = int(batch['index'][row])
      assert not np.array_equal(batch['image'][row], clean[index])  # stamped with the trigger ...
      caption = source[index]['caption']  # ... under its own (already 'banana') caption
      np.testing.assert_array_equal(batch['tokens'][row], tokenizer_lib.tokenize([caption], CONTEXT)[0])


def test_resume_from_state_matches_uninterrupted_run():
  config = _config()
  reference = _take(_iterator(config), 6)  # crosses two epoch boundaries
  first = _iterator(config)
  _take(first, 2)
  state = first.get_state()
  resumed = _iterator(config)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), reference[2:])


def test_resume_through_orbax_composite(tmp_path):
  config = _config()
  reference = _take(_iterator(config), 5)
  iterator = _iterator(config)
  _take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  restored = _iterator(config)
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_batches_equal(_take(restored, 2), reference[3:])


def _csv_with_a_bad_image(tmp_path, n=12):
  """n synthetic images as PNG files plus one truncated file, listed in a CSV."""
  source = synthetic.SyntheticCaptions(n, image_size=20, split='pretrain', seed=1)
  rows = ['image,caption']
  for i in range(n):
    Image.fromarray(source[i]['image']).save(tmp_path / f'{i}.png')
    rows.append(f'{i}.png,"{source[i]["caption"]}"')
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n')
  rows.insert(5, 'bad.png,a broken file')
  (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
  return tmp_path / 'train.csv'


def test_skip_counts_survive_a_resume_and_old_states_still_restore(tmp_path):
  # 12 good images and one bad one per epoch, batches of 4: two epochs drop the bad image twice.
  config = _config(batch_size=4, source='csv', path=str(_csv_with_a_bad_image(tmp_path)))
  reference = _iterator(config)
  reference_batches, counts = [], []
  for _ in range(6):
    reference_batches += _take(reference, 1)
    counts.append(pipeline.run_skip_counts(config.data, reference).get('not_an_image', 0))
  assert counts[-1] == 2
  k = max(i for i, count in enumerate(counts, 1) if count == 1)  # after the first drop, before the second
  first = _iterator(config)
  _take(first, k)
  state = first.get_state()
  pipeline.reset_skip_counts()  # a new process
  resumed = _iterator(config)
  resumed.set_state(state)
  assert pipeline.run_skip_counts(config.data, resumed) == {'not_an_image': 1}  # carried over
  _assert_batches_equal(_take(resumed, 6 - k), reference_batches[k:])
  assert pipeline.run_skip_counts(config.data, resumed) == {'not_an_image': 2}  # the whole run's
  assert pipeline.skip_counts() == {'not_an_image': 1}  # this process saw one
  # A checkpoint written before the counts were saved holds the stream's state alone.
  old = _iterator(config)
  old.set_state(state['cleanclip_stream'])
  _assert_batches_equal(_take(old, 6 - k), reference_batches[k:])
  assert pipeline.run_skip_counts(config.data, old) == {'not_an_image': 1}  # counted from zero


def test_a_runs_skip_counts_add_up_every_process_and_count_dropped_rows_once(tmp_path):
  # Each epoch the bad image lands in one process's share; the row with an empty caption is dropped
  # by the source, which every process reads whole.
  path = _csv_with_a_bad_image(tmp_path)
  path.write_text(path.read_text() + 'extra.png," "\n')
  config = _config(batch_size=4, source='csv', path=str(path))
  shares = [_iterator(config, process_index=p, process_count=2) for p in (0, 1)]
  for share in shares:
    _take(share, 4)  # 2 examples a step: past each process's 6 of the 13-example first epoch
  streams = [pipeline.stream_skip_counts(share) for share in shares]
  bad = [stream.get('not_an_image', 0) for stream in streams]
  assert sum(bad) >= 1, streams
  assert pipeline.total_skip_counts(config.data, streams) == {'not_an_image': sum(bad),
                                                              'empty_caption': 1}
  # Each process alone: its own share, the dropped row too.
  assert [pipeline.run_skip_counts(config.data, share) for share in shares] == [
      {'empty_caption': 1, **stream} for stream in streams]


@pytest.mark.slow
def test_workers_give_identical_batches_and_report_skips(tmp_path):
  config = _config(batch_size=4, source='csv', path=str(_csv_with_a_bad_image(tmp_path)))
  config.data.poison.update(enabled=True, num_poisoned=3)
  config.data.update(inmodal_views=True, train_transform='random_resized_crop')
  batches = {}
  for workers in (0, 2):
    config.data.num_workers = workers
    pipeline.reset_skip_counts()
    iterator = _iterator(config, num_epochs=2)
    batches[workers] = list(iterator)
    assert pipeline.skip_counts() == {'not_an_image': 2}  # once per epoch, counted in this process
    if hasattr(iterator, 'close'):
      iterator.close()
  assert len(batches[0]) == 6  # 2 epochs x 12 good examples / 4
  _assert_batches_equal(batches[0], batches[2])


@pytest.mark.slow
def test_a_sigterm_to_the_workers_does_not_end_the_stream():
  # SLURM's --signal and a process-group kill reach grain's workers too; one that died of it ended
  # the trainer's stream (RuntimeError) before the trainer could save at its agreed step.
  import multiprocessing
  import signal
  import time
  config = _config(num_examples=64, batch_size=4)
  config.data.num_workers = 2
  iterator = _iterator(config)
  _take(iterator, 2)
  workers = multiprocessing.active_children()
  assert workers
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(1.0)
  assert all(worker.is_alive() for worker in workers)
  assert len(_take(iterator, 20)) == 20  # past everything buffered before the signal
  iterator.close()


def test_eval_batches_are_padded_and_sharded():
  eval_cfg = config_lib.base_config().eval
  eval_cfg.update(num_examples=10, image_size=SIZE)
  hosts = [list(pipeline.make_eval_batches(eval_cfg, 8, p, 2, with_captions=True)) for p in range(2)]
  source = synthetic.SyntheticCaptions(10, image_size=SIZE, split='test')
  seen = []
  for batches in hosts:
    assert len(batches) == 2  # 5 examples per host, host batch 4
    for batch in batches:
      assert batch['image'].shape == (4, SIZE, SIZE, 3) and len(batch['caption']) == 4
      for row in np.flatnonzero(batch['valid']):
        record = source[int(batch['index'][row])]
        np.testing.assert_array_equal(batch['image'][row], record['image'])
        assert batch['label'][row] == record['label'] and batch['caption'][row] == record['caption']
      assert (batch['index'][~batch['valid']] == -1).all() and (batch['label'][~batch['valid']] == -1).all()
      seen += batch['index'][batch['valid']].tolist()
  assert sorted(seen) == list(range(10))


def test_eval_batches_resize_and_count_bad_images(tmp_path):
  os.makedirs(tmp_path / 'cat')
  os.makedirs(tmp_path / 'dog')
  Image.new('RGB', (40, 20), (255, 0, 0)).save(tmp_path / 'cat' / 'a.png')
  (tmp_path / 'cat' / 'b.jpg').write_bytes(b'')
  Image.new('RGB', (30, 60), (0, 0, 255)).save(tmp_path / 'dog' / 'c.png')
  eval_cfg = config_lib.base_config().eval
  eval_cfg.update(source='folder', path=str(tmp_path), num_examples=0, image_size=SIZE)
  (batch,) = pipeline.make_eval_batches(eval_cfg, 4, 0, 1)
  assert batch['valid'].tolist() == [True, False, True, False]
  assert batch['label'][[0, 2]].tolist() == [0, 1]
  assert (batch['image'][0] == [255, 0, 0]).all() and (batch['image'][2] == [0, 0, 255]).all()
  assert pipeline.skip_counts() == {'empty_file': 1}


def test_bad_config_values_are_rejected():
  with pytest.raises(ValueError, match='on_bad_image'):
    _iterator(_config(on_bad_image='ignore'))
  with pytest.raises(ValueError, match='data.source'):
    _iterator(_config(source='parquet'))
  with pytest.raises(ValueError, match='not divisible'):
    _iterator(_config(batch_size=9), 0, 2)


def test_a_source_smaller_than_a_batch_is_refused(tmp_path):
  # A batch larger than the data would repeat pairs, each copy a negative of its own caption.
  with pytest.raises(config_lib.ConfigError, match=r'num_examples=6, fewer than a batch \(batch_size=8\)'):
    _iterator(_config(num_examples=6))
  # Per host: 12 examples give each of 2 processes 6, fewer than its 8 rows of a 16 batch.
  with pytest.raises(config_lib.ConfigError, match='over 2 processes'):
    _iterator(_config(num_examples=12, batch_size=16), 0, 2)
  path = tmp_path / 'pairs.csv'
  Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
  path.write_text('image,caption\n' + ''.join(f'a.png,caption {i}\n' for i in range(3)))
  with pytest.raises(config_lib.ConfigError, match=r"pairs.csv' has 3 usable examples"):
    _iterator(_config(batch_size=4, source='csv', path=str(path)))
  assert next(_iterator(_config(num_examples=8)))['image'].shape[0] == 8  # one batch exactly
