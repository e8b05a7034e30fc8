import sys

from chatsessions.cli import main

sys.exit(main())
