"""A corpus of broken inputs, built in tmp_path: each ends in a counted, logged skip or in an error
naming the file and row, and the good rows still come through."""

import io
import logging
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from cleanclip_jax import config as config_lib
from cleanclip_jax.data import decode, pipeline, sources

SIZE = 16


def _jpeg(color=(200, 30, 30), size=(24, 20), mode='RGB') -> bytes:
  buffer = io.BytesIO()
  Image.new(mode, size, color).save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def _noise_jpeg(seed=0) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG')
  return buffer.getvalue()


def _png(image: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, 'PNG', **kwargs)
  return buffer.getvalue()


def _palette_with_transparency() -> Image.Image:
  # Left half: palette entry 0 (black, marked transparent); right half: entry 1 (blue).
  image = Image.new('P', (8, 4), 0)
  image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
  image.paste(1, (4, 0, 8, 4))
  image.info['transparency'] = 0
  return image


def _animated_gif() -> bytes:
  frames = [Image.new('RGB', (10, 10), (255, 0, 0)), Image.new('RGB', (10, 10), (0, 255, 0))]
  buffer = io.BytesIO()
  frames[0].save(buffer, 'GIF', save_all=True, append_images=frames[1:], duration=100, loop=0)
  return buffer.getvalue()


def _rotated_jpeg() -> bytes:
  # 8 wide x 4 high stored, EXIF orientation 6 (display rotated 90 degrees clockwise): 4 wide x 8 high.
  image = Image.new('RGB', (8, 4), (0, 0, 255))
  exif = Image.Exif()
  exif[0x0112] = 6
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', exif=exif.tobytes())
  return buffer.getvalue()


GOOD_FILES = {
    'good.jpg': _jpeg(),
    'cmyk.jpg': _jpeg((0, 255, 255, 0), mode='CMYK'),  # red in CMYK
    'png16.png': _png(Image.fromarray(np.full((6, 6), 32896, np.uint16))),  # 16-bit gray, mid level
    'palette.png': _png(_palette_with_transparency()),
    'rgba.png': _png(Image.new('RGBA', (5, 5), (0, 0, 0, 0))),  # fully transparent
    'tiny.png': _png(Image.new('RGB', (1, 1), (10, 20, 30))),
    'anim.gif': _animated_gif(),
    'rotated.jpg': _rotated_jpeg(),
    'gray.png': _png(Image.new('L', (4, 4), 77)),
    'gray_trns.png': _png(Image.new('L', (5, 5), 0), transparency=0),  # tRNS: 0 is transparent
    'rgb_trns.png': _png(Image.new('RGB', (5, 5), (0, 0, 0)), transparency=(0, 0, 0)),
}
BAD_FILES = {  # name -> the skip reason it must produce
    'empty.jpg': (b'', 'empty_file'),
    'truncated.jpg': (_noise_jpeg()[:800], 'truncated'),
    'text.jpg': (b'this is not an image\n', 'not_an_image'),
    'huge.png': (_png(Image.new('L', (8000, 8000), 128)), 'too_large'),
}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """root/{images...}, root/data/train.csv, root/outside/{abs,up}.jpg (outside the CSV's folder)."""
  root = tmp_path_factory.mktemp('corpus')
  data = root / 'data'
  (data / 'img').mkdir(parents=True)
  (root / 'outside').mkdir()
  for name, content in GOOD_FILES.items():
    (data / 'img' / name).write_bytes(content)
  for name, (content, _) in BAD_FILES.items():
    (data / 'img' / name).write_bytes(content)
  (root / 'outside' / 'abs.jpg').write_bytes(_jpeg((0, 200, 0)))
  (root / 'outside' / 'up.jpg').write_bytes(_jpeg((0, 0, 200)))
  long_caption = 'word ' * 2000  # 10,000 characters
  lines = [b'image,caption']
  for name in GOOD_FILES:
    lines.append(f'img/{name},a photo of {name}'.encode())
  for name in BAD_FILES:
    lines.append(f'img/{name},a photo of {name}'.encode())
  lines += [
      b'img/missing.jpg,a file that is not there',
      f'img/good.jpg,{long_caption}'.encode(),
      f'{root / "outside" / "abs.jpg"},"an absolute path, quoted"'.encode(),
      b'../outside/up.jpg,a path that climbs out',
      b'img/good.jpg,',  # empty caption
      b'img/good.jpg,   ',  # whitespace-only caption
      b'img/good.jpg,caf\xe9 in latin-1',  # not UTF-8
  ]
  (data / 'train.csv').write_bytes(b'\n'.join(lines) + b'\n')
  return data / 'train.csv'


