"""`python -m finetune ...` (and `torchrun -m finetune ...`): the same CLI as the `finetune` command."""

import sys

from finetune.cli import main

sys.exit(main())
