import sys

from pocketformer.cli import main

sys.exit(main())
