"""`python -m benchmarks [...]`, and `python -m benchmarks --worker SPEC` for one worker process."""

import sys

from benchmarks.driver import main
from benchmarks.variants import worker

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(worker(sys.argv[2]))
sys.exit(main())
