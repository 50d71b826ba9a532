"""Speed, memory and behaviour benchmarks; run each from the project root as a module: python -m benchmarks.<name>."""
