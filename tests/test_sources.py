"""sources.py: the ArrayRecord record format, CSV labels, folder trees, TFDS (error path and a stub)."""

import io
import re
import types

import numpy as np
import pytest
from PIL import Image

from cleanclip_jax import config as config_lib
from cleanclip_jax.data import decode, pipeline, prepare, sources


def _png(color=(0, 128, 255), size=(6, 4)) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, color).save(buffer, 'PNG')
  return buffer.getvalue()


@pytest.fixture(autouse=True)
def _fresh():
  pipeline.reset_skip_counts()
  pipeline._cached_source.cache_clear()
  yield


def test_record_round_trip_and_corruption():
  data = sources.encode_record(b'\xff\xd8jpeg', 'un café', 7, 'img/0001.jpg')
  assert sources.decode_record(data) == {'image_bytes': b'\xff\xd8jpeg', 'caption': 'un café', 'label': 7,
                                         'image_path': 'img/0001.jpg'}
  with pytest.raises(sources.BadRecordError, match='not written by data.prepare'):
    sources.decode_record(b'PK\x03\x04' + data[4:])
  with pytest.raises(sources.BadRecordError, match='do not match'):
    sources.decode_record(data[:-1])
  with pytest.raises(sources.BadRecordError, match='shorter than its header'):
    sources.decode_record(b'abc')


def test_array_record_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match='no ArrayRecord shards'):
    sources.array_record_paths(str(tmp_path))
  writer = prepare.ShardWriter(str(tmp_path), shard_size=2)
  for i in range(5):
    writer.write(sources.encode_record(_png(), f'caption {i}', i))
  writer.close()
  shards = sources.array_record_paths(str(tmp_path))
  assert [s.rsplit('/', 1)[1] for s in shards] == [f'data-0000{i}.array_record' for i in range(3)]
  assert sources.array_record_paths(str(tmp_path / 'data-0000[12].array_record')) == shards[1:]
  assert sources.array_record_paths(shards[0]) == shards[:1]
  source = sources.ArrayRecordSource(str(tmp_path))
  assert len(source) == 5 and source[3]['caption'] == 'caption 3' and source[3]['index'] == 3
  assert source.labels.tolist() == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(decode.decode_image(source[4])[0, 0], [0, 128, 255])


def test_pipeline_counts_corrupt_records(tmp_path):
  writer = prepare.ShardWriter(str(tmp_path), shard_size=10)
  for i in range(4):
    writer.write(sources.encode_record(_png(), f'caption {i}'))
  writer.write(b'garbage that is not a record')
  writer.write(sources.encode_record(b'not an image', 'broken image'))
  writer.close()
  config = config_lib.base_config()
  config.batch_size = 2
  config.model.context_length = 8
  config.data.update(source='array_record', path=str(tmp_path), image_size=8)
  batches = list(pipeline.make_train_iterator(config, process_index=0, process_count=1, num_epochs=1))
  assert sorted(np.concatenate([b['index'] for b in batches]).tolist()) == [0, 1, 2, 3]
  assert pipeline.skip_counts() == {'corrupt_record': 1, 'not_an_image': 1}


def test_corrupt_record_is_named_by_path_and_index(tmp_path):
  writer = prepare.ShardWriter(str(tmp_path), shard_size=10)
  for i in range(4):
    writer.write(sources.encode_record(_png(), f'caption {i}'))
  writer.write(b'garbage that is not a record')
  writer.close()
  # Label-consistent poisoning reads every caption (or label) at start-up, before any skip.
  source = sources.ArrayRecordSource(str(tmp_path))
  where = re.escape(f'{tmp_path}[4]: ')
  with pytest.raises(sources.BadRecordError, match=where + 'record starts with'):
    source.captions  # pylint: disable=pointless-statement
  with pytest.raises(sources.BadRecordError, match=where + 'record starts with'):
    source.labels  # pylint: disable=pointless-statement
  config = config_lib.base_config()
  config.batch_size = 5
  config.model.context_length = 8
  config.data.update(source='array_record', path=str(tmp_path), image_size=8, on_bad_image='fail')
  with pytest.raises(pipeline.BadInputError, match=where + ".*corrupt_record"):
    next(pipeline.make_train_iterator(config, process_index=0, process_count=1))


