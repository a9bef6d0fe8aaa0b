"""`python -m lorakit ...` (and `torchrun -m lorakit train ...`): the lorakit command line."""
from .cli import main

raise SystemExit(main())
