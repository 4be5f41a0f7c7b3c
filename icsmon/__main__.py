import sys

from icsmon.cli import main

sys.exit(main())
