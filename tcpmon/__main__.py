import sys

from tcpmon.cli import main

sys.exit(main())
