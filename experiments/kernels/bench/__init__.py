"""Low-precision matmul kernels against XLA's bf16 matmul, over real layer shapes and token counts.

**What is timed.** For every layer shape ``(K, N)`` (Llama-2-7B and Llama-3-70B projections) and
every token count ``M`` of the sweep, ``y = x @ W`` with ``x`` of shape ``(M, K)`` by:

* ``bf16``: XLA's ``jnp.dot`` of bf16 ``x`` and bf16 ``W`` (bf16 output, default precision), the
  baseline every speedup divides;
* ``w4a16``: bf16 ``x``, 4-bit ``W`` packed two per byte, symmetric, one scale per group of 128
  rows of ``W`` (``qjax.kernels.w4a16``);
* ``w4a16-swap``: the same with ``swap_ab=True`` (experimental,
  ``qjax.kernels.experimental.w4a16_variants``): each tile computed as ``(w^T x^T)^T``, so the
  dequantized weight is the dot's left operand (Hopper's ``wgmma`` can take it from registers) and
  the small M the narrow side (GPU and interpreter only);
* ``w8a8``: ``x`` already int8 with one f32 scale per token, int8 ``W`` with one f32 scale per
  output column (``qjax.kernels.w8a8``);
* ``w8a8+quant``: the same matmul preceded by ``quantize_per_token`` of the bf16 ``x``
  (``qjax.kernels.act_quant``): a layer's cost with dynamic per-token activations quantized by
  that kernel (served ``qjax.nn`` models quantize activations with ``qjax.quantize``, which XLA
  fuses; that is not this row);
* ``fp8``: ``x`` and ``W`` in float8_e4m3fn, per-token and per-column f32 scales
  (``qjax.kernels.fp8``);
* ``w8a8-nk``, ``fp8-nk``: the ``w8a8`` and ``fp8`` kernels with ``W`` stored ``(N, K)``
  (experimental, ``qjax.kernels.experimental.nk_layout``; transposed once outside the timing): the
  K-major operand that Hopper's 8-bit ``wgmma`` reads, which Triton otherwise replaces by older
  instructions;
* ``w8a8-mgpu``, ``fp8-mgpu``: the ``w8a8`` and ``fp8`` matmuls on the experimental Hopper kernels
  (``qjax.kernels.experimental.hopper``: Pallas on Mosaic GPU, TMA and ``wgmma``), ``W`` stored
  ``(N, K)`` by ``prepare_weight`` once, outside the timing, as ``w4a16``'s packing is; run with
  ``--backend gpu`` only (listed as skipped otherwise);
* ``w4a16-mgpu``: the ``w4a16`` matmul on the experimental Hopper kernel for small M
  (``qjax.kernels.experimental.hopper_w4``: the int4 weight ``(N, K)`` as ``wgmma``'s register
  operand, ``prepare_w4`` once), M <= 128 only, ``--backend gpu`` only;
* ``w8a8-split1``, ``fp8-split1``: the ``w8a8`` and ``fp8`` kernels with K in one range
  (``split_k=1``), at M <= 16 only: beside ``w8a8`` / ``fp8``, which split K there when the grid
  is too small to fill the GPU, they show what the split gains or costs;
* ``w8a8-xla``, ``fp8-xla``: the operands of ``w8a8`` and ``fp8`` through XLA's native int8 / fp8
  dot: ``qjax.kernels.xla.contract`` (int8 x int8 -> int32, or e4m3 x e4m3 -> f32, then times the
  outer product of the scales, float32), cast to bf16; what serving with ``kernels="xla"`` runs.
  XLA on every backend (on a GPU XLA hands the dot to cuBLAS where it can).

Data is random (uniform floats and integer codes; not zeros, which make GPU matmuls faster). On
a GPU (TPU) the Pallas kernels run with ``backend="gpu"`` (``"tpu"``). On CPU the default backend is
``reference``: each kernel's ``*_reference`` function compiled by XLA, labelled as such in every
output; it measures XLA on CPU, not the kernels. The ``-xla`` rows are XLA on every backend.
``--interpret`` runs the real Pallas kernels in the Pallas interpreter on tiny shapes (a smoke test
of the kernels; the times mean nothing).

**Method: whole programs over rotating weights, device time.** For each (kernel, shape, M) one
jitted program applies the kernel to ``R`` distinct random weight copies, passed as separate
arguments so that neither XLA's CSE nor the L2 cache can reuse one copy for another: ``R`` is chosen
so that the copies together exceed the L2 cache (``R * weight_bytes >= COPY_TARGET_BYTES``, 4x the
50 MB L2 of an H100), with ``2 <= R <= MAX_COPIES`` and at most ``MAX_PROGRAM_WEIGHT_BYTES`` (4 GiB)
of weights per program. The kernel is wrapped in its own ``jax.jit``, so it is traced and lowered
once per program, not ``R`` times. The activations of each copy pass through an
``optimization_barrier`` tied to the copy index, so the ``R`` quantizations of the same ``x`` in
``w8a8+quant`` are not merged into one; the ``R`` outputs go through an ``optimization_barrier``
(XLA can neither drop nor shrink a matmul) and the program returns the sum of one element of each.

Per (shape, M), the programs of all kernels are lowered, then compiled ahead of time (the XLA
programs, the bf16 baseline and the ``-xla`` rows, one at a time, since XLA autotunes its dots by
timing candidates on the device; the Pallas programs on ``--compile-workers`` threads), then timed
one after another, so compilation never overlaps a measurement and is excluded from it (its time is
recorded). The clock (``--clock``,
:mod:`experiments.kernels.timing`): on a GPU, **device time**, the summed durations of the program's
kernels from CUPTI activity records (device timestamps), one warm-up execution, then one sample per
execution (``n = --repeats``); every kernel of the program counts, the program's final reduction
included, and each cell lists its kernels by name, launches and time. Elsewhere (or with ``--clock
wall``, or where CUPTI fails, which the results then say) the **wall clock**: ``time.perf_counter``
around ``jax.block_until_ready``, a sample launching the program ``L`` times back to back (so that
host dispatch overlaps device work), ``n >= 3`` samples within about 0.4 s; wall times include the
launch gaps between kernels. Per-call time = sample time / (``L * R``); the reported time is the
median over the samples, ``spread`` their interquartile range over the median. Weights of a shape
are generated (and packed) once and reused for every M; activations are generated once at the
largest M and sliced; device buffers are deleted before the next shape. Results are written after
every shape, and the sweep stops before a (shape, M) group that would overrun ``--time-budget-s``.

**Accounting.** ``FLOPs = 2 M K N`` (the quantization and scaling work is not counted).
Bytes moved per call, counting each operand once at its stored size:

* activations: bf16 ``x``: ``2 M K``; int8 / fp8 ``x`` plus its scales: ``M K + 4 M``;
  ``w8a8+quant`` adds the quantization pass: read bf16 ``x`` (``2 M K``), write and read back the
  int8 ``x`` and scales (``2 (M K + 4 M)``);
* weights, one copy at its packed size (measured as the ``nbytes`` of its arrays): bf16 ``2 K N``;
  int8 / fp8 ``K N + 4 N``; w4a16 ``K N / 2 + (K / g) N s`` (+ the same for zeros if asymmetric),
  ``g = 128``, ``s`` the itemsize of the stored scales;
* output: ``2 M N`` (bf16).

``TFLOP/s = FLOPs / t`` and ``GB/s = bytes / t``. Roofline time
``t_roof = max(bytes / peak_bw, FLOPs / peak_flops)`` with ``peak_flops`` of the arithmetic the
kernel does (bf16 for bf16 and the w4a16 rows, int8 for the w8a8 rows, fp8 for the fp8 rows), from
:data:`DEVICE_PEAKS` (dense, no sparsity); ``% of roofline = 100 t_roof / t``. Devices not in the
table (and CPUs) get ``-`` in the roofline column. ``speedup = t_bf16 / t_kernel`` at the same
(shape, M) in the same run. The **crossover M** of a (kernel, shape) is the smallest M of the sweep
with speedup < 1; ``none`` if the kernel beats bf16 at every measured M.

**Goals** (:mod:`experiments.kernels.goals`; GPU sweeps only): W4A16 at M <= 16 at least 3x bf16,
W8A8 and FP8 at M >= 1024 at least 1.5x, judged per shape on the fastest of the goal's Pallas rows
at each M, then with XLA's own int8 / fp8 dot counted, in a column apart. Printed before the
compact table, in the markdown and in the JSON (``goals``); ``python -m experiments.kernels.goals``
judges results files afterwards, several of one device pooled.

**Modules**: :mod:`~experiments.kernels.bench.rows` (the table of rows: weights, activations and
the function each times), :mod:`~experiments.kernels.bench.accounting` (bytes, FLOPs, roofline,
speedups), :mod:`~experiments.kernels.bench.data` (random weights and activations),
:mod:`~experiments.kernels.bench.programs` (building, compiling and timing one cell's program),
:mod:`~experiments.kernels.bench.sweep` (the sweep over shapes and M),
:mod:`~experiments.kernels.bench.render` (text, markdown, JSON) and
:mod:`~experiments.kernels.bench.cli` (the command line).

Run (GPU, the whole sweep; stops cleanly when ``--time-budget-s``, default 450 s, would be exceeded)::

    python -m experiments.kernels.bench --out runs/bench_kernels/results.json \\
        --md runs/bench_kernels/results.md

Smoke run: ``python -m experiments.kernels.bench --quick`` (on CPU: tiny shapes, reference path).
"""
