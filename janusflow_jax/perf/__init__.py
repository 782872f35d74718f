"""Performance: FLOP counting, the chip table, ahead-of-time compilation for TPU/GPU targets, the roofline of a
compiled program, the profiler summary, the benchmarks and their PyTorch baselines."""
