"""Pure arithmetic shared across layers: moments, histogram edges, quantization grids."""
