#!/usr/bin/env python3
"""Data benchmark (same as `audioclr bench data`): each back end's clips/s next to the decode limit."""

import sys

from trainer.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
