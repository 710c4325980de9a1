"""CLIP BPE tokenizer: the same ids as open_clip, truncation, custom merges, BPE training."""

import gzip
import os

import numpy as np
import pytest

from cleanclip_jax import tokenizer

CAPTIONS = [
    '',
    'a photo of a banana',
    'A Photo Of A BANANA.',
    '   extra    whitespace\tand\nnewlines   ',
    "it's the dog's bone; they're here, we've won, I'm sure, you'll see, he'd go",
    'Café crème brûlée à la mode, naïve façade, Ångström, Øresund',
    'emoji 🍌🐶🚀 and flags 🇫🇷 and skin tones 👍🏽',
    '日本語のキャプション、中文标题，한국어 캡션',
    'numbers 3.14159 and 1,000,000 and 2026-11-29 and #42',
    '&amp;quot;html&amp;quot; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &amp;amp;',
    'don’t “smart quotes” — em dash … ellipsis',
    'mojibake: cafÃ© crÃ¨me',
    'punctuation!!! ??? ... --- ((brackets)) [x] {y} @user $5 100% a+b=c',
    'hyphenated-words and under_scores and CamelCaseWords',
    'word ' * 100,  # far over 77 tokens
    'supercalifragilisticexpialidocious antidisestablishmentarianism ' * 8,
    '<start_of_text> literal special tokens <end_of_text>',
]


def test_matches_open_clip_ids():
  from torch_ref import import_open_clip  # pylint: disable=import-outside-toplevel
  open_clip = import_open_clip()
  for context_length in (77, 16):
    ours = tokenizer.tokenize(CAPTIONS, context_length=context_length)
    ref = open_clip.tokenize(CAPTIONS, context_length=context_length).numpy()
    for caption, a, b in zip(CAPTIONS, ours, ref):
      np.testing.assert_array_equal(a, b, err_msg=f'{caption!r} (context {context_length})')


def test_layout_and_truncation():
  tok = tokenizer.get_tokenizer()
  # (A literal '<end_of_text>' in a caption becomes EOT, as in open_clip: left out here.)
  captions = CAPTIONS[:-1]
  ids = tokenizer.tokenize(captions)
  assert ids.dtype == np.int32 and ids.shape == (len(captions), 77)
  assert (ids[:, 0] == tok.sot_id).all()
  assert tok.eot_id == 49407 == tok.vocab_size - 1
  # Exactly one EOT per row and it is the argmax the text tower pools at.
  assert ((ids == tok.eot_id).sum(axis=1) == 1).all()
  eot = np.argmax(ids, axis=1)
  assert (ids[np.arange(len(ids)), eot] == tok.eot_id).all()
  assert (ids[0, :2] == [tok.sot_id, tok.eot_id]).all() and (ids[0, 2:] == 0).all()
  long_row = ids[captions.index('word ' * 100)]
  assert long_row[-1] == tok.eot_id and (long_row[1:-1] == tok.encode('word')[0]).all()
  # Cleaning: case, whitespace and html entities do not change the ids.
  np.testing.assert_array_equal(tokenizer.tokenize('a photo of a banana'),
                                tokenizer.tokenize('  A   PHOTO of a &amp;#98;anana '))
  assert tokenizer.tokenize('one', context_length=4).shape == (1, 4)
  with pytest.raises(ValueError, match='context_length'):
    tokenizer.tokenize('one', context_length=1)


def test_decode_round_trip():
  tok = tokenizer.get_tokenizer()
  for caption, decoded in (('A photo of a Banana', 'a photo of a banana'),
                           ('café 🍌 3.14', 'café 🍌 3 . 1 4'), ("they're here!", "they 're here !")):
    assert tok.decode(tok(caption)[0]) == decoded


