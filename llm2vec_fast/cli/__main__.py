"""``python -m llm2vec_fast.cli`` (what ``torchrun ... -m llm2vec_fast.cli encode-dataset`` runs)."""

import sys

from . import main

sys.exit(main())
