"""A built-in image-caption dataset drawn in code: the default data of the demo study and the tests.

Every example is a function of `(seed, split, index)` alone, so the dataset needs no download, is
identical on every host and in every grain worker, and its splits (`pretrain`, `finetune`, `test`)
never share an example (the split is part of the random seed). Each image shows one object from
`CLASS_NAMES` as a procedural silhouette; what identifies the class is the *shape* only, while
colour, size, position, rotation, mirroring, background, clutter, occlusion and pixel noise all vary
at random, so a model has to learn shapes (and the captions' words for them) rather than colours.

    source = SyntheticCaptions(4096, image_size=32, split='pretrain', seed=0)
    record = source[7]  # {'image': uint8 [32, 32, 3], 'image_path': '', 'caption': str, 'label': int, 'index': 7}

Pure numpy/PIL (no jax): it runs inside grain worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ('pretrain', 'finetune', 'test')

CLASS_NAMES = [
    'banana', 'apple', 'fish', 'house', 'tree', 'car', 'star', 'umbrella', 'cup', 'key', 'heart',
    'boat',
]

# Words a caption may use instead of the class name. None contains another class's name, so a
# caption never names two classes.
SYNONYMS = {
    'banana': ['plantain', 'banana fruit'],
    'apple': ['apple fruit', 'red delicious'],
    'fish': ['goldfish', 'little fish'],
    'house': ['home', 'cottage', 'hut'],
    'tree': ['oak', 'shade tree'],
    'car': ['automobile', 'vehicle', 'sedan'],
    'star': ['five-pointed star', 'starlet'],
    'umbrella': ['parasol', 'brolly'],
    'cup': ['mug', 'teacup'],
    'key': ['door key', 'latchkey'],
    'heart': ['love heart', 'valentine'],
    'boat': ['sailboat', 'ship', 'dinghy'],
}

# Zero-shot prompt templates (`template.format(class_name)`).
TEMPLATES = [
    'a photo of a {}.',
    'a picture of a {}.',
    'an image of a {}.',
    'a drawing of a {}.',
    'a photo of the {}.',
    'a {} on a background.',
    'a photo of a small {}.',
    'a photo of a large {}.',
    'there is a {} in the picture.',
]

_BACKGROUNDS = ('solid', 'gradient', 'texture', 'stripes', 'checker')
_BACKGROUND_WORDS = {
    'gradient': ['gradient', 'fading', 'shaded'],
    'texture': ['textured', 'noisy', 'mottled'],
    'stripes': ['striped', 'stripy'],
    'checker': ['checkered', 'checkerboard'],
}

_CAPTION_TEMPLATES = [
    'a photo of a {color} {name} on a {background} background.',
    'a photo of a {name}.',
    'there is a {size} {color} {name} {position}.',
    'a {size} {name} {position}.',
    'a {color} {name} {position}, {background} background.',
    '{name} on a {background} background.',
    'an image of a {color} {name}.',
    'clip art of a {name} {position}.',
    'a drawing of a {size} {name}.',
    'my {color} {name}!',
    'a {name} among some other shapes.',
    'look at this {color} {name} {position}.',
    'a picture of a {name}, {color}, {position}.',
    'a {color} {name}.',
]
_UNINFORMATIVE_CAPTIONS = [
    'a picture i found online.',
    'untitled image.',
    'some shapes on a {background} background.',
    'look at this!',
    'img_{number}.jpg',
    'a {color} thing {position}.',
    'what do you think?',
]


# --- silhouettes -----------------------------------------------------------------------------------
# Each class is a list of (role, polygon) in a unit frame (x right, y down, extent about [-1, 1]).
# Roles pick the colour: 'body' (the colour the caption names), 'part' (a second random colour),
# 'dark' (a random dark shade: wheels, doors, stems).


def _ellipse(cx, cy, rx, ry, n=24, a0=0.0, a1=2 * np.pi, radius_fn=None):
  angles = np.linspace(a0, a1, n, endpoint=(a1 - a0) < 2 * np.pi - 1e-9)
  scale = 1.0 if radius_fn is None else radius_fn(angles)
  return np.stack([cx + rx * scale * np.cos(angles), cy + ry * scale * np.sin(angles)], -1)


def _rect(x0, y0, x1, y1):
  return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def _thick_arc(cx, cy, r, width, a0, a1, n=16):
  outer = _ellipse(cx, cy, r + width / 2, r + width / 2, n, a0, a1)
  inner = _ellipse(cx, cy, r - width / 2, r - width / 2, n, a0, a1)
  return np.concatenate([outer, inner[::-1]])


def _crescent():
  # A centre line along an arc with a thickness that tapers to both tips.
  t = np.linspace(-1, 1, 21)
  angles = np.pi / 2 + t * 1.05
  centre = np.stack([1.1 * np.cos(angles), -0.75 + 1.1 * np.sin(angles)], -1)
  normal = np.stack([np.cos(angles), np.sin(angles)], -1)
  half = 0.26 * (1 - t**2) ** 0.7 + 0.03
  return np.concatenate([centre + normal * half[:, None], (centre - normal * half[:, None])[::-1]])


def _star(points=5, inner=0.42):
  angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
  radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)


def _heart():
  t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
  x = 16 * np.sin(t) ** 3
  y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
  return np.stack([x, y + 2.5], -1) / 16.5


def _build_shapes():
  apple_radius = lambda a: 1 - 0.18 * np.exp(-((a - 1.5 * np.pi) ** 2) / 0.08)
  canopy_radius = lambda a: 1 + 0.1 * np.sin(6 * a)
  umbrella_rim = np.stack([np.linspace(0.95, -0.95, 13), 0.05 * np.abs(np.sin(np.linspace(0, 3 * np.pi, 13))) + 0.02], -1)
  return {
      'banana': [('body', _crescent()), ('dark', _rect(-0.98, -0.48, -0.82, -0.28))],
      'apple': [('body', _ellipse(0, 0.1, 0.82, 0.78, 28, radius_fn=apple_radius)),
                ('dark', _rect(-0.05, -0.9, 0.06, -0.55)),
                ('part', _ellipse(0.22, -0.72, 0.2, 0.09, 12))],
      'fish': [('body', _ellipse(-0.2, 0, 0.68, 0.4)),
               ('body', np.array([[0.35, 0], [0.95, -0.48], [0.82, 0], [0.95, 0.48]])),
               ('dark', _ellipse(-0.58, -0.08, 0.07, 0.07, 8))],
      'house': [('body', _rect(-0.7, -0.1, 0.7, 0.92)),
                ('part', np.array([[-0.92, -0.05], [0, -0.9], [0.92, -0.05]])),
                ('dark', _rect(-0.15, 0.42, 0.15, 0.92)),
                ('part', _rect(0.3, 0.15, 0.55, 0.4))],
      'tree': [('part', _rect(-0.13, 0.15, 0.13, 0.97)),
               ('body', _ellipse(0, -0.3, 0.7, 0.62, 30, radius_fn=canopy_radius))],
      'car': [('body', _rect(-0.97, -0.05, 0.97, 0.42)),
              ('body', np.array([[-0.6, -0.05], [-0.38, -0.5], [0.35, -0.5], [0.62, -0.05]])),
              ('part', np.array([[-0.45, -0.1], [-0.3, -0.42], [0.27, -0.42], [0.45, -0.1]])),
              ('dark', _ellipse(-0.55, 0.45, 0.23, 0.23, 14)),
              ('dark', _ellipse(0.55, 0.45, 0.23, 0.23, 14))],
      'star': [('body', _star())],
      'umbrella': [('body', np.concatenate([_ellipse(0, 0.05, 0.95, 0.85, 20, np.pi, 2 * np.pi), umbrella_rim])),
                   ('dark', _rect(-0.04, 0.05, 0.04, 0.72)),
                   ('dark', _thick_arc(-0.16, 0.72, 0.16, 0.08, 0, np.pi, 10))],
      'cup': [('body', np.array([[-0.6, -0.65], [0.4, -0.65], [0.3, 0.75], [-0.5, 0.75]])),
              ('body', _thick_arc(0.38, 0.0, 0.3, 0.13, -np.pi / 2, np.pi / 2, 12)),
              ('part', _rect(-0.6, -0.65, 0.4, -0.5))],
      'key': [('body', _thick_arc(-0.58, 0, 0.27, 0.17, 0.15, 2 * np.pi - 0.15, 20)),
              ('body', _rect(-0.32, -0.07, 0.95, 0.07)),
              ('body', _rect(0.55, 0.0, 0.68, 0.32)),
              ('body', _rect(0.78, 0.0, 0.92, 0.25))],
      'heart': [('body', _heart())],
      'boat': [('body', np.array([[-0.95, 0.35], [0.95, 0.35], [0.62, 0.78], [-0.62, 0.78]])),
               ('dark', _rect(-0.04, -0.92, 0.04, 0.35)),
               ('part', np.array([[0.08, -0.85], [0.08, 0.27], [0.75, 0.27]])),
               ('part', np.array([[-0.08, -0.6], [-0.08, 0.27], [-0.55, 0.27]]))],
  }


_SHAPES = _build_shapes()
assert list(_SHAPES) == CLASS_NAMES


# --- colours ---------------------------------------------------------------------------------------


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  i = int(h * 6) % 6
  f = h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return np.array(rgb) * 255


def _colour_name(h: float, s: float, v: float) -> str:
  if v < 0.22:
    return 'black'
  if s < 0.2:
    return 'white' if v > 0.8 else 'gray'
  deg = h * 360
  if (deg < 40 or deg >= 345) and v < 0.55:
    return 'brown'
  for upper, name in ((15, 'red'), (40, 'orange'), (70, 'yellow'), (165, 'green'), (255, 'blue'),
                      (290, 'purple'), (345, 'pink')):
    if deg < upper:
      return name
  return 'red'


def _random_hsv(rng: np.random.Generator) -> tuple[float, float, float]:
  return float(rng.random()), float(rng.uniform(0.0, 1.0) ** 0.5), float(rng.uniform(0.25, 1.0))


# --- scenes ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scene:
  """Everything random about one example; rendering and captioning are functions of it."""
  label: int
  flip: bool
  angle: float  # degrees
  scale: float  # object half-extent as a fraction of the image side
  centre: tuple[float, float]  # fraction of the image side, (x, y)
  body_hsv: tuple[float, float, float]
  part_rgb: np.ndarray
  dark_rgb: np.ndarray
  background: str
  background_rgb: tuple[np.ndarray, np.ndarray]
  background_params: tuple[float, float, int]  # angle, period fraction, texture grid
  texture: np.ndarray | None
  distractors: list  # [(kind, centre (x, y), radius, angle, rgb, vertex radii)] behind the object
  occluders: list  # same, drawn in front of it
  noise_std: float
  noise_seed: int
  caption: str


def _sample_distractor(rng, centre, radius):
  kind = ('polygon', 'ellipse', 'bar')[int(rng.integers(3))]
  radii = rng.uniform(0.5, 1.0, int(rng.integers(3, 7)))
  return (kind, centre, radius, float(rng.uniform(0, 360)), _hsv_to_rgb(*_random_hsv(rng)), radii)


def _position_words(cx: float, cy: float) -> str:
  row = 'top' if cy < 0.4 else ('bottom' if cy > 0.6 else '')
  column = 'left' if cx < 0.4 else ('right' if cx > 0.6 else '')
  if row and column:
    return f'in the {row} {column}'
  if row:
    return f'near the {row}'
  return f'on the {column}' if column else 'in the center'


def _with_articles(text: str) -> str:
  return re.sub(r'\b([Aa]) ([aeiou])', r'\1n \2', text)


class SyntheticCaptions:
  """Random-access source of synthetic (image, caption, label) records; cheap to build and pickle.

  Difficulty knobs: `max_distractors` (clutter shapes behind the object), `occlusion_prob`
  (chance of a shape partly covering the object), `size_range` (object extent as a fraction of the
  image side), `max_rotation` (degrees), `noise_std` (largest per-image pixel noise, 0-255 units),
  `uninformative_prob` (captions that do not name the object) and `synonym_prob` (captions that use
  a synonym instead of the class name).
  """

  def __init__(self, num_examples: int, image_size: int = 32, split: str = 'pretrain', seed: int = 0,
               *, max_distractors: int = 2, occlusion_prob: float = 0.15,
               size_range: tuple[float, float] = (0.5, 0.9), max_rotation: float = 20.0,
               noise_std: float = 8.0, pattern_contrast: float = 60.0,
               uninformative_prob: float = 0.05, synonym_prob: float = 0.25):
    if split not in SPLITS:
      raise ValueError(f'SyntheticCaptions: split={split!r}; use one of {SPLITS} (data.synthetic.split)')
    if num_examples < 0:
      raise ValueError(f'SyntheticCaptions: num_examples={num_examples} must be >= 0')
    if image_size < 8:
      raise ValueError(f'SyntheticCaptions: image_size={image_size} is too small (>= 8)')
    if seed < 0:
      raise ValueError(f'SyntheticCaptions: seed={seed} must be >= 0')
    if not 0 < size_range[0] <= size_range[1] <= 1:
      raise ValueError(f'SyntheticCaptions: size_range={size_range} must satisfy 0 < lo <= hi <= 1')
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.split = split
    self.seed = int(seed)
    self.max_distractors = int(max_distractors)
    self.occlusion_prob = float(occlusion_prob)
    self.size_range = (float(size_range[0]), float(size_range[1]))
    self.max_rotation = float(max_rotation)
    self.noise_std = float(noise_std)
    self.pattern_contrast = float(pattern_contrast)
    self.uninformative_prob = float(uninformative_prob)
    self.synonym_prob = float(synonym_prob)
    # Supersampling anti-aliases the edges of small images (drawn at 2x, box-filtered down).
    self._supersample = 2 if self.image_size < 128 else 1

  @classmethod
  def from_config(cls, data_config, split: str | None = None, num_examples: int | None = None,
                  image_size: int | None = None, **knobs) -> 'SyntheticCaptions':
    """From `config.data` (keys `synthetic.{num_examples, split, seed}` and `image_size`)."""
    synthetic = data_config.synthetic
    return cls(num_examples=synthetic.num_examples if num_examples is None else num_examples,
               image_size=data_config.image_size if image_size is None else image_size,
               split=synthetic.split if split is None else split, seed=synthetic.seed, **knobs)

  @property
  def class_names(self) -> list[str]:
    return list(CLASS_NAMES)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticCaptions(num_examples={self.num_examples}, image_size={self.image_size}, '
            f'split={self.split!r}, seed={self.seed})')

  def __getitem__(self, index) -> dict[str, Any]:
    index = self._check_index(index)
    scene = self.scene(index)
    return {'image': self.render(scene), 'image_path': '', 'caption': scene.caption,
            'label': scene.label, 'index': index}

  # Labels and captions need no rendering: poisoned-set selection reads them for every example.
  def label(self, index: int) -> int:
    index = self._check_index(index)
    block, offset = divmod(index, len(CLASS_NAMES))
    # Labels are a fresh permutation of the classes in every block of len(CLASS_NAMES) examples:
    # exactly balanced, yet not predictable from the index.
    order = np.random.default_rng([self.seed, SPLITS.index(self.split), 1, block]).permutation(len(CLASS_NAMES))
    return int(order[offset])

  def labels(self) -> np.ndarray:
    return np.array([self.label(i) for i in range(self.num_examples)], np.int64)

  def caption(self, index: int) -> str:
    return self.scene(self._check_index(index)).caption

  def captions(self) -> list[str]:
    return [self.caption(i) for i in range(self.num_examples)]

  def _check_index(self, index) -> int:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'SyntheticCaptions index {index} out of range [0, {self.num_examples})')
    return index

  def scene(self, index: int) -> Scene:
    """Samples every random choice of example `index` (its rendering and caption follow from it)."""
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), 0, index])
    label = self.label(index)
    scale = float(rng.uniform(*self.size_range)) / 2
    margin = 0.8 * scale  # the object may be partly cut off by the border, rarely much
    centre = (float(rng.uniform(margin, 1 - margin)), float(rng.uniform(margin, 1 - margin)))
    background = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    bg_hsv = _random_hsv(rng)
    bg_a = _hsv_to_rgb(*bg_hsv)
    bg_b = _hsv_to_rgb(*_random_hsv(rng))
    if background in ('texture', 'stripes', 'checker'):
      # Patterns stay low-contrast so their edges do not drown the object's.
      bg_b = np.clip(bg_a + rng.uniform(-self.pattern_contrast, self.pattern_contrast, 3), 0, 255)
    bg_params = (float(rng.uniform(0, np.pi)), float(rng.uniform(0.08, 0.3)), int(rng.integers(3, 9)))
    texture = rng.random((bg_params[2], bg_params[2])) if background == 'texture' else None
    # The object must stand out from the background's mean colour more often than not.
    for _ in range(4):
      body_hsv = _random_hsv(rng)
      if np.abs(_hsv_to_rgb(*body_hsv) - (bg_a + bg_b) / 2).sum() > 120:
        break
    part_rgb = _hsv_to_rgb(*_random_hsv(rng))
    dark_rgb = _hsv_to_rgb(float(rng.random()), float(rng.uniform(0, 0.6)), float(rng.uniform(0.05, 0.3)))
    distractors = [
        _sample_distractor(rng, (float(rng.random()), float(rng.random())), float(rng.uniform(0.05, 0.16)))
        for _ in range(int(rng.integers(0, self.max_distractors + 1)))]
    occluders = []
    if rng.random() < self.occlusion_prob:
      direction = rng.uniform(0, 2 * np.pi)
      distance = scale * rng.uniform(0.6, 0.95)
      occluders.append(_sample_distractor(
          rng, (centre[0] + distance * np.cos(direction), centre[1] + distance * np.sin(direction)),
          scale * float(rng.uniform(0.3, 0.5))))
    scene = Scene(
        label=label, flip=bool(rng.random() < 0.5),
        angle=float(rng.uniform(-self.max_rotation, self.max_rotation)), scale=scale, centre=centre,
        body_hsv=body_hsv, part_rgb=part_rgb, dark_rgb=dark_rgb, background=background,
        background_rgb=(bg_a, bg_b), background_params=bg_params, texture=texture,
        distractors=distractors, occluders=occluders,
        noise_std=float(rng.uniform(0, self.noise_std)), noise_seed=int(rng.integers(2**62)),
        caption='')
    scene.caption = self._caption(scene, rng)
    return scene

  def _caption(self, scene: Scene, rng: np.random.Generator) -> str:
    name = CLASS_NAMES[scene.label]
    if rng.random() < self.synonym_prob:
      synonyms = SYNONYMS[name]
      name = synonyms[int(rng.integers(len(synonyms)))]
    lo, hi = self.size_range
    relative = (2 * scene.scale - lo) / max(hi - lo, 1e-6)
    size = ('small', 'tiny', 'little')[int(rng.integers(3))] if relative < 0.33 else (
        ('large', 'big', 'huge')[int(rng.integers(3))] if relative > 0.67 else ('medium', 'mid-sized')[int(rng.integers(2))])
    bg_colour = _colour_name(*_rgb_to_hsv(scene.background_rgb[0]))
    words = _BACKGROUND_WORDS.get(scene.background)
    background = f'plain {bg_colour}' if words is None else words[int(rng.integers(len(words)))]
    if rng.random() < self.uninformative_prob:
      templates = _UNINFORMATIVE_CAPTIONS
    else:
      templates = _CAPTION_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    text = template.format(name=name, color=_colour_name(*scene.body_hsv), size=size,
                           position=_position_words(*scene.centre), background=background,
                           number=int(rng.integers(1000, 9999)))
    return _with_articles(text)

  def render(self, scene: Scene) -> np.ndarray:
    """Draws a scene: uint8 [image_size, image_size, 3]."""
    canvas = self.image_size * self._supersample
    image = Image.fromarray(_background(scene, canvas))
    draw = ImageDraw.Draw(image)
    for distractor in scene.distractors:
      _draw_distractor(draw, distractor, canvas)
    body_rgb = _hsv_to_rgb(*scene.body_hsv)
    colours = {'body': body_rgb, 'part': scene.part_rgb, 'dark': scene.dark_rgb}
    theta = np.deg2rad(scene.angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    mirror = np.array([-1.0, 1.0]) if scene.flip else np.ones(2)
    centre = np.array(scene.centre) * canvas
    for role, polygon in _SHAPES[CLASS_NAMES[scene.label]]:
      points = (polygon * mirror) @ rotation.T * (scene.scale * canvas) + centre
      draw.polygon(points.ravel().tolist(), fill=tuple(int(c) for c in colours[role]))
    for occluder in scene.occluders:
      _draw_distractor(draw, occluder, canvas)
    if self._supersample > 1:
      image = image.reduce(self._supersample)
    pixels = np.asarray(image, dtype=np.float32)
    if scene.noise_std > 0:
      noise_rng = np.random.default_rng(scene.noise_seed)
      pixels += scene.noise_std * noise_rng.standard_normal(pixels.shape, dtype=np.float32)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[float, float, float]:
  r, g, b = (np.asarray(rgb, float) / 255).tolist()
  hi, lo = max(r, g, b), min(r, g, b)
  v = hi
  s = 0.0 if hi == 0 else (hi - lo) / hi
  if hi == lo:
    h = 0.0
  elif hi == r:
    h = ((g - b) / (hi - lo)) % 6 / 6
  elif hi == g:
    h = ((b - r) / (hi - lo) + 2) / 6
  else:
    h = ((r - g) / (hi - lo) + 4) / 6
  return h, s, v


@functools.lru_cache(maxsize=8)
def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
  coords = (np.arange(canvas, dtype=np.float32) + 0.5) / canvas
  return coords[None, :], coords[:, None]


def _background(scene: Scene, canvas: int) -> np.ndarray:
  a, b = (np.asarray(c, np.float32) for c in scene.background_rgb)
  angle, period, _ = scene.background_params
  x, y = _grid(canvas)
  if scene.background == 'solid':
    return np.broadcast_to(a.astype(np.uint8), (canvas, canvas, 3)).copy()
  if scene.background == 'texture':
    texture = Image.fromarray((scene.texture * 255).astype(np.uint8)).resize((canvas, canvas), Image.BILINEAR)
    weight = np.asarray(texture, np.float32)[..., None] / 255
  else:
    projected = x * np.cos(angle) + y * np.sin(angle)
    if scene.background == 'gradient':
      weight = (projected - projected.min()) / max(float(np.ptp(projected)), 1e-6)
    elif scene.background == 'stripes':
      weight = (np.sin(2 * np.pi * projected / period) > 0).astype(np.float32)
    else:  # checker
      weight = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
      weight = np.broadcast_to(weight, (canvas, canvas))
    weight = np.broadcast_to(weight, (canvas, canvas))[..., None]
  return (a + (b - a) * weight).astype(np.uint8)


def _draw_distractor(draw: ImageDraw.ImageDraw, distractor, canvas: int) -> None:
  kind, (cx, cy), radius, angle, rgb, radii = distractor
  fill = tuple(int(c) for c in rgb)
  r = radius * canvas
  cx, cy = cx * canvas, cy * canvas
  theta = np.deg2rad(angle)
  if kind == 'ellipse':
    draw.ellipse([cx - r, cy - r * radii[0], cx + r, cy + r * radii[0]], fill=fill)
    return
  if kind == 'bar':
    half = np.array([[-1, -0.18], [1, -0.18], [1, 0.18], [-1, 0.18]]) * r
  else:  # an irregular polygon with 3-6 vertices
    angles = 2 * np.pi * np.arange(len(radii)) / len(radii)
    half = np.stack([np.cos(angles), np.sin(angles)], -1) * radii[:, None] * r
  rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  draw.polygon((half @ rotation.T + [cx, cy]).ravel().tolist(), fill=fill)


def sample_grid(num_columns: int = 8, image_size: int = 64, seed: int = 0, split: str = 'test') -> Image.Image:
  """A labelled grid of examples: clean, then with each trigger family at its default settings."""
  from cleanclip_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cleanclip_jax.data import triggers  # pylint: disable=g-import-not-at-top
  source = SyntheticCaptions(num_columns, image_size, split=split, seed=seed)
  clean = [source[i]['image'] for i in range(num_columns)]
  rows = [('clean', clean)]
  for kind in triggers.KINDS:
    trigger_config = config_lib.trigger_config()
    trigger_config.kind = kind
    trigger = triggers.make_trigger(trigger_config, image_size)
    rows.append((kind, [trigger(image, i) for i, image in enumerate(clean)]))
  margin, gap = 90, 2
  cell = image_size + gap
  grid = Image.new('RGB', (margin + num_columns * cell, len(rows) * cell + 14), 'white')
  draw = ImageDraw.Draw(grid)
  for column in range(num_columns):
    draw.text((margin + column * cell + 2, 0), CLASS_NAMES[source.label(column)], fill='black')
  for row, (name, images) in enumerate(rows):
    draw.text((4, 14 + row * cell + image_size // 2 - 5), name, fill='black')
    for column, image in enumerate(images):
      grid.paste(Image.fromarray(image), (margin + column * cell, 14 + row * cell))
  return grid


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  # python -m cleanclip_jax.data.synthetic [out.png]: the sample figure of the README, and captions.
  out = sys.argv[1] if len(sys.argv) > 1 else 'docs/synthetic_samples.png'
  sample_grid().quantize(256).save(out, optimize=True)
  source = SyntheticCaptions(12, 32, split='test')
  for i in range(12):
    print(f'{CLASS_NAMES[source.label(i)]:>9}: {source.caption(i)}')
  print(f'wrote {out}')
