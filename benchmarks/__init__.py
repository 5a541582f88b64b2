"""Benchmarks of lightning-comhe: each module runs as ``python -m benchmarks.<name>``.

* ``kernel``: the library's penalty vs a naive port (Python loops, the 2N×2N half-space matrix), equal values.
* ``floor``: every variant's penalty vs its unavoidable GEMM FLOPs at the matmul rate measured in the same run.
* ``overhead``: training-step time with each variant vs without (plain PyTorch loop, and Lightning when available).
* ``scale``: time and peak memory of one set of N neurons, N = 256 … 65,536 (a fresh process per size).
* ``memory``: peak memory of training with each variant vs without (a fresh process per configuration).
* ``compiled``: the eager fused kernel vs its ``torch.compile`` path.
* ``gpu``: the prepared device check (CUDA correctness vs CPU, bf16, batch 256); ``run_all`` runs everything and
  regenerates ``docs/benchmarks.md``.

Every module takes ``--quick`` (tiny sizes, for the smoke test), writes JSON, a Markdown table and a PNG plot to
``benchmarks/results/`` (or ``--out``), measures ratios within one run and reports medians over repeats.
"""
