import sys

from trickbag.cli import main

sys.exit(main())
