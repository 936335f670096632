"""Peak host memory of building the 5B DiT and of converting a 5B-shaped diffusers snapshot (CPU).

    python -m benchmarks.dit_5b_memory --workdir /path/with/40GB [--num_layers 42] [--phases build,write,convert]

Phases, each run in a fresh subprocess so that its peak is its own:
  build    abstract (shape-only) build of the full model, then a streaming random init: one
           TransformerLayer (with its TTT layer) at a time, cast to the stored dtype, then dropped.
  write    a synthetic CogVideoX-5b `transformer/` snapshot (diffusers names and shapes, two shards
           and an index json, like the published one) written tensor by tensor.
  convert  `converters.cogvideox.convert_snapshot` on it (TTT-MLP inserted), i.e. the real converter.
Reports the peak resident set (VmHWM) and the peak anonymous memory (RssAnon, sampled every 50 ms;
file-backed pages such as memory-mapped spill files are reclaimable and excluded) and appends a
section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Scratch folder (needs ~3x the stored model size free).")
flags.DEFINE_integer("num_layers", 42, "Transformer layers (42 = CogVideoX-5B).")
flags.DEFINE_list("phases", ["build", "write", "convert"], "Phases to run.")
flags.DEFINE_string("sequence_layer", "ttt_mlp", "TTT layer inserted by the converter.")
flags.DEFINE_string("dtype", "bfloat16", "Stored dtype of the snapshot and of the converted checkpoint.")
flags.DEFINE_string("phase", None, "Internal: run one phase in this process and print JSON.")
flags.DEFINE_string("results", os.path.join(os.path.dirname(__file__), "RESULTS.md"), "Results file.")

D, H, TEXT, TIME, FF = 3072, 48, 4096, 512, 4 * 3072


class PeakSampler:
  """Samples RssAnon of this process in a background thread; `peak_gb` after `stop()`."""

  def __init__(self, interval: float = 0.05):
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
    self._thread.start()

  @staticmethod
  def rss_anon() -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
    return 0

  def _run(self, interval: float) -> None:
    while not self._stop.is_set():
      self.peak = max(self.peak, self.rss_anon())
      time.sleep(interval)

  def stop(self) -> float:
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.rss_anon())
    return self.peak / 1e9


def diffusers_tensors(num_layers: int) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of every tensor of CogVideoX-5b's transformer in diffusers naming."""
  t = [("patch_embed.proj.weight", (D, 16, 2, 2)), ("patch_embed.proj.bias", (D,)),
       ("patch_embed.text_proj.weight", (D, TEXT)), ("patch_embed.text_proj.bias", (D,)),
       ("time_embedding.linear_1.weight", (TIME, D)), ("time_embedding.linear_1.bias", (TIME,)),
       ("time_embedding.linear_2.weight", (TIME, TIME)), ("time_embedding.linear_2.bias", (TIME,))]
  for i in range(num_layers):
    b = f"transformer_blocks.{i}."
    for n in ("norm1", "norm2"):
      t += [(b + n + ".linear.weight", (6 * D, TIME)), (b + n + ".linear.bias", (6 * D,)),
            (b + n + ".norm.weight", (D,)), (b + n + ".norm.bias", (D,))]
    for p in ("to_q", "to_k", "to_v", "to_out.0"):
      t += [(b + f"attn1.{p}.weight", (D, D)), (b + f"attn1.{p}.bias", (D,))]
    for p in ("norm_q", "norm_k"):
      t += [(b + f"attn1.{p}.weight", (D // H,)), (b + f"attn1.{p}.bias", (D // H,))]
    t += [(b + "ff.net.0.proj.weight", (FF, D)), (b + "ff.net.0.proj.bias", (FF,)),
          (b + "ff.net.2.weight", (D, FF)), (b + "ff.net.2.bias", (D,))]
  t += [("norm_final.weight", (D,)), ("norm_final.bias", (D,)), ("norm_out.linear.weight", (2 * D, TIME)),
        ("norm_out.linear.bias", (2 * D,)), ("norm_out.norm.weight", (D,)), ("norm_out.norm.bias", (D,)),
        ("proj_out.weight", (64, D)), ("proj_out.bias", (64,))]
  return t


DIFFUSERS_CONFIG = {
    "_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.30.0.dev0",
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226,
    "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 48, "num_layers": 42,
    "out_channels": 16, "patch_size": 2, "sample_frames": 49, "sample_height": 60, "sample_width": 90,
    "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4, "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 4096, "time_embed_dim": 512, "timestep_activation_fn": "silu",
    "use_rotary_positional_embeddings": True,
}

_ST_DTYPES = {"bfloat16": "BF16", "float32": "F32"}


def write_safetensors_streaming(path: str, tensors: list[tuple[str, tuple[int, ...]]], dtype: str,
                                fill) -> None:
  """Writes a safetensors file tensor by tensor (header first, then each tensor's bytes)."""
  from converters.common import parse_dtype
  np_dtype = parse_dtype(dtype)
  header, offset = {}, 0
  for name, shape in tensors:
    n = int(np.prod(shape)) * np_dtype.itemsize
    header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, shape in tensors:
      f.write(fill(name, shape).astype(np_dtype).tobytes())


def phase_build(num_layers: int, sequence_layer: str, dtype: str) -> dict:
  """Abstract build of the full model, then a streaming random init one layer at a time."""
  import jax
  from flax import nnx
  from converters.common import parse_dtype
  from ttt_dit.model.configs import get_config
  from ttt_dit.model.dit import TransformerLayer
  from ttt_dit.model.loading import abstract_model
  from ttt_dit.model.partition import flat_paths
  c = get_config("5B", sequence_layer)
  c.num_layers = num_layers
  t0 = time.time()
  total = sum(int(np.prod(x.shape)) for x in flat_paths(nnx.state(abstract_model(c), nnx.Param)).values())
  t_abstract = time.time() - t0
  np_dtype = parse_dtype(dtype)
  stored = 0
  for i in range(num_layers):
    layer = TransformerLayer(c, rngs=nnx.Rngs(i))
    for x in flat_paths(nnx.state(layer, nnx.Param)).values():
      stored += np.asarray(x).astype(np_dtype).nbytes
    del layer
    jax.clear_caches()
  return {"params": total, "abstract_build_s": round(t_abstract, 1), "layers_stored_gb": round(stored / 1e9, 2)}


def phase_write(workdir: str, num_layers: int, dtype: str) -> dict:
  """Writes the synthetic snapshot: two shards + index json, tensor by tensor."""
  tdir = os.path.join(workdir, "snapshot", "transformer")
  os.makedirs(tdir, exist_ok=True)
  cfg = dict(DIFFUSERS_CONFIG, num_layers=num_layers)
  with open(os.path.join(tdir, "config.json"), "w") as f:
    json.dump(cfg, f)
  tensors = diffusers_tensors(num_layers)
  half = len(tensors) // 2
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": tensors[:half],
            "diffusion_pytorch_model-00002-of-00002.safetensors": tensors[half:]}
  block = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32) * 0.02

  def fill(name, shape):  # cheap pseudo-random content: a tiled random block
    return np.resize(block, shape)

  for name, ts in shards.items():
    write_safetensors_streaming(os.path.join(tdir, name), ts, dtype, fill)
  with open(os.path.join(tdir, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": {n: s for s, ts in shards.items() for n, _ in ts}}, f)
  size = sum(os.path.getsize(os.path.join(tdir, s)) for s in shards)
  return {"snapshot_gb": round(size / 1e9, 2), "tensors": len(tensors)}


def phase_convert(workdir: str, sequence_layer: str, dtype: str) -> dict:
  """Runs the real converter on the synthetic snapshot."""
  import shutil
  from converters import cogvideox
  dst = os.path.join(workdir, "converted")
  shutil.rmtree(dst, ignore_errors=True)
  cogvideox.convert_snapshot(os.path.join(workdir, "snapshot"), dst, sequence_layer=sequence_layer, dtype=dtype)
  size = 0
  for root, _, files in os.walk(dst):
    size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return {"checkpoint_gb": round(size / 1e9, 2)}


def run_phase(phase: str) -> None:
  """Runs one phase in this process and prints its JSON result line."""
  sampler = PeakSampler()
  t0 = time.time()
  if phase == "build":
    out = phase_build(FLAGS.num_layers, FLAGS.sequence_layer, FLAGS.dtype)
  elif phase == "write":
    out = phase_write(FLAGS.workdir, FLAGS.num_layers, FLAGS.dtype)
  elif phase == "convert":
    out = phase_convert(FLAGS.workdir, FLAGS.sequence_layer, FLAGS.dtype)
  else:
    raise ValueError(f"unknown phase {phase!r}")
  out.update(phase=phase, seconds=round(time.time() - t0, 1), peak_anon_gb=round(sampler.stop(), 2),
             peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2))
  print("RESULT " + json.dumps(out), flush=True)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.phase:
    run_phase(FLAGS.phase)
    return
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="dit5b-")
  results = []
  for phase in FLAGS.phases:
    cmd = [sys.executable, "-m", "benchmarks.dit_5b_memory", f"--phase={phase}", f"--workdir={workdir}",
           f"--num_layers={FLAGS.num_layers}", f"--sequence_layer={FLAGS.sequence_layer}", f"--dtype={FLAGS.dtype}"]
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
      raise RuntimeError(f"phase {phase} failed:\n{res.stderr[-4000:]}")
    results.append(json.loads(lines[-1][len("RESULT "):]))
    print(results[-1], flush=True)
  section = [f"\n## DiT 5B host memory (`benchmarks/dit_5b_memory.py`), {time.strftime('%Y-%m-%d')}\n",
             f"CPU only; {FLAGS.num_layers} layers; stored dtype {FLAGS.dtype}; converter inserts "
             f"{FLAGS.sequence_layer}. Peak anon = peak RssAnon (sampled every 50 ms); peak RSS = VmHWM "
             "(includes reclaimable file-backed pages of memory-mapped files).\n",
             "| phase | seconds | peak anon GB | peak RSS GB | details |", "|---|---|---|---|---|"]
  for r in results:
    details = ", ".join(f"{k}={v}" for k, v in r.items()
                        if k not in ("phase", "seconds", "peak_anon_gb", "peak_rss_gb"))
    section.append(f"| {r['phase']} | {r['seconds']} | {r['peak_anon_gb']} | {r['peak_rss_gb']} | {details} |")
  with open(FLAGS.results, "a") as f:
    f.write("\n".join(section) + "\n")


if __name__ == "__main__":
  app.run(main)
