import sys

from forseti.cli import main

sys.exit(main())
