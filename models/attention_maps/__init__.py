"""Where prompt words attend during sampling: cross-attention maps reduced on the fly. Plain torch.

``words`` finds a word's token positions in a tokenized prompt; ``layers`` names the layer sets a map
averages over; ``record`` holds the running sums (one per layer grid, never one per step) and turns
them into maps; ``recorder`` is the per-call attention patch that computes the words' probabilities
explicitly on the chosen layers; ``render`` draws heat maps and measures the share inside face boxes.
The method is in docs/METHOD.md (attention maps).
"""
