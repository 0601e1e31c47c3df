"""Judging generations: length/EOS/repetition metrics, win rates and the exact judge of the counting task."""
