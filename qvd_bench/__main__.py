import sys

from qvd_bench.cli import main

sys.exit(main())
