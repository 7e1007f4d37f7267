"""``qvd-bench models``: the model zoo, or the layer roles of one model."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="list the model zoo, or the layer roles of a model"
    )
    parser.add_argument(
        "--roles", metavar="MODEL", help="print every layer's role and how it was decided"
    )
    parser.add_argument(
        "--detect",
        action="store_true",
        help="with --roles: detect roles by probe forwards instead of the table",
    )


def run(args: argparse.Namespace) -> int:
    from qvd_bench.models import roles, zoo

    if args.roles:
        loaded = zoo.load_model(args.roles)
        print(roles.format_roles(roles.classify(loaded, detect=args.detect)))
        return 0
    rows = zoo.list_models()
    width = max(len(r.name) for r in rows)
    print(f"{'name':<{width}}  {'parameters':>14}  {'weights':<7}  {'denoiser':<36}  description")
    for r in rows:
        weights = "trained" if r.trained else "random"
        print(
            f"{r.name:<{width}}  {r.parameters:>14,}  {weights:<7}  {r.denoiser_class:<36}  "
            f"{r.description}"
        )
    return 0
