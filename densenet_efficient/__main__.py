"""Command line: ``python -m densenet_efficient {bench,plan,train}``."""

import argparse
import sys

from . import bench, plan, train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m densenet_efficient")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser = commands.add_parser("bench", help="memory and step time of naive / checkpoint / efficient, with plots")
    bench.add_arguments(bench_parser)
    plan_parser = commands.add_parser("plan", help="predicted peak memory per mode and the largest batch that fits")
    plan.add_arguments(plan_parser)
    train_parser = commands.add_parser("train", help="train a DenseNet (the paper's CIFAR recipe); torchrun for DDP")
    train.add_arguments(train_parser)
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench.run(args, bench_parser)
    elif args.command == "plan":
        plan.run(args)
    else:
        try:
            train.run(args)
        except (train.TrainError, train.data.DataError) as error:
            sys.exit(f"train: {error}")


if __name__ == "__main__":
    main()
