import sys

from maskar.cli import main

sys.exit(main())
