import sys

from datago.cli import main

sys.exit(main())
