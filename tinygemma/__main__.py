"""``python -m tinygemma`` is the ``tinygemma`` command."""

from .cli import run

run()
