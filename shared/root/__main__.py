import sys

from mcpherd.cli import main

sys.exit(main())
