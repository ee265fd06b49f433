import sys

from calofm.cli import main

sys.exit(main())