@pytest.fixture(autouse=True)
def _fresh_counts():
  pipeline.reset_skip_counts()
  pipeline._cached_source.cache_clear()
  yield


# --- decoding, file by file ------------------------------------------------------------------------


def _decode(csv_path, name):
  return decode.decode_image({'image_path': str(csv_path.parent / 'img' / name)})


@pytest.mark.parametrize('name', sorted(BAD_FILES))
def test_bad_file_raises_with_reason_and_path(corpus, name):
  with pytest.raises(decode.BadImageError) as info:
    _decode(corpus, name)
  assert info.value.reason == BAD_FILES[name][1]
  assert name in str(info.value)


def test_missing_and_directory_paths(corpus):
  with pytest.raises(decode.BadImageError, match='missing.jpg') as info:
    _decode(corpus, 'missing.jpg')
  assert info.value.reason == 'missing_file'
  with pytest.raises(decode.BadImageError) as info:
    decode.decode_image({'image_path': str(corpus.parent / 'img')})
  assert info.value.reason == 'unreadable_file'


def test_odd_modes_decode_to_rgb(corpus):
  for name in GOOD_FILES:
    image = _decode(corpus, name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
  np.testing.assert_allclose(_decode(corpus, 'cmyk.jpg')[2, 2], [255, 0, 0], atol=3)
  np.testing.assert_array_equal(_decode(corpus, 'png16.png')[0, 0], [128, 128, 128])  # scaled, not clipped
  palette = _decode(corpus, 'palette.png')
  np.testing.assert_array_equal(palette[0, 0], [255, 255, 255])  # transparent -> white
  np.testing.assert_array_equal(palette[0, 7], [0, 0, 255])
  np.testing.assert_array_equal(_decode(corpus, 'rgba.png')[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(_decode(corpus, 'tiny.png'), [[[10, 20, 30]]])
  np.testing.assert_array_equal(_decode(corpus, 'anim.gif')[0, 0], [255, 0, 0])  # first frame
  assert _decode(corpus, 'rotated.jpg').shape == (8, 4, 3)  # EXIF orientation applied
  np.testing.assert_array_equal(_decode(corpus, 'gray.png')[0, 0], [77, 77, 77])
  # A transparent colour (tRNS) is composited on white, as alpha bands and palette entries are.
  np.testing.assert_array_equal(_decode(corpus, 'gray_trns.png')[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(_decode(corpus, 'rgb_trns.png')[0, 0], [255, 255, 255])


def _multi_frame(format_name: str) -> bytes:
  """4 frames: a red first one, then noise (so later frames take most of the file)."""
  rng = np.random.default_rng(0)
  frames = [Image.new('RGB', (16, 16), (255, 0, 0))] + [
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
  buffer = io.BytesIO()
  frames[0].save(buffer, format_name, save_all=True, append_images=frames[1:])
  return buffer.getvalue()


@pytest.mark.parametrize('format_name', ['TIFF', 'GIF'])
def test_damaged_multi_frame_files_never_escape_and_keep_an_intact_first_frame(format_name):
  # Cut anywhere past the first frame: asking for `n_frames` walked the damaged later frames and
  # PIL's TypeError / struct.error escaped the decoder and ended the run (skip mode included).
  data = _multi_frame(format_name)
  first_frame_read = 0
  for cut in range(len(data) // 3, len(data), 7):
    try:
      image = decode.decode_image({'image_bytes': data[:cut]})
    except decode.BadImageError:
      continue
    first_frame_read += np.array_equal(image[0, 0], [255, 0, 0])
  assert first_frame_read > 0


@pytest.mark.parametrize('stage,error', [('open', KeyError('tag')), ('open', TypeError('dims')),
                                         ('load', NotImplementedError('codec')),
                                         ('load', RuntimeError('avif'))])
def test_any_pil_plugin_error_is_one_corrupt_image(monkeypatch, stage, error):
  from PIL import ImageFile
  data = _png(Image.new('RGB', (4, 4)))

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(Image, 'open', fail) if stage == 'open' else monkeypatch.setattr(
      ImageFile.ImageFile, 'load', fail)
  with pytest.raises(decode.BadImageError) as info:
    decode.decode_image({'image_bytes': data, 'image_path': 'x.png'})
  assert info.value.reason == 'corrupt' and type(error).__name__ in str(info.value)


def _oriented(format_name: str, carrier: str) -> bytes:
  """An 8 x 4 image, left half red, saved as `format_name` with orientation 6 in `carrier`
  ('exif', 'xmp' or 'none')."""
  image = Image.new('RGB', (8, 4), (0, 0, 255))
  image.paste((255, 0, 0), (0, 0, 4, 4))
  kwargs = {}
  if carrier == 'exif':
    exif = Image.Exif()
    exif[0x0112] = 6
    kwargs['exif'] = exif.tobytes()
  elif carrier == 'xmp':
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
           '22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
           'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    if format_name == 'PNG':  # PNG keeps XMP in an iTXt chunk
      kwargs['pnginfo'] = PngImagePlugin.PngInfo()
      kwargs['pnginfo'].add_itxt('XML:com.adobe.xmp', xmp)
    else:
      kwargs['xmp'] = xmp.encode()
  buffer = io.BytesIO()
  image.save(buffer, format_name, **kwargs)
  return buffer.getvalue()


@pytest.mark.parametrize('format_name,carrier', [
    ('JPEG', 'exif'), ('JPEG', 'xmp'), ('JPEG', 'none'), ('PNG', 'exif'), ('PNG', 'xmp'),
    ('PNG', 'none'), ('TIFF', 'exif'), ('TIFF', 'none'), ('WEBP', 'exif'), ('WEBP', 'none')])
def test_orientation_is_applied_wherever_pil_reads_it(format_name, carrier):
  # decode skips PIL's EXIF look-up for images that carry no metadata it reads an orientation
  # from; every carrier must still turn the image exactly as ImageOps.exif_transpose does.
  data = _oriented(format_name, carrier)
  expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert('RGB')))
  image = decode.decode_image({'image_bytes': data})
  assert image.shape == ((8, 4, 3) if carrier != 'none' else (4, 8, 3))
  if format_name == 'JPEG' or format_name == 'WEBP':  # lossy: compare the layout, not exact values
    np.testing.assert_allclose(image.astype(int), expected.astype(int), atol=40)
    assert image[0, 0, 0] > 200 if carrier == 'none' else image[0, -1, 0] > 200  # red moved
  else:
    np.testing.assert_array_equal(image, expected)


def _png_header_only(width: int, height: int) -> bytes:
  # A PNG signature and IHDR claiming width x height (8-bit RGB), then IEND: PIL reads the size
  # from the header alone.
  def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IEND', b'')


def test_image_over_pils_bomb_limit_is_too_large_and_filters_are_untouched():
  # 100 MP: over PIL's warning limit (~89 MP), under its error limit; refused from the header.
  filters = list(warnings.filters)
  with pytest.warns(Image.DecompressionBombWarning):
    with pytest.raises(decode.BadImageError) as info:
      decode.decode_image({'image_bytes': _png_header_only(10_000, 10_000), 'image_path': 'big.png'})
  assert info.value.reason == 'too_large' and 'big.png' in str(info.value)
  with pytest.raises(decode.BadImageError) as info:  # over PIL's error limit (~179 MP)
    decode.decode_image({'image_bytes': _png_header_only(20_000, 10_000)})
  assert info.value.reason == 'too_large'
  assert list(warnings.filters) == filters  # decoding never rewrites the process's filters


def test_in_memory_arrays():
  gray = np.full((3, 4), 9, np.uint8)
  assert decode.decode_image({'image': gray}).shape == (3, 4, 3)
  with pytest.raises(decode.BadImageError) as info:
    decode.decode_image({'image': np.zeros((3, 4, 3), np.float32), 'image_path': 'mem'})
  assert info.value.reason == 'bad_array'


def test_tiny_image_is_upsampled():
  image = pipeline.resize_center_crop(np.full((1, 1, 3), 40, np.uint8), SIZE)
  assert image.shape == (SIZE, SIZE, 3) and (image == 40).all()


# --- the CSV ---------------------------------------------------------------------------------------


def test_csv_rows_dropped_at_parse_are_counted(corpus, caplog):
  with caplog.at_level(logging.WARNING):
    source = sources.CsvSource(str(corpus))
  assert source.skipped == {'empty_caption': 2, 'caption_not_utf8': 1}
  assert 'train.csv:' in caplog.text and 'empty_caption' in caplog.text
  captions = source.captions
  assert any(len(c) == 10_000 for c in captions)
  paths = [source[i]['image_path'] for i in range(len(source))]
  assert any(p.endswith(os.path.join('outside', 'abs.jpg')) for p in paths)
  assert any(p.endswith(os.path.join('..', 'outside', 'up.jpg')) for p in paths)
  assert source[0]['origin'].endswith('train.csv:2')


def test_confine_paths_drops_absolute_and_parent_paths(corpus, caplog):
  with caplog.at_level(logging.WARNING):
    source = sources.CsvSource(str(corpus), confine_paths=True)
  assert source.skipped['path_outside_root'] == 2
  assert 'path_outside_root' in caplog.text
  assert not any('outside' in source[i]['image_path'] for i in range(len(source)))


@pytest.mark.parametrize('body, line, message', [
    ('img/a.jpg,one,extra\n', 3, 'expected 2 fields'),  # wrong field count
    ('img/a.jpg\n', 3, 'expected 2 fields'),  # missing column
    ('img/a.jpg,"bad"quote\n', 3, 'malformed CSV'),
    ('img/a.jpg,"never closed\nimg/b.jpg,x\n', 4, 'malformed CSV'),
])
def test_malformed_row_names_file_and_line(tmp_path, body, line, message):
  path = tmp_path / 'bad.csv'
  path.write_text('image,caption\nimg/ok.jpg,fine\n' + body)
  with pytest.raises(sources.CsvError, match=message) as info:
    sources.CsvSource(str(path))
  assert f'bad.csv:{line}' in str(info.value)


def test_missing_header_column_names_the_key(tmp_path):
  path = tmp_path / 'cols.tsv'
  path.write_text('filepath\ttitle\na.jpg\tx\n')
  with pytest.raises(sources.CsvError, match="no column 'image'.*data.image_key"):
    sources.CsvSource(str(path))
  source = sources.CsvSource(str(path), image_key='filepath', caption_key='title')  # .tsv -> tab
  assert source[0]['caption'] == 'x'


def test_missing_column_hint_names_the_callers_setting(tmp_path):
  path = tmp_path / 'cols.csv'
  path.write_text('filepath,label\na.jpg,0\n')
  with pytest.raises(sources.CsvError, match="no column 'image'.*set --image-key to the column of the images"):
    sources.CsvSource(str(path), options={'image_key': '--image-key'})
  wide = tmp_path / 'wide.csv'
  wide.write_text('image,caption\na.jpg,one, two\n')
  with pytest.raises(sources.CsvError, match='contain the delimiter, or set --delimiter$'):
    sources.CsvSource(str(wide), options={'delimiter': '--delimiter'})
  # The eval set's columns are fixed (image,label): no setting to name, so none is suggested.
  eval_cfg = config_lib.base_config().eval
  eval_cfg.update(source='csv', path=str(path))
  with pytest.raises(sources.CsvError, match="no column 'image'.*this file needs the column 'image'") as info:
    pipeline.eval_source(eval_cfg)
  assert 'data.image_key' not in str(info.value)


def test_missing_csv_file():
  with pytest.raises(FileNotFoundError, match='nope.csv'):
    sources.CsvSource('/nonexistent/nope.csv')


# --- the pipeline over the corpus ------------------------------------------------------------------


def _config(csv_path, **data):
  config = config_lib.base_config()
  config.batch_size = 1
  config.model.context_length = 16
  config.data.update(dict(source='csv', path=str(csv_path), image_size=SIZE, **data))
  return config


def _one_epoch(config):
  return list(pipeline.make_train_iterator(config, process_index=0, process_count=1, num_epochs=1))


def test_pipeline_skips_bad_inputs_and_keeps_good_ones(corpus, caplog):
  with caplog.at_level(logging.WARNING):
    batches = _one_epoch(_config(corpus))
  expected = {reason: 1 for _, reason in BAD_FILES.values()}
  expected.update(missing_file=1, empty_caption=2, caption_not_utf8=1)
  assert pipeline.skip_counts() == expected
  source = pipeline.train_source(_config(corpus).data)
  names = sorted(os.path.basename(source[int(b['index'][0])]['image_path']) for b in batches)
  assert names == sorted(list(GOOD_FILES) + ['good.jpg', 'abs.jpg', 'up.jpg'])
  for name, (_, reason) in BAD_FILES.items():
    assert f'{name}' in caplog.text and reason in caplog.text  # the first few are logged in full
  long = [b for b in batches if len(source[int(b['index'][0])]['caption']) == 10_000]
  assert long and long[0]['tokens'][0, -1] == 49407  # truncated by the tokenizer, EOT kept


def test_poisoned_pairs_lost_to_bad_images_are_counted_apart(corpus):
  # Poison every row: each unusable one is then a poisoned pair the run never trained on, which
  # the counts must show (they were ordinary skips, the attack's strength overstated).
  config = _config(corpus)
  config.data.poison.update(enabled=True, fraction=1.0)
  batches = _one_epoch(config)
  counts = pipeline.skip_counts()
  source = pipeline.train_source(config.data)  # rows dropped at parse are not in it
  assert counts[pipeline.POISONED_SKIPPED] == len(source) - len(batches) == 5
  assert all(b['is_poisoned'].all() for b in batches)
  config.data.poison.update(fraction=0.0, num_poisoned=0, enabled=False)
  pipeline.reset_skip_counts()
  _one_epoch(config)
  assert pipeline.POISONED_SKIPPED not in pipeline.skip_counts()


def test_pipeline_confine_paths_counts_outside_rows(corpus):
  batches = _one_epoch(_config(corpus, confine_paths=True))
  assert pipeline.skip_counts()['path_outside_root'] == 2
  assert len(batches) == len(GOOD_FILES) + 1


def test_on_bad_image_fail_names_file_and_row(tmp_path):
  (tmp_path / 'ok.jpg').write_bytes(_jpeg())
  (tmp_path / 'broken.jpg').write_bytes(_noise_jpeg()[:800])
  path = tmp_path / 'strict.csv'
  path.write_text('image,caption\nok.jpg,fine\nbroken.jpg,broken\n')
  config = _config(path, on_bad_image='fail', shuffle=False)
  with pytest.raises(pipeline.BadInputError, match=r'strict\.csv:3.*broken\.jpg.*truncated'):
    _one_epoch(config)


def test_all_bad_stream_stops_with_an_error(tmp_path, monkeypatch):
  path = tmp_path / 'allbad.csv'
  path.write_text('image,caption\nnothere1.jpg,a\nnothere2.jpg,b\n')
  monkeypatch.setattr(pipeline, '_MAX_CONSECUTIVE_SKIPS', 10)
  with pytest.raises(pipeline.BadInputError, match='all unusable.*missing_file'):
    next(pipeline.make_train_iterator(_config(path), process_index=0, process_count=1))


@pytest.mark.parametrize('body, why', [
    ('', r'it has no rows after the header'),
    ('a.jpg, \nb.jpg,\n', r"every row was dropped \({'empty_caption': 2}"),
])
def test_training_csv_without_usable_rows_names_the_file(tmp_path, body, why):
  # Before: "0 examples cannot be shared by 1 processes", naming no file and pointing at processes.
  path = tmp_path / 'header.csv'
  path.write_text('image,caption\n' + body)
  with pytest.raises(config_lib.ConfigError, match=rf"data.path='.*header.csv' .*has no usable examples: {why}"):
    pipeline.make_train_iterator(_config(path), process_index=0, process_count=1)


class _FlatEncoders:
  """Stands in for `evaluate.Encoders`: an image's pixels are its features."""
  num_devices = 1

  def batch(self, batch):
    return dict(batch, features=batch['image'].reshape(len(batch['image']), -1).astype(np.float32))


def test_eval_set_without_a_usable_image_fails(tmp_path):
  # Before: 0 examples, NaN metrics, exit 0, and the step recorded as evaluated.
  from cleanclip_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'val.csv'
  path.write_text('image,label\nnope/0.jpg,0\nnope/1.jpg,1\n')
  eval_cfg = config_lib.base_config().eval
  eval_cfg.update(source='csv', path=str(path), batch_size=4, num_examples=0, image_size=SIZE)
  with pytest.raises(ValueError, match=r"eval: no usable image in the 'csv' dataset .*val.csv.*all were skipped"):
    evaluate.encode_dataset(_FlatEncoders(), eval_cfg)
  assert pipeline.skip_counts() == {'missing_file': 2}
  (tmp_path / 'nope').mkdir()
  (tmp_path / 'nope' / '1.jpg').write_bytes(_jpeg())  # one usable image is enough
  features = evaluate.encode_dataset(_FlatEncoders(), eval_cfg)
  assert features.labels.tolist() == [1] and features.indices.tolist() == [1]
