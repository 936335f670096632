"""TTT inner loops (pure functions) and the TTT layer module."""

from ttt_dit.ttt.inner_loop import (TTTDiagnostics, ttt_linear, ttt_linear_reference, ttt_mlp,
                                    ttt_mlp_reference, ttt_mlp_with_state)
from ttt_dit.ttt.layer import SSM, Gate, TTTLayer, bidirectional_ttt, reverse_sequence
from ttt_dit.ttt.multiscene import SequenceMetadata

__all__ = [
    "TTTDiagnostics", "ttt_linear", "ttt_linear_reference", "ttt_mlp", "ttt_mlp_reference",
    "ttt_mlp_with_state", "SSM", "Gate", "TTTLayer", "bidirectional_ttt", "reverse_sequence",
    "SequenceMetadata",
]
