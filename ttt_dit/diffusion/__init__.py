"""ttt_dit.diffusion."""
