"""What the tests, the experiment and the benchmarks share; not part of the installed package."""
