import sys

from migrate_ctl.cli import main

sys.exit(main())
