"""ttt_dit.data."""
