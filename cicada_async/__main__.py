import sys

from cicada_async.cli import main

sys.exit(main())
