"""Entry point of the performance harness: ``python benchmarks/run.py [options]``.

Same as ``gradclip bench``; the benchmarks live in :mod:`gradclip.bench` so that the
installed command can run them too. A full run writes its section of benchmarks/RESULTS.md::

    python benchmarks/run.py                      # every benchmark, cuda when available
    python benchmarks/run.py --quick              # tiny sizes in seconds; writes nothing
    python benchmarks/run.py --device cpu --label "run 2" --only p1 p3
    python benchmarks/run.py --threads 1          # torch.set_num_threads first

Ratios are judged, never absolute times: see gradclip/bench/__init__.py for each row and its target.
"""

import sys

from gradclip.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
