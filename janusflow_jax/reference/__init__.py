"""PyTorch references, one per model, shared by the parity tests and `launch.bench torch` (they need torch; nothing in
the runtime package imports them)."""
