"""Models: towers, heads, the dual encoder and the objective that sums the heads."""
