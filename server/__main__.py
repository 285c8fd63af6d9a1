"""``python -m jaxpaged.server --model DIR ...``: the same as ``jaxpaged serve``."""

from __future__ import annotations

import argparse
import sys

from jaxpaged.server.args import add_server_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxpaged.server",
                                     description="OpenAI-compatible jaxpaged server")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    from jaxpaged.server.launch import run_server
    try:
        return run_server(args)
    except ValueError as e:
        print(f"jaxpaged serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
