"""The lab: measuring, estimating and planning runs (memory, planner, verify, memtest, bench).
It is built on the training core (`zerokit.*`) and the core never imports it."""
