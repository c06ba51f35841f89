"""Entry point of the performance harness: ``python benchmarks/run.py [--quick]``.

Same as ``gradclip bench``; the harness itself lives in :mod:`gradclip.bench` so that the
installed command can run it too. Results go to benchmarks/RESULTS.md.
"""

import sys

from gradclip.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
