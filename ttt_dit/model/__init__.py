"""ttt_dit.model."""
