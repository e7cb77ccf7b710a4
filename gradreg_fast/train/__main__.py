import sys

from . import cli_main

raise SystemExit(cli_main(sys.argv[1:]))
