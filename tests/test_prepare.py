"""prepare.py: CSV and WebDataset tar -> ArrayRecord shards that the pipeline reads back."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from cleanclip_jax import config as config_lib
from cleanclip_jax.data import decode, pipeline, prepare, sources


def _image_bytes(size=(40, 30), color=(10, 120, 240), fmt='JPEG') -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', size, color).save(buffer, fmt)
  return buffer.getvalue()


def _run(capsys, *argv):
  status = prepare.main(list(argv) + ['--quiet', '--workers', '1'])
  out, err = capsys.readouterr()
  return status, out, err


@pytest.fixture
def csv_input(tmp_path):
  (tmp_path / 'img').mkdir()
  (tmp_path / 'img' / 'wide.jpg').write_bytes(_image_bytes((600, 300)))
  (tmp_path / 'img' / 'small.png').write_bytes(_image_bytes((40, 30), fmt='PNG'))
  (tmp_path / 'img' / 'third.jpg').write_bytes(_image_bytes((100, 100), (200, 0, 0)))
  (tmp_path / 'img' / 'broken.jpg').write_bytes(_image_bytes((300, 300))[:300])
  path = tmp_path / 'train.tsv'
  path.write_text('filepath\ttitle\tclass\n'
                  'img/wide.jpg\ta wide photo\tcat\n'
                  'img/small.png\ta small one\tdog\n'
                  'img/broken.jpg\tcut short\tdog\n'
                  'img/third.jpg\tthe third\tcat\n'
                  'img/third.jpg\t\tcat\n')
  return path


def test_csv_to_array_record(tmp_path, capsys, caplog, csv_input):
  out_dir = tmp_path / 'out'
  status, out, err = _run(capsys, '--input', str(csv_input), '--output', str(out_dir), '--image-size', '64',
                          '--image-key', 'filepath', '--caption-key', 'title', '--label-key', 'class',
                          '--shard-size', '2')
  assert status == 0, err
  assert out.strip().count('\n') == 0
  assert json.loads(out) == {'written': 3, 'skipped': {'empty_caption': 1, 'truncated': 1}}
  assert 'broken.jpg' in caplog.text and 'train.tsv:4' in caplog.text  # logged with file and row
  source = sources.ArrayRecordSource(str(out_dir))
  assert len(source) == 3 and len(source.shards) == 2
  assert source.class_names == ['cat', 'dog']
  records = [source[i] for i in range(3)]
  assert [r['caption'] for r in records] == ['a wide photo', 'a small one', 'the third']
  assert [r['label'] for r in records] == [0, 1, 0]
  assert records[0]['image_path'].endswith('wide.jpg')
  shapes = [decode.decode_image(r).shape for r in records]
  assert shapes == [(64, 128, 3), (30, 40, 3), (64, 64, 3)]  # shorter side 64; small ones not enlarged
  np.testing.assert_allclose(decode.decode_image(records[2])[32, 32], [200, 0, 0], atol=6)
  # A run whose class list orders them otherwise (the head is scored against that list) relabels
  # by name: metadata.json says which stored index is which class.
  relabelled = sources.ArrayRecordSource(str(out_dir), class_names=['dog', 'bird', 'cat'])
  assert [relabelled[i]['label'] for i in range(3)] == [2, 0, 2]
  assert relabelled.labels.tolist() == [2, 0, 2] and relabelled.class_names == ['dog', 'bird', 'cat']
  with pytest.raises(ValueError, match=r"1 of its 2 classes are not in the class list.*\['dog'\]"):
    sources.ArrayRecordSource(str(out_dir), class_names=['cat', 'bird'])


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path, capsys):
  shards = tmp_path / 'shards'
  shards.mkdir()
  with tarfile.open(shards / '00000.tar', 'w') as tar:
    _add(tar, '000000000.jpg', _image_bytes())
    _add(tar, '000000000.txt', b'first caption')
    _add(tar, '000000000.cls', b'3')
    _add(tar, '000000001.jpg', _image_bytes())
    _add(tar, '000000001.json', json.dumps({'caption': 'from json', 'url': 'x'}).encode())
    _add(tar, '000000002.jpg', _image_bytes())  # no caption
    _add(tar, '000000003.jpg', b'not an image')
    _add(tar, '000000003.txt', b'text named jpg')
    _add(tar, '000000004.txt', b'caption without image')
    _add(tar, '000000005.jpg', _image_bytes())  # JSON without a string caption: none, not "None"
    _add(tar, '000000005.json', json.dumps({'caption': None}).encode())
    _add(tar, '000000006.jpg', _image_bytes())
    _add(tar, '000000006.json', json.dumps({'caption': 12345}).encode())
  good = io.BytesIO()
  with tarfile.open(fileobj=good, mode='w') as tar:
    _add(tar, 'sub/000000010.png', _image_bytes(fmt='PNG'))
    _add(tar, 'sub/000000010.txt', b'caf\xc3\xa9 in utf-8')
    _add(tar, 'sub/000000011.jpg', _image_bytes())
    _add(tar, 'sub/000000011.txt', b'lost to truncation' * 200)
  good.seek(0)
  with tarfile.open(fileobj=good) as tar:
    cut = tar.getmember('sub/000000011.txt').offset_data + 10
  (shards / '00001.tar').write_bytes(good.getvalue()[:cut])  # ends inside the second example
  status, out, err = _run(capsys, '--input', str(shards), '--output', str(tmp_path / 'out'))
  assert status == 0, err
  result = json.loads(out)
  assert result['written'] == 3
  assert result['skipped'] == {'corrupt_tar': 1, 'missing_caption': 3, 'missing_image': 1,
                               'not_an_image': 1}
  source = sources.ArrayRecordSource(str(tmp_path / 'out'))
  records = [source[i] for i in range(len(source))]
  assert [r['caption'] for r in records] == ['first caption', 'from json', 'café in utf-8']
  assert [r['label'] for r in records] == [3, -1, -1]
  assert records[2]['image_path'] == '00001.tar/sub/000000010'


def _damaged_shard(tmp_path, damage) -> tuple[str, int]:
  """Six image-caption pairs in one shard, damaged from the header of 00003.jpg on."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for i in range(6):
      _add(tar, f'{i:05d}.jpg', _image_bytes())
      _add(tar, f'{i:05d}.txt', f'caption {i}'.encode())
  data = bytearray(buffer.getvalue())
  buffer.seek(0)
  with tarfile.open(fileobj=buffer) as tar:
    offset = tar.getmember('00003.jpg').offset
  if damage == 'bad_checksum':
    data[offset + 148:offset + 156] = b'0000000\0'
  elif damage == 'cut_in_header':
    data = data[:offset + 100]
  elif damage == 'cut_in_padding':  # 00002.txt is whole; the next header is not there
    data = data[:offset - 100]
  path = tmp_path / 'shard.tar'
  path.write_bytes(bytes(data))
  return str(path), offset


