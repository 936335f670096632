"""ttt_dit.data: storyboards, episode clips, precomputed training data (official JSONL or TFDS + grain)."""


def open_training_data(data_config, num_frames: int, num_scenes: int):
  """The dataset a stage config names: `data.source` "official" (JSONL index, `latents.LatentDataset`) or
  "tfds" (`data.tfds_dir`, a built stage dataset read with grain, `tfds_builder.TfdsLatentDataset`).
  Both have `batch(step, global_batch, seed)` (resumable by step) and `skipped` ({id: reason})."""
  source = data_config.get("source", "official")
  if source == "official":
    from ttt_dit.data.latents import LatentDataset
    return LatentDataset(data_config.index, num_frames, num_scenes, on_error=data_config.on_error)
  if source == "tfds":
    try:
      from ttt_dit.data.tfds_builder import TfdsLatentDataset
    except ImportError as err:
      raise ImportError(f"config.data.source='tfds' needs the data extra (pip install -e '.[data]'): {err}") from err
    return TfdsLatentDataset(data_config.tfds_dir, num_frames, num_scenes, on_error=data_config.on_error)
  raise ValueError(f"config.data.source must be 'official' or 'tfds', got {source!r}")
