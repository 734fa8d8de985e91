"""Parses the command line once, after every extension's preload.py has added its flags."""
import os
import shlex
import sys

from modules import cmd_args, extensions_preload

parser = cmd_args.parser
extensions_preload.preload_extensions(parser)

# Under pytest the test runner owns sys.argv; tests pass flags through SD_WEBUI_ARGS instead.
_argv = sys.argv[1:] if "pytest" not in sys.modules else shlex.split(os.environ.get("SD_WEBUI_ARGS", ""))
cmd_opts, _unknown = parser.parse_known_args(_argv)
