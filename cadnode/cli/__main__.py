import sys

from cadnode.cli import main

sys.exit(main())
