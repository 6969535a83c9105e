import sys

from claude_proxy.cli.main import main

sys.exit(main())
