"""Compares ttt-dit with the official ttt-video-dit PyTorch DiT, given a local checkout of the latter.

    python -m tools.official_parity --official_dir=PATH/ttt-video-dit [--sequence_layer=ttt_mlp] [--scenes=3]

Builds a small official `DiffusionTransformer` (head dim 64, 2 layers, random weights with non-zero
TTT gates) in float64 on the CPU, runs it with its pure-PyTorch TTT ops (`use_kernel=False`) adjusted
to the semantics of the official *kernels* that trained the released models (spec §3.4, §4.2): inner
LayerNorm eps `--inner_eps` (1e-6) and the last row of each mini-batch's learning-rate matrix for
every token (`--eta=kernel`; `--eta=fallback` keeps the PyTorch ops' full matrix, which differs for
more than one scene). Then saves its state_dict, converts it with `converters.ttt_video_dit` and
compares ttt-dit's float64 output on the same multi-scene input. Exits non-zero above `--tol`.

Needs torch, einops and the checkout (not a dependency of ttt-dit); nothing is written into the
checkout. The official code keeps some tables in float32 (timestep embedding, RoPE), so expect
~1e-7 relative error in float64, not 1e-12.
"""

from __future__ import annotations

import os
import sys
import tempfile
import types

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("official_dir", None, "Checkout of test-time-training/ttt-video-dit.", required=True)
flags.DEFINE_enum("sequence_layer", "ttt_mlp", ["ttt_mlp", "ttt_linear"], "TTT layer type.")
flags.DEFINE_integer("scenes", 3, "Number of 3-second scenes (1 or 3).")
flags.DEFINE_float("inner_eps", 1e-6, "Inner-loop LayerNorm eps (1e-6 kernels, 1e-8 PyTorch ops).")
flags.DEFINE_enum("eta", "kernel", ["kernel", "fallback"], "Learning-rate rows: kernel (last row) | fallback.")
flags.DEFINE_float("tol", 1e-5, "Largest accepted relative L2 error.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")

HW = 4  # latent height = width (2 x 2 patches per frame)


def import_official(path: str, inner_eps: float, kernel_eta: bool):
  """Imports the official modules with the TTT ops set to kernel semantics; returns (ModelConfig, DiT)."""
  os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the official code torch.compile's small functions
  sys.path.insert(0, os.path.abspath(path))
  sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # imported, unused for the forward pass
  import ttt.models.ssm.ops  # noqa: F401  pylint: disable=import-outside-toplevel
  from ttt.models.configs import ModelConfig  # pylint: disable=import-outside-toplevel
  from ttt.models.cogvideo.dit import DiffusionTransformer  # pylint: disable=import-outside-toplevel
  from ttt.models.ssm import ttt_layer  # pylint: disable=import-outside-toplevel
  for name in ("ttt.models.ssm.ops.ttt_mlp", "ttt.models.ssm.ops.ttt_linear"):
    mod = sys.modules[name]
    fwd, bwd, step = mod.ln_fwd, mod.ln_fused_l2_bwd, mod.compute_mini_batch
    mod.ln_fwd = lambda x, g, b, eps=inner_eps, f=fwd: f(x, g, b, eps)
    mod.ln_fused_l2_bwd = lambda x, t, g, b, eps=inner_eps, f=bwd: f(x, t, g, b, eps)

    def kernel_step(params, inputs, f=step):
      if kernel_eta:  # every row of the [C, C] matrix := its last row, as the kernels read it
        eta = inputs["eta"]
        inputs = dict(inputs, eta=eta[:, :, -1:, :].expand_as(eta).contiguous())
      return f(params, inputs)
    mod.compute_mini_batch = kernel_step
  for cls in (ttt_layer.TTTMLP, ttt_layer.TTTLinear):
    cls.__init__ = (lambda init: lambda self, config, use_kernel=False: init(self, config, use_kernel=False))(
        cls.__init__)
  return ModelConfig, DiffusionTransformer


def official_model(ModelConfig, DiffusionTransformer, layer: str, scenes: int, seed: int):
  """A float64 official DiT with random weights, non-zero gates and non-trivial TTT learning rates."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  mlp = layer == "ttt_mlp"
  cfg = ModelConfig(model_dim=128, num_heads=2, num_layers=2, ssm_layer=layer, text_dim=32, time_embed_dim=64,
                    latent_height=HW // 2, latent_width=HW // 2, compressed_num_frames=1 + 12 * scenes,
                    mini_batch_size=64 if mlp else 16, ttt_base_lr=0.1 if mlp else 1.0)
  model = DiffusionTransformer(cfg).double().eval()
  with torch.no_grad():
    for block in model.layers:
      block.seq_modeling_block.ssm.init_freqs()
      block.seq_modeling_block.ssm.ttt.init_weights()
    for name, p in model.named_parameters():
      if "gating_alpha" in name or "learnable_ttt_lr" in name:
        p.copy_(torch.randn_like(p) * 0.5)
  return model


def text_length(layer: str, scenes: int) -> int:
  """Per-scene text length making the interleaved sequence a whole number of mini-batches."""
  table = {("ttt_mlp", 1): 12, ("ttt_mlp", 3): 36, ("ttt_linear", 1): 12, ("ttt_linear", 3): 4}
  if (layer, scenes) not in table:
    raise ValueError(f"--scenes={scenes} is not supported (1 or 3)")
  return table[(layer, scenes)]


def main(argv):
  del argv
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  ModelConfig, DiffusionTransformer = import_official(FLAGS.official_dir, FLAGS.inner_eps, FLAGS.eta == "kernel")
  torch.set_default_dtype(torch.float64)
  model = official_model(ModelConfig, DiffusionTransformer, FLAGS.sequence_layer, FLAGS.scenes, FLAGS.seed)
  frames, lt = 1 + 12 * FLAGS.scenes, text_length(FLAGS.sequence_layer, FLAGS.scenes)
  video = torch.randn(1, frames, 16, HW, HW)  # [B, T, C, H, W] official layout
  text = torch.randn(1, FLAGS.scenes, lt, 32)
  t = torch.tensor([421])
  with torch.no_grad():
    ref = model(video, text, t).numpy()

  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from converters import ttt_video_dit  # pylint: disable=import-outside-toplevel
  from ttt_dit.model.loading import load_dit_model  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as d:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(d, "official.safetensors"))
    ttt_video_dit.convert(os.path.join(d, "official.safetensors"), os.path.join(d, "flax"),
                          ttt_ln_eps=FLAGS.inner_eps, eta_mode="official")
    ours, _ = load_dit_model(os.path.join(d, "flax"), dtype=jnp.float64, param_dtype=jnp.float64)
    out = ours(jnp.asarray(video.numpy().transpose(0, 1, 3, 4, 2)), jnp.asarray(text.numpy()), jnp.asarray(t.numpy()))
  out = np.asarray(out).transpose(0, 1, 4, 2, 3)
  rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
  print(f"{FLAGS.sequence_layer} scenes={FLAGS.scenes} inner_eps={FLAGS.inner_eps} eta={FLAGS.eta}: "
        f"relative L2 error vs official {rel:.3e} (tolerance {FLAGS.tol:g})")
  if not rel <= FLAGS.tol:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
