"""``python -m polybridge.cli`` (what ``accelerate launch -m polybridge.cli train ...`` runs)."""

import sys

from polybridge.cli import main

sys.exit(main())
