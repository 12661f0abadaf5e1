"""Command line: ``python -m densenet_efficient demo``."""

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m densenet_efficient")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="memory and step time of naive vs checkpoint vs efficient on CPU")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo

        demo.run()


if __name__ == "__main__":
    main()
