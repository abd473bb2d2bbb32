"""``python -m recon``: the same command line as ``recon`` and ``launch.py``."""

from recon.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
