"""The demo, apart from the method: a synthetic data generator (``synthetic``), a CPU-sized plans configuration
(``small_configuration``) and the runner behind ``nnUNetv2_caml_demo`` (``run``). The tests and benchmarks use the
same pieces."""
