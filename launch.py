"""Start the web UI: `python launch.py [--port N] [--listen] ...` (see `--help`).

Flags, engine construction and Gradio launch live in `webui/cli.py`; importing this file
starts nothing (and imports neither torch nor Gradio).
"""

import sys

from webui.cli import main as run


def main(argv=None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
