"""TFDS dataset of precomputed storyboard samples (ArrayRecord), built and read without TensorFlow.

Building: `StoryboardLatents`, a `tfds.core.GeneratorBasedBuilder` with one builder config per context stage
(3s, 9s, 18s, 30s, 63s = 1, 3, 6, 10, 21 segments) writing `array_record` files; TFDS' writer and its
`incomplete.*` directory (renamed when complete) need no TensorFlow. Examples come from `episodes.Sample`s
through an `encode(sample) -> (moments, text)` callable (the VAE/T5 pipeline of `experiments/precompute.py`,
or anything else): one example per sample with

  id        text            sample id ("<episode>/<first segment>")
  moments   [T, h, w, 2C]   VAE mean || logvar (channels last, not scaled; §7.5), T = 12n + 1
  text      [n, L_t, D]     T5 embedding of each 3-second segment's text, scene tokens included (§5.5)
  texts     n strings       those texts

Reading: `tfds.builder_from_directory(dir).as_data_source()` + grain (`TfdsLatentDataset`): shuffled with a
fixed seed, sharded per host (`grain.sharding.ShardOptions(process_index, process_count)`), each host's
k-th record = its `IndexSampler`'s global index `shard_index + k * shard_count`, so the position of a run is a
function of the step (resumable from the step alone) and a `grain.DataLoader` iterator over the same
sampler (`loader()`) gives the same batches with `get_state` / `set_state` for checkpointing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from ttt_dit.data import episodes

STAGE_SEGMENTS = {"3s": 1, "9s": 3, "18s": 6, "30s": 10, "63s": 21}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
Encode = Callable[[episodes.Sample], tuple[np.ndarray, np.ndarray]]


class StageConfig(tfds.core.BuilderConfig):
  """One context stage: samples of `num_segments` 3-second segments."""

  def __init__(self, *, num_segments: int, **kwargs):
    super().__init__(**kwargs)
    self.num_segments = num_segments


class StoryboardLatents(tfds.core.GeneratorBasedBuilder):
  """Precomputed VAE moments + T5 embeddings of storyboard video samples (one config per stage)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "VAE mean||logvar (49/48-frame windows) + per-segment T5 with scene tokens."}
  BUILDER_CONFIGS = [StageConfig(name=s, num_segments=n, description=f"{s} samples ({n} segments)")
                     for s, n in STAGE_SEGMENTS.items()]

  def __init__(self, *, samples: Sequence[episodes.Sample] = (), encode: Encode | None = None,
               moments_shape: tuple[int, ...] | None = None, text_shape: tuple[int, ...] | None = None,
               dtype: str = "bfloat16", on_error: str = "fail", progress: Callable[[int], None] | None = None,
               **kwargs):
    if on_error not in ("fail", "skip"):
      raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    self._samples, self._encode, self._on_error, self._progress = list(samples), encode, on_error, progress
    self._moments_shape, self._text_shape, self._dtype = moments_shape, text_shape, DTYPES[dtype]
    self.skipped: dict[str, str] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    if self._moments_shape is None or self._text_shape is None:
      raise ValueError("StoryboardLatents: moments_shape and text_shape are needed to build "
                       "(read an existing dataset with tfds.builder_from_directory)")
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__.split("\n")[0],
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "moments": tfds.features.Tensor(shape=tuple(self._moments_shape), dtype=self._dtype,
                                             encoding=tfds.features.Encoding.BYTES),
            "text": tfds.features.Tensor(shape=tuple(self._text_shape), dtype=self._dtype,
                                          encoding=tfds.features.Encoding.BYTES),
            "texts": tfds.features.Sequence(tfds.features.Text()),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    n = self.builder_config.num_segments
    for sample in self._samples:
      try:
        if len(sample.parts) != n:
          raise episodes.BadSample(sample.id, f"{len(sample.parts)} segments, stage {self.builder_config.name} "
                                              f"needs {n}")
        try:
          moments, text = self._encode(sample)
        except episodes.BadSample:
          raise
        except (OSError, ValueError) as err:
          raise episodes.BadSample(sample.id, str(err)) from err
        moments, text = np.asarray(moments, np.float32), np.asarray(text, np.float32)
        for name, x, want in (("moments", moments, self._moments_shape), ("text", text, self._text_shape)):
          if x.shape != tuple(want):
            raise episodes.BadSample(sample.id, f"{name} shape {x.shape}, expected {tuple(want)}")
          if not np.isfinite(x).all():
            raise episodes.BadSample(sample.id, f"non-finite values in {name}")
      except episodes.BadSample as err:
        if self._on_error == "fail":
          raise
        self.skipped[sample.id] = err.reason
        logging.warning("skipping bad sample: %s", err)
        continue
      finally:
        if self._progress is not None:
          self._progress(1)
      yield sample.id, {"id": sample.id, "moments": moments.astype(self._dtype), "text": text.astype(self._dtype),
                        "texts": list(sample.texts)}
    logging.info("stage %s: %d samples, %d skipped%s", self.builder_config.name,
                 len(self._samples) - len(self.skipped), len(self.skipped),
                 f" ({sorted(self.skipped)})" if self.skipped else "")
    if len(self.skipped) == len(self._samples):
      raise ValueError(f"no usable samples (skipped {len(self.skipped)}: {self.skipped})")


