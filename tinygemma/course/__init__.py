"""The course's hands-on part: checkers for the chapters' "your turn" cells.

    from tinygemma.course import check
    check.rms_norm(my_rms_norm)      # truthy when it matches layers.rms_norm; .message says why not
    check.solution("rms_norm")       # prints a solution, when the student asks for one

``solutions`` finds the solution files (``notebooks/solutions/``) and swaps a stub cell for its
solution; ``tests/test_solutions.py`` uses it to run every chapter solved.
"""

from . import check, solutions

__all__ = ["check", "solutions"]