def test_array_record_integer_labels_must_index_the_class_list(tmp_path):
  # Shards from tar `.cls` labels: metadata.json names no classes, the run's list gives them.
  writer = prepare.ShardWriter(str(tmp_path), shard_size=10)
  for label in (0, 2, -1, 3, -7):
    writer.write(sources.encode_record(_png(), 'a caption', label))
  writer.close()
  source = sources.ArrayRecordSource(str(tmp_path), class_names=['a', 'b', 'c'])
  assert [source[i]['label'] for i in range(3)] == [0, 2, -1]
  for index, label in ((3, 3), (4, -7)):
    with pytest.raises(ValueError, match=re.escape(f'{tmp_path}[{index}]: label {label} is not a class index')):
      source[index]  # pylint: disable=expression-not-assigned
  with pytest.raises(ValueError, match=re.escape(f'{tmp_path}[3]: label 3')):
    source.labels  # pylint: disable=pointless-statement
  assert sources.ArrayRecordSource(str(tmp_path))[3]['label'] == 3  # no class list: nothing to index


def test_csv_labels(tmp_path):
  path = tmp_path / 'labelled.csv'
  path.write_text('image,caption,y\na.jpg,x,dog\nb.jpg,y,cat\nc.jpg,z,\n')
  source = sources.CsvSource(str(path), label_key='y')
  assert source.class_names == ['cat', 'dog'] and source.labels.tolist() == [1, 0, -1]
  source = sources.CsvSource(str(path), label_key='y', class_names=['dog', 'cat', 'bird'])
  assert source.labels.tolist() == [0, 1, -1]
  with pytest.raises(sources.CsvError, match=r"labelled.csv:2: label 'dog' is not a class name"):
    sources.CsvSource(str(path), label_key='y', class_names=['cat'])
  with pytest.raises(sources.CsvError, match='labelled.csv:4: empty label'):
    sources.CsvSource(str(path), label_key='y', require_label=True)
  numeric = tmp_path / 'numeric.csv'
  numeric.write_text('image,label\na.jpg,3\nb.jpg,0\n')
  eval_source = sources.CsvSource(str(numeric), caption_key='', label_key='label', require_label=True)
  assert eval_source.labels.tolist() == [3, 0] and eval_source[0]['caption'] == ''


def test_csv_eval_set_through_make_eval_batches(tmp_path):
  Image.new('RGB', (10, 10), (9, 9, 9)).save(tmp_path / 'a.png')
  (tmp_path / 'b.png').write_bytes(b'text')
  (tmp_path / 'eval.csv').write_text('image,label\na.png,banana\nb.png,apple\n')
  eval_cfg = config_lib.base_config().eval
  eval_cfg.update(source='csv', path=str(tmp_path / 'eval.csv'), num_examples=0, image_size=4)
  source = pipeline.eval_source(eval_cfg, class_names=['apple', 'banana'])
  (batch,) = pipeline.make_eval_batches(eval_cfg, 2, 0, 1, source=source)
  assert batch['valid'].tolist() == [True, False] and batch['label'][0] == 1
  assert pipeline.skip_counts() == {'not_an_image': 1}


def test_eval_labels_follow_eval_classnames_not_sorted_names(tmp_path):
  # ImageNet's first classes: sorted names would make tench 2, goldfish 0, great white shark 1.
  for name in ('a', 'b', 'c'):
    Image.new('RGB', (8, 8)).save(tmp_path / f'{name}.png')
  (tmp_path / 'eval.csv').write_text('image,label\na.png,tench\nb.png,goldfish\nc.png,Great_White_Shark\n')
  eval_cfg = config_lib.base_config().eval
  eval_cfg.update(source='csv', path=str(tmp_path / 'eval.csv'), num_examples=0, image_size=4,
                  classnames='imagenet')
  (batch,) = pipeline.make_eval_batches(eval_cfg, 3, 0, 1)
  assert batch['label'].tolist() == [0, 1, 2]
  (tmp_path / 'bad.csv').write_text('image,label\na.png,tench\nb.png,toaster oven\n')
  eval_cfg.path = str(tmp_path / 'bad.csv')
  with pytest.raises(sources.CsvError, match=r"bad.csv:3: label 'toaster oven' is not a class name"):
    pipeline.eval_source(eval_cfg)
  (tmp_path / 'ints.csv').write_text('image,label\na.png,0\nb.png,1000\n')
  eval_cfg.path = str(tmp_path / 'ints.csv')
  with pytest.raises(sources.CsvError, match=r'ints.csv:3: label 1000 is not a class index'):
    pipeline.eval_source(eval_cfg)


