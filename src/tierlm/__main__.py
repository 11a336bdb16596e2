import sys

from tierlm.cli import main

sys.exit(main())
