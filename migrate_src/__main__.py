import sys

from migrate_src.cli import main

sys.exit(main())
