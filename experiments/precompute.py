"""Precompute training data: `python -m experiments.precompute --annotations=clips.jsonl --vae=DIR
--text_encoder=DIR --output_dir=OUT --stages=3s,9s`.

VAE-encodes the annotated episode clips (49-then-48-frame windows, §7.5) and T5-encodes each 3-second
segment's text with scene tokens (§5.5) with the project's JAX models (converted checkpoint dirs), into the
TFDS ArrayRecord format, read by `--config.data.source=tfds
--config.data.tfds_dir=OUT/storyboard_latents/<stage>/1.0.0` (and, with --official_format, the official
JSONL layout OUT/official/<stage>/index.jsonl, read by `--config.data.index=...`).
Annotation format: `ttt_dit/data/episodes.py`. All logic: `ttt_dit.data.precompute`.
"""

from absl import app, flags, logging

_ANNOTATIONS = flags.DEFINE_string("annotations", None, "JSONL of annotated clips (ttt_dit/data/episodes.py).",
                                   required=True)
_VIDEO_ROOT = flags.DEFINE_string("video_root", None, "Folder the clips' paths are relative to "
                                  "(default: the annotations' folder).")
_VAE = flags.DEFINE_string("vae", None, "Converted CogVideoX VAE directory.", required=True)
_TEXT = flags.DEFINE_string("text_encoder", None, "Converted T5 directory (with tokenizer/).", required=True)
_OUT = flags.DEFINE_string("output_dir", None, "Output data_dir (written atomically).", required=True)
_STAGES = flags.DEFINE_list("stages", ["3s"], "Stages to build: 3s, 9s, 18s, 30s, 63s.")
_PRESET = flags.DEFINE_string("preset", "5B", "Model preset whose per-stage text length L_t is used.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 0, "Override L_t for every stage (0 = the preset's table, §1.3).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored dtype (official: bfloat16).")
_COMPUTE = flags.DEFINE_enum("compute_dtype", "float32", ["bfloat16", "float32"], "VAE / T5 compute dtype.")
_ON_ERROR = flags.DEFINE_enum("on_error", "fail", ["fail", "skip"], "Bad sample: stop, or skip and count.")
_SEGMENT_FRAMES = flags.DEFINE_integer("segment_frames", 48, "Frames per segment (48 = 3 s at 16 fps).")
_OFFICIAL = flags.DEFINE_bool("official_format", False, "Also write the official JSONL + tensor-file layout "
                                "(OUT/official/<stage>/index.jsonl, for --config.data.index).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output_dir.")


def main(argv):
  del argv
  import jax.numpy as jnp

  import ttt_dit
  from ttt_dit.data import precompute, tfds_builder
  from ttt_dit.model import configs
  from ttt_dit.vae.cogvideox_vae import load_vae
  unknown = sorted(set(_STAGES.value) - set(tfds_builder.STAGE_SEGMENTS))
  if unknown:
    raise app.UsageError(f"unknown stage(s) {unknown}; expected {list(tfds_builder.STAGE_SEGMENTS)}")
  text_lens = {s: _TEXT_LEN.value or configs.get_config(_PRESET.value, "ttt_mlp", s).text_len
               for s in _STAGES.value}
  dtype = getattr(jnp, _COMPUTE.value)
  vae = load_vae(_VAE.value, dtype=dtype, sample_window=_SEGMENT_FRAMES.value)
  enc = ttt_dit.load_text_encoder(_TEXT.value, dtype=dtype)
  skipped = precompute.precompute(_ANNOTATIONS.value, _OUT.value, vae, enc, _STAGES.value, text_lens,
                                  video_root=_VIDEO_ROOT.value, dtype=_DTYPE.value, on_error=_ON_ERROR.value,
                                  segment_frames=_SEGMENT_FRAMES.value, overwrite=_OVERWRITE.value,
                                  official=_OFFICIAL.value)
  logging.info("wrote %s; skipped per stage: %s", _OUT.value, {s: len(v) for s, v in skipped.items()})


if __name__ == "__main__":
  app.run(main)
