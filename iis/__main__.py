import sys

from iis.cli import main

sys.exit(main())
