"""Load generators and benchmarks (``parley bench ...``); never part of the test suite."""
