"""The lab: measuring, estimating and planning runs (measure, probe, zero_formula, estimate, planner,
verify, memtest, bench; build, flags, workers are their shared parts).
It is built on the training core (`zerokit.*`) and the core never imports it."""
