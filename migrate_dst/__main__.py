import sys

from migrate_dst.cli import main

sys.exit(main())