def build(data_dir: str, stage: str, samples: Sequence[episodes.Sample], encode: Encode,
          moments_shape: tuple[int, ...], text_shape: tuple[int, ...], dtype: str = "bfloat16",
          on_error: str = "fail", progress: Callable[[int], None] | None = None) -> StoryboardLatents:
  """Writes `<data_dir>/storyboard_latents/<stage>/1.0.0` (ArrayRecord); returns the builder (`.skipped`)."""
  b = StoryboardLatents(data_dir=data_dir, config=stage, samples=samples, encode=encode,
                        moments_shape=moments_shape, text_shape=text_shape, dtype=dtype, on_error=on_error,
                        progress=progress, file_format="array_record")
  b.download_and_prepare()
  return b


def dataset_dir(data_dir: str, stage: str) -> str:
  """Where `build` puts a stage's dataset."""
  return os.path.join(data_dir, "storyboard_latents", stage, str(StoryboardLatents.VERSION))


def data_source(path: str, split: str = "train"):
  """Random-access source of a built dataset directory (a `dataset_dir`), without TensorFlow."""
  return tfds.builder_from_directory(path).as_data_source(split=split)


class _ValidatedSource(grain.sources.RandomAccessDataSource):
  """Records -> (moments [T, h, w, 2C] f32, text [n, L_t, D] f32), checked; bad ones fail or are replaced."""

  def __init__(self, source, num_frames: int, num_scenes: int, on_error: str, skipped: dict[str, str]):
    self.source, self.num_frames, self.num_scenes = source, num_frames, num_scenes
    self.on_error, self.skipped = on_error, skipped

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:  # grain checks it when restoring an iterator state
    return (f"_ValidatedSource({self.source!r}, num_frames={self.num_frames}, num_scenes={self.num_scenes}, "
            f"on_error={self.on_error!r})")

  def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    name = f"record {i}"
    try:
      ex = self.source[i]
      name = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
      moments, text = np.asarray(ex["moments"], np.float32), np.asarray(ex["text"], np.float32)
    except Exception as err:  # ArrayRecord / proto / feature decoding errors: a corrupt record
      raise episodes.BadSample(name, f"corrupt record: {type(err).__name__}: {err}") from err
    if moments.ndim != 4 or moments.shape[0] != self.num_frames or moments.shape[-1] % 2:
      raise episodes.BadSample(name, f"moments {moments.shape}, expected [T={self.num_frames}, h, w, 2C]")
    if text.ndim != 3 or text.shape[0] != self.num_scenes:
      raise episodes.BadSample(name, f"text {text.shape}, expected [n={self.num_scenes}, L_t, D]")
    if not (np.isfinite(moments).all() and np.isfinite(text).all()):
      raise episodes.BadSample(name, "non-finite values")
    return moments, text

  def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    i = int(i)
    for k in range(len(self)):               # a skipped record is replaced by the next good one (deterministic)
      j = (i + k) % len(self)
      try:
        return self._load(j)
      except episodes.BadSample as err:
        if self.on_error == "fail":
          raise
        if err.sample_id not in self.skipped:
          self.skipped[err.sample_id] = err.reason
          logging.warning("skipping bad sample: %s (%d skipped so far)", err, len(self.skipped))
    raise ValueError(f"no usable records (skipped {len(self.skipped)}: {self.skipped})")


