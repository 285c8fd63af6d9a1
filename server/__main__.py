"""``python -m jaxpaged.server MODEL ...``: the same as ``jaxpaged serve``."""

from __future__ import annotations

import argparse
import sys

from jaxpaged.distributed.ray_import import RayNotInstalledError

from jaxpaged.server.args import add_server_arguments
from jaxpaged.server.config_file import apply_config_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxpaged.server",
                                     description="OpenAI-compatible jaxpaged server")
    add_server_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    from jaxpaged.server.launch import run_server
    try:
        return run_server(args)
    except (ValueError, RayNotInstalledError) as e:
        print(f"jaxpaged serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