def test_custom_merges_and_trained_bpe(tmp_path):
  captions = [f'a photo of a {animal} on the {place}' for animal in ('cat', 'dog', 'banana', 'horse')
              for place in ('grass', 'beach', 'table', 'road')] * 5
  path = tokenizer.train_bpe(captions, str(tmp_path), vocab_size=600, min_frequency=2)
  assert path == os.path.join(tmp_path, 'bpe_merges.txt.gz') and os.path.exists(path)
  tok = tokenizer.Tokenizer(path)
  assert 514 < tok.vocab_size <= 600
  assert tok.eot_id == tok.vocab_size - 1  # the text tower pools at argmax
  ids = tok(['a photo of a banana on the beach', 'unseen wörds 🍌'])
  # Frequent words became single tokens; unseen text still encodes, byte by byte.
  assert (ids[0] > 0).sum() == 2 + 8
  assert tok.decode(ids[0]) == 'a photo of a banana on the beach'
  assert tok.decode(ids[1]) == 'unseen wörds 🍌'
  assert ids.max() < tok.vocab_size

  bad = os.path.join(tmp_path, 'bad.txt.gz')
  with gzip.open(bad, 'wt') as f:
    f.write('#version\na b\nthree parts here\n')
  with pytest.raises(ValueError, match='bad.txt.gz:3'):
    tokenizer.Tokenizer(bad)


def test_ftfy_fast_path_is_exact():
  # `clean` skips ftfy for printable ASCII without '&'; ftfy must leave every such text unchanged.
  import ftfy  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  printable = [chr(c) for c in range(32, 127)]
  texts = [''.join(rng.choice(printable, rng.integers(0, 80))) for _ in range(300)]
  texts += [c for c in CAPTIONS if c.isascii()] + ['a photo of a dog', "it's 3 o'clock", '<b>bold</b> "x"']
  for text in texts:
    if tokenizer._ftfy_is_identity(text):  # pylint: disable=protected-access
      assert ftfy.fix_text(text) == text, repr(text)
  assert not tokenizer._ftfy_is_identity('caf\u00e9')  # pylint: disable=protected-access
  assert not tokenizer._ftfy_is_identity('a &amp; b')  # pylint: disable=protected-access
  assert not tokenizer._ftfy_is_identity('line\r\nbreak')  # pylint: disable=protected-access


def test_byte_level_form_matches_the_byte_table():
  # `_byte_level` returns printable ASCII pieces as they are: the same string the table gives.
  tok = tokenizer.get_tokenizer()
  table = tokenizer.bytes_to_unicode()
  rng = np.random.default_rng(0)
  pieces = [chr(b) for b in range(128)] + ['a b', 'caf\u00e9', '\U0001f34c', 'x\x7fy', 'tab\there']
  pieces += [''.join(chr(c) for c in rng.integers(0, 128, rng.integers(1, 12))) for _ in range(500)]
  for piece in pieces:
    expected = ''.join(table[b] for b in piece.encode('utf-8'))
    assert tok._byte_level(piece) == expected, repr(piece)  # pylint: disable=protected-access


def test_ascii_split_matches_clip_pattern():
  # Printable-ASCII captions are split by the standard library's engine with ASCII classes; it
  # must cut them exactly where CLIP's Unicode pattern (the `regex` module) does.
  tok = tokenizer.get_tokenizer()
  rng = np.random.default_rng(1)
  alphabet = [chr(c) for c in range(32, 127)] + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S",
                                                 '<start_of_text>', '<end_of_text>', '<END_OF_TEXT>', '  ']
  texts = [''.join(rng.choice(alphabet, rng.integers(0, 60))) for _ in range(2000)]
  texts += [c for c in CAPTIONS if c.isascii()] + [tokenizer.clean(c) for c in CAPTIONS]
  for text in texts:
    if text.isascii() and text.isprintable():
      assert tok._ascii_pattern.findall(text) == tok._pattern.findall(text), repr(text)  # pylint: disable=protected-access


def test_repeated_captions_give_the_same_ids():
  tok = tokenizer.Tokenizer()
  first = tok(CAPTIONS, 77)
  again = tok(CAPTIONS, 77)  # served from the caption cache
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(tokenizer.Tokenizer()(CAPTIONS[::-1], 77), first[::-1])
