"""ttt_dit.train."""
