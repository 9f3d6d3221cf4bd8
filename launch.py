"""Start the web UI: `python launch.py [--port N] [--listen] ...` (see `--help`).

Flags, engine construction and Gradio launch live in `webui/cli.py`; importing this file
starts nothing.
"""

import sys


def main(argv=None) -> int:
    from webui.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
