"""Pure arithmetic shared across layers: moments, histogram grids, quantization grids."""
