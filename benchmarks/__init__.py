"""Benchmarks of t3d-kernels: the shared harness (:mod:`benchmarks.harness`), one file per op
(``bench_ttl.py``, ``bench_dense_block.py``, ``bench_model.py``) and the ``t3d-bench`` command
(``python -m benchmarks``). See docs/benchmarks.md."""
