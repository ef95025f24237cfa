import sys

from rntp.cli import main

sys.exit(main())
