"""`python -m zerokit <command>`, e.g. `torchrun --nproc_per_node 2 -m zerokit train pretrain_gpt ...`."""
from zerokit.cli import main

raise SystemExit(main())