def test_folders_named_as_the_class_list_are_labelled_by_it(tmp_path):
  names = ['tench', 'goldfish', 'great white shark']
  for folder in ('goldfish', 'great_white_shark', 'tench'):
    (tmp_path / 'named' / folder).mkdir(parents=True)
    (tmp_path / 'named' / folder / 'x.png').write_bytes(_png())
  source = sources.FolderSource(str(tmp_path / 'named'), class_names=names)
  assert [source[i]['image_path'].split('/')[-2] for i in range(3)] == ['goldfish', 'great_white_shark', 'tench']
  assert [source[i]['label'] for i in range(3)] == [1, 2, 0] and source.class_names == names
  # Folders named by ids (ImageNet's synsets) keep their sorted order: the list's order for ImageNet.
  for folder in ('n01443537', 'n01440764'):
    (tmp_path / 'ids' / folder).mkdir(parents=True)
    (tmp_path / 'ids' / folder / 'x.png').write_bytes(_png())
  ids = sources.FolderSource(str(tmp_path / 'ids'), class_names=names)
  assert [ids[i]['label'] for i in range(2)] == [0, 1]
  (tmp_path / 'named' / 'toaster').mkdir()
  (tmp_path / 'named' / 'toaster' / 'x.png').write_bytes(_png())
  with pytest.raises(ValueError, match=r"1 of its 4 classes are not in the class list.*\['toaster'\]"):
    sources.FolderSource(str(tmp_path / 'named'), class_names=names)


def test_supervised_training_labels_follow_eval_classnames(tmp_path):
  from cleanclip_jax import train
  for name in ('a', 'b'):
    Image.new('RGB', (8, 8)).save(tmp_path / f'{name}.png')
  (tmp_path / 'train.csv').write_text('image,caption,label\na.png,x,goldfish\nb.png,y,tench\n')
  config = config_lib.load_config('supervised_finetune.py:tiny')
  config.data.update(source='csv', path=str(tmp_path / 'train.csv'), label_key='label')
  config.eval.classnames = 'imagenet'
  resolved = train.prepare_config(config, 8)
  assert resolved.data.classnames == 'imagenet' and resolved.objective.num_classes == 1000
  source = pipeline.train_source(resolved.data)
  assert [source[i]['label'] for i in range(2)] == [1, 0]  # the head's outputs are ImageNet's order


def test_folder_source(tmp_path):
  for name in ('zebra', 'ant'):
    (tmp_path / name / 'nested').mkdir(parents=True)
    (tmp_path / name / 'nested' / 'x.PNG').write_bytes(_png())
    (tmp_path / name / 'notes.txt').write_text('not an image')
  (tmp_path / '.hidden').mkdir()
  source = sources.FolderSource(str(tmp_path))
  assert source.class_names == ['ant', 'zebra'] and len(source) == 2
  assert [source[i]['label'] for i in range(2)] == [0, 1]
  assert source[1]['image_path'].endswith('zebra/nested/x.PNG')
  with pytest.raises(FileNotFoundError, match='no images'):
    sources.FolderSource(str(tmp_path / '.hidden'))


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='not available.*Nothing is downloaded'):
    sources.TfdsSource('mnist', 'test', data_dir=str(tmp_path))
  assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_tfds_records_from_a_prepared_builder(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  examples = [{'image': np.full((3, 3, 1), 5, np.uint8), 'label': 2}]
  label = types.SimpleNamespace(names=['a', 'b', 'c'])
  builder = types.SimpleNamespace(is_prepared=lambda: True, as_data_source=lambda split: examples,
                                  info=types.SimpleNamespace(features={'label': label}), data_dir='x')
  monkeypatch.setattr(tfds, 'builder', lambda name, data_dir=None: builder)
  source = sources.TfdsSource('stub', 'test')
  assert len(source) == 1 and source.class_names == ['a', 'b', 'c']
  record = source[0]
  assert record['label'] == 2 and decode.decode_image(record).shape == (3, 3, 3)