@pytest.mark.parametrize('damage', ['bad_checksum', 'cut_in_header', 'cut_in_padding', None])
def test_damaged_tar_counts_the_lost_rest(tmp_path, caplog, damage):
  # tarfile reads an invalid or cut header past the first one as the end of the archive.
  shard, offset = _damaged_shard(tmp_path, damage)
  skipped = {}
  items = list(prepare._tar_examples(shard, skipped))
  assert all('problem' not in item for item in items)
  if damage is None:
    assert [item['caption'] for item in items] == [f'caption {i}' for i in range(6)] and skipped == {}
    return
  assert [item['caption'] for item in items] == ['caption 0', 'caption 1', 'caption 2']
  assert skipped == {'corrupt_tar': 1}
  assert f'{shard} at byte {offset}' in caplog.text


@pytest.mark.parametrize('make_input, message', [
    (lambda d: d / 'nothing.csv', 'nothing.csv: no such file'),
    (lambda d: (d / 'bad.csv').write_text('image,caption\na.jpg,"x"y\n') and d / 'bad.csv', 'bad.csv:2'),
    (lambda d: d, 'no .tar shards'),
])
def test_unusable_input_exits_2(tmp_path, capsys, make_input, message):
  status, out, err = _run(capsys, '--input', str(make_input(tmp_path)), '--output', str(tmp_path / 'out'))
  assert status == 2 and out == ''
  assert message in err


def test_refuses_output_with_shards(tmp_path, capsys, csv_input):
  args = ['--input', str(csv_input), '--output', str(tmp_path / 'out'), '--image-key', 'filepath',
          '--caption-key', 'title']
  assert _run(capsys, *args)[0] == 0
  status, _, err = _run(capsys, *args)
  assert status == 2 and 'already holds' in err


@pytest.mark.parametrize('body, why', [
    ('', 'the CSV has a header but no rows'),
    ('img/gone1.jpg,a\nimg/gone2.jpg,b\n', "every input was skipped: {'missing_file': 2}"),
])
def test_nothing_to_write_exits_2_and_leaves_no_folder(tmp_path, capsys, body, why):
  # Exit 0 and a folder of metadata.json alone would read as a converted data set of 0 examples.
  path = tmp_path / 'in.csv'
  path.write_text('image,caption\n' + body)
  status, out, err = _run(capsys, '--input', str(path), '--output', str(tmp_path / 'out'))
  assert status == 2 and out == ''
  assert f'in.csv: nothing was written to {tmp_path / "out"}: ' in err and why in err
  assert not (tmp_path / 'out').exists()
  (tmp_path / 'mine').mkdir()  # a folder the user made is left in place, still empty
  assert _run(capsys, '--input', str(path), '--output', str(tmp_path / 'mine'))[0] == 2
  assert list((tmp_path / 'mine').iterdir()) == []


def test_output_that_is_a_file_exits_2(tmp_path, capsys, csv_input):
  (tmp_path / 'afile').write_text('x')
  status, out, err = _run(capsys, '--input', str(csv_input), '--output', str(tmp_path / 'afile'),
                          '--image-key', 'filepath', '--caption-key', 'title')
  assert status == 2 and out == ''
  assert 'afile: is a file, not a folder (--output' in err


def test_missing_column_hint_names_the_flag(tmp_path, capsys, csv_input):
  # The CSV's columns are filepath/title: the hint is prepare's flag, not the trainer's config key.
  status, _, err = _run(capsys, '--input', str(csv_input), '--output', str(tmp_path / 'out'))
  assert status == 2
  assert "no column 'image'" in err and 'set --image-key to the column of the images' in err
  assert 'data.image_key' not in err


def test_command_line_and_pipeline_read_back(tmp_path, csv_input):
  # Subprocess: stdout is exactly the JSON line (tqdm and logs go to stderr); two worker processes.
  out_dir = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'cleanclip_jax.data.prepare', '--input', str(csv_input), '--output',
       str(out_dir), '--image-key', 'filepath', '--caption-key', 'title', '--image-size', '32',
       '--workers', '2'], capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ['{"written": 3, "skipped": {"empty_caption": 1, "truncated": 1}}']
  config = config_lib.base_config()
  config.batch_size = 3
  config.model.context_length = 8
  config.data.update(source='array_record', path=str(out_dir), image_size=32)
  pipeline._cached_source.cache_clear()
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (3, 32, 32, 3) and sorted(batch['index']) == [0, 1, 2]
  assert batch['tokens'].shape == (3, 8)
