import sys

from vajra.cli import main

sys.exit(main())
