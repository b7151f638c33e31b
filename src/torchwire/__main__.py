import sys

from torchwire.cli import main

sys.exit(main())
