"""Stage 2, the model: the NF4 base and LoRA (base), weight sources and the layer-wise loader (loader),
built-in models (builtin), fused fast paths (fastpath), merging an adapter into 16 bits (merge)."""
