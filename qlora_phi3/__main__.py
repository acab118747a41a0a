"""``python -m qlora_phi3`` (and ``accelerate launch -m qlora_phi3``) runs the CLI."""

import sys

from qlora_phi3.cli import main

sys.exit(main())
