"""``python -m tinygemma`` is the ``tinygemma`` command."""

import sys

from .cli import main

sys.exit(main())
