import sys

from fxpress.cli import main

sys.exit(main())
