#!/usr/bin/env python
"""recon's command line: `python launch.py --help` lists every flag with examples."""

import sys

from recon.cli import main

if __name__ == "__main__":
    sys.exit(main())
