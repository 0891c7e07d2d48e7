import sys

from twodrl.cli import main

sys.exit(main())
