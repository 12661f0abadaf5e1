"""Command line: ``python -m densenet_efficient {bench,plan}``."""

import argparse

from . import bench, plan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m densenet_efficient")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser = commands.add_parser("bench", help="memory and step time of naive / checkpoint / efficient, with plots")
    bench.add_arguments(bench_parser)
    plan_parser = commands.add_parser("plan", help="predicted peak memory per mode and the largest batch that fits")
    plan.add_arguments(plan_parser)
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench.run(args, bench_parser)
    else:
        plan.run(args)


if __name__ == "__main__":
    main()
