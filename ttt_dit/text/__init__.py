"""ttt_dit.text."""
