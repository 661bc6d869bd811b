import sys

from relay_operator.cli import main

sys.exit(main())
