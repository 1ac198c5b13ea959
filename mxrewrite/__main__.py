import sys

from mxrewrite.cli import main

sys.exit(main())
