import sys

from qvd_bench.commands.main import main

sys.exit(main())