class TfdsLatentDataset:
  """A built stage dataset read with grain; `batch(step, B, seed)` as `latents.LatentDataset` (host-global)."""

  def __init__(self, path: str, num_frames: int, num_scenes: int, on_error: str = "fail", split: str = "train",
               shard_index: int | None = None, shard_count: int | None = None):
    if on_error not in ("fail", "skip"):
      raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if not os.path.isdir(path):
      raise ValueError(f"TFDS dataset {path!r} does not exist (build it with experiments/precompute.py)")
    import jax  # the host's place among the processes, by default
    self.shard_index = jax.process_index() if shard_index is None else shard_index
    self.shard_count = jax.process_count() if shard_count is None else shard_count
    self.skipped: dict[str, str] = {}
    self.source = _ValidatedSource(data_source(path, split), num_frames, num_scenes, on_error, self.skipped)
    if len(self.source) < self.shard_count:
      raise ValueError(f"{path}: {len(self.source)} records for {self.shard_count} hosts")
    logging.info("TFDS dataset %s: %d records, host %d of %d", path, len(self.source), self.shard_index,
                 self.shard_count)

  def __len__(self) -> int:
    return len(self.source)

  def sampler(self, seed: int, shard_index: int | None = None, shard_count: int | None = None):
    """Infinite shuffled sampler of one host (even shards, remainder dropped)."""
    p = self.shard_index if shard_index is None else shard_index
    n = self.shard_count if shard_count is None else shard_count
    return grain.samplers.IndexSampler(len(self.source), grain.sharding.ShardOptions(p, n, drop_remainder=True),
                                       shuffle=True, num_epochs=None, seed=seed)

  def _local_batch_size(self, global_batch: int) -> int:
    if global_batch % self.shard_count:
      raise ValueError(f"global batch {global_batch} not divisible by {self.shard_count} hosts")
    return global_batch // self.shard_count

  def host_indices(self, step: int, global_batch: int, seed: int = 0, shard_index: int | None = None
                   ) -> np.ndarray:
    """Record indices of one host's rows at `step` (its k-th record = sampler[shard_index + k * shard_count])."""
    p = self.shard_index if shard_index is None else shard_index
    b = self._local_batch_size(global_batch)
    s = self.sampler(seed, p)
    return np.array([s[p + k * self.shard_count].record_key for k in range(step * b, (step + 1) * b)])

  def local_batch(self, step: int, global_batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """This host's rows of the global batch (for `jax.make_array_from_process_local_data`)."""
    return self._stack(self.host_indices(step, global_batch, seed))

  def batch_indices(self, step: int, global_batch: int, seed: int = 0) -> np.ndarray:
    """All hosts' rows, host after host (the global batch)."""
    return np.concatenate([self.host_indices(step, global_batch, seed, p) for p in range(self.shard_count)])

  def batch(self, step: int, global_batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(moments [B, T, h, w, 2C], text [B, n, L_t, D]) of the global batch at `step` (resumable by step)."""
    return self._stack(self.batch_indices(step, global_batch, seed))

  def _stack(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = [self.source[i] for i in idx]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def loader(self, global_batch: int, seed: int = 0, worker_count: int = 0) -> grain.DataLoader:
    """grain DataLoader of this host's batches (same order as `local_batch`); its iterator has get_state /
    set_state (JSON bytes) to save with a checkpoint."""
    return grain.DataLoader(
        data_source=self.source, sampler=self.sampler(seed), worker_count=worker_count,
        shard_options=grain.sharding.ShardOptions(self.shard_index, self.shard_count, drop_remainder=True),
        operations=[grain.transforms.Batch(self._local_batch_size(global_batch), drop_remainder=True)])
