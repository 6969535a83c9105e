import sys

from claude_proxy.cli import main

sys.exit(main())
