"""``python -m benchmarks`` (from a checkout) / ``python -m t3d_benchmarks`` (installed): the ``t3d-bench`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
