"""``python -m gradclip.bench [options]``: the same as ``gradclip bench``."""

import sys

from gradclip.bench import main

sys.exit(main(sys.argv[1:]))
