"""Command line: ``python -m densenet_efficient {bench,plan,train,info}``.

A bad command line, or a dataset or checkpoint that cannot be used, ends
with one line on stderr naming what was expected and what was given, and
exit status 2."""

from . import bench, info, plan, train
from .arguments import CommandLineParser


def main(argv=None) -> None:
    parser = CommandLineParser(prog="python -m densenet_efficient")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser = commands.add_parser("bench", help="memory and step time of naive / checkpoint / efficient, with plots")
    bench.add_arguments(bench_parser)
    plan_parser = commands.add_parser("plan", help="predicted peak memory per mode and the largest batch that fits")
    plan.add_arguments(plan_parser)
    train_parser = commands.add_parser("train", help="train a DenseNet (the paper's CIFAR recipe); torchrun for DDP")
    train.add_arguments(train_parser)
    commands.add_parser("info", help="torch, the extension's build (CUDA kernels, architectures), devices, kernels")
    args = parser.parse_args(argv)
    if args.command == "bench":
        bench.run(args, bench_parser)
    elif args.command == "plan":
        plan.run(args)
    elif args.command == "info":
        info.run()
    else:
        try:
            train.run(args)
        except (train.TrainError, train.data.DataError) as error:
            train_parser.error(str(error))


if __name__ == "__main__":
    main()
