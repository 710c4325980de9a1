"""CLIP's byte-level BPE tokenizer: the same ids as OpenAI CLIP / open_clip.

Text is cleaned as CLIP does (ftfy, html unescaping twice, whitespace collapsed, lower-cased), split
with CLIP's regex, mapped to byte-level unicode and merged with the 16e6 merges list. Rows are
`SOT tokens... EOT` zero-padded to the context length; over-long rows are cut and end with EOT.

`train_bpe(captions, workdir)` trains a small BPE with HF `tokenizers` for from-scratch runs and
writes a merges file in the same format, so `Tokenizer(merges_path=...)` reads either.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_MERGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets',
                              'bpe_simple_vocab_16e6.txt.gz')
# CLIP uses the first 49152 - 256 - 2 merges of the 16e6 list (vocabulary 49408 with specials).
_CLIP_NUM_MERGES = 49152 - 256 - 2
SOT, EOT = '<start_of_text>', '<end_of_text>'
_CACHE_LIMIT = 200_000
_TEXT_CACHE_LIMIT = 65_536  # whole captions: ~20 MB per process at most
_NO_MERGE = float('inf')


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode table; its order defines the first 512 ids."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  table = {b: chr(b) for b in printable}
  # Bytes that would be whitespace/control characters move to code points 256, 257, ...
  for shifted, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + shifted)
  return table


def _ftfy_is_identity(text: str) -> bool:
  # Every ftfy fix acts on non-ASCII characters, control characters (terminal escapes, \r line
  # breaks) or, for html, on '&'; printable ASCII without '&' comes back unchanged, and ftfy is
  # ~60% of tokenizing a caption (tests/test_tokenizer.py checks the identity).
  return text.isascii() and text.isprintable() and '&' not in text


def clean(text: str) -> str:
  """ftfy repair, html unescape (twice: captions are often double-escaped), whitespace, lower."""
  if not _ftfy_is_identity(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return ' '.join(text.split()).lower()


def _read_merges(path: str) -> list[tuple[str, str]]:
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rt', encoding='utf-8') as f:
      lines = f.read().split('\n')
  except OSError as e:
    raise OSError(f'cannot read BPE merges file {path}: {e}') from e
  merges = []
  # Line 0 is a version header; CLIP's own list (any copy of it) is cut to its vocabulary size.
  is_clip_list = os.path.basename(path).startswith('bpe_simple_vocab_16e6')
  body = lines[1:_CLIP_NUM_MERGES + 1] if is_clip_list else lines[1:]
  for row, line in enumerate(body, start=2):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f'{path}:{row}: a merge is two symbols separated by a space, got {line!r}')
    merges.append((parts[0], parts[1]))
  return merges


class Tokenizer:
  """`Tokenizer(merges_path=None)(texts, context_length=77) -> np.int32 [N, context_length]`."""

  def __init__(self, merges_path: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
    self.merges_path = merges_path or DEFAULT_MERGES
    self.context_length = context_length
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    merges = _read_merges(self.merges_path)
    symbols = list(self.byte_encoder.values())
    vocab = symbols + [s + '</w>' for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
    self.vocab_size = len(vocab)
    self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
    self._pattern = regex.compile(
        f'{SOT}|{EOT}' + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE)
    # The same split for printable ASCII, where \p{L} and \p{N} are [A-Za-z] and [0-9]: the
    # standard library's engine runs it in ~40% of the time `regex` takes (most captions are ASCII).
    self._ascii_pattern = re.compile(
        f'{SOT}|{EOT}' + r"""|'s|'t|'re|'ve|'m|'ll|'d|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]+""", re.IGNORECASE)
    self._cache: dict[str, tuple[int, ...]] = {}
    # Whole captions repeat (poisoned captions come from a few templates, every caption recurs
    # each epoch), so their ids are cached too.
    self._text_cache: dict[str, np.ndarray] = {}

  def _bpe(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-token (already byte-encoded), merged greedily by rank."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + '</w>']
    while len(parts) > 1:
      pair = min(zip(parts[:-1], parts[1:]), key=lambda p: self.bpe_ranks.get(p, _NO_MERGE))
      if pair not in self.bpe_ranks:
        break
      first, second = pair
      merged, i = [], 0
      while i < len(parts):  # merge every non-overlapping occurrence, left to right
        if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = tuple(self.encoder[p] for p in parts)
    if len(self._cache) >= _CACHE_LIMIT:
      self._cache.clear()
    self._cache[word] = ids
    return ids

  def _byte_level(self, piece: str) -> str:
    """A pre-token's UTF-8 bytes as the byte-level unicode string BPE merges."""
    if piece.isascii() and piece.isprintable() and ' ' not in piece:
      return piece  # bytes 33-126 map to themselves: no per-byte lookup
    return ''.join(self.byte_encoder[b] for b in piece.encode('utf-8'))

  def _encode_uncached(self, text: str) -> list[int]:
    """Ids of a cleaned caption (no caption cache)."""
    ids = []
    pattern = self._ascii_pattern if text.isascii() and text.isprintable() else self._pattern
    for piece in pattern.findall(text):
      if piece in (SOT, EOT):
        ids.append(self.encoder[piece])
      else:
        ids.extend(self._bpe(self._byte_level(piece)))
    return ids

  def _ids(self, text: str) -> np.ndarray:
    """Ids of a caption without SOT/EOT, int32, cached per caption (read-only)."""
    ids = self._text_cache.get(text)
    if ids is None:
      ids = np.array(self._encode_uncached(clean(text)), np.int32)
      ids.flags.writeable = False
      if len(self._text_cache) >= _TEXT_CACHE_LIMIT:
        self._text_cache.clear()
      self._text_cache[text] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Ids of a caption without SOT/EOT."""
    return self._ids(text).tolist()

  def encode_padded(self, text: str, context_length: int | None = None) -> np.ndarray:
    """One caption as int32 [context_length]: SOT, ids (cut to fit), EOT, zeros."""
    out = np.zeros(self._length(context_length), np.int32)
    self._fill(out, text)
    return out

  def _length(self, context_length: int | None) -> int:
    length = context_length or self.context_length
    if length < 2:
      raise ValueError(f'context_length={length}: need room for SOT and EOT')
    return length

  def _fill(self, row: np.ndarray, text: str) -> None:
    ids = self._ids(text)[:len(row) - 2]
    row[0] = self.sot_id
    row[1:len(ids) + 1] = ids
    row[len(ids) + 1] = self.eot_id

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if int(i) not in (0, self.sot_id, self.eot_id)]
    text = ''.join(self.decoder[i] for i in ids)
    raw = bytearray(self.byte_decoder[c] for c in text)
    return raw.decode('utf-8', errors='replace').replace('</w>', ' ').strip()

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), self._length(context_length)), np.int32)
    for row, text in zip(out, texts):
      self._fill(row, text)
    return out


@functools.lru_cache(maxsize=8)
def get_tokenizer(merges_path: str | None = None) -> Tokenizer:
  """A shared tokenizer per merges file (building one reads ~50k merges, ~0.3 s)."""
  return Tokenizer(merges_path)


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH,
             merges_path: str | None = None) -> np.ndarray:
  """CLIP token ids, np.int32 [N, context_length]."""
  return get_tokenizer(merges_path)(texts, context_length)


def train_bpe(captions: Iterable[str], workdir: str, vocab_size: int = 8192,
              min_frequency: int = 2) -> str:
  """Trains a byte-level BPE on `captions` (HF `tokenizers`) and writes `workdir/bpe_merges.txt.gz`.

  Captions are cleaned and pre-split exactly as `Tokenizer.encode` does, so the merges slot into
  the same byte alphabet and `</w>` word ends; `vocab_size` counts the 512 byte symbols and the two
  specials. Returns the path, for `Tokenizer(merges_path=...)` / `config.model.tokenizer`; the model
  needs `vocab_size=Tokenizer(path).vocab_size`.
  """
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
  from tokenizers import models as hf_models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  if vocab_size <= 514:
    raise ValueError(f'vocab_size={vocab_size}: must exceed the 512 byte symbols + 2 specials')
  byte_encoder = bytes_to_unicode()
  pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def words():
    for caption in captions:
      yield ' '.join(''.join(byte_encoder[b] for b in piece.encode('utf-8'))
                     for piece in pattern.findall(clean(caption)))

  hf = HFTokenizer(hf_models.BPE(end_of_word_suffix='</w>'))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  # The HF vocabulary counts single symbols once; ours also has each with '</w>': 256 more.
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 258, min_frequency=min_frequency,
                                initial_alphabet=list(byte_encoder.values()),
                                end_of_word_suffix='</w>', show_progress=False)
  hf.train_from_iterator(words(), trainer=trainer)
  merges = json.loads(hf.to_str())['model']['merges']
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'bpe_merges.txt.gz')
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write('#version: cleanclip_jax train_bpe\n')
    for merge in merges:
      f.write((merge if isinstance(merge, str) else ' '.join(merge)) + '\n')
  return path
