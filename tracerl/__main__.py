"""``python -m tracerl`` (and ``torchrun ... -m tracerl``): the ``tracerl`` command."""

import sys

from tracerl.cli import main

sys.exit(main())
