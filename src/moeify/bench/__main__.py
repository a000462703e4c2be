"""`python -m moeify.bench --peak PATH ...`: the peak-memory child process of `moeify bench` (moeify.bench.memory)."""

import sys

from .memory import peak_main

if __name__ == "__main__":
    peak_main(sys.argv[1:])
