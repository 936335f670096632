"""ttt_dit.vae."""
