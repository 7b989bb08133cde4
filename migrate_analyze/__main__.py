import sys

from migrate_analyze.cli import main

sys.exit(main())
