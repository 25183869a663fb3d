"""Serving thrifty on more than one machine.

`thrifty.deploy.ray` serves thrifty replicas behind Ray Serve's HTTP proxy, with autoscaling and a
cost ledger across replicas (docs/ray.md). It imports Ray; this module does not, so the CLI can
offer the flags below without Ray installed.
"""

from __future__ import annotations

import argparse


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """`thrifty serve --ray ...`: the flags of thrifty.deploy.ray.run_from_cli. Defaults are None
    here so that thrifty.deploy.ray.DeploymentOptions owns them (one place)."""
    g = p.add_argument_group("ray serve (with --ray)")
    g.add_argument("--ray", action="store_true",
                   help="serve replicas of this engine behind Ray Serve's HTTP proxy on --host/--port, "
                        "autoscaled between --min-replicas and --max-replicas (docs/ray.md)")
    g.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join ('auto', or HOST:PORT); default: RAY_ADDRESS, else a local "
                        "Ray started here and stopped on exit")
    g.add_argument("--ray-app-name", default=None,
                   help="the Serve application's name (default: default, as `serve run`)")
    g.add_argument("--min-replicas", type=int, default=None, help="default 1")
    g.add_argument("--max-replicas", type=int, default=None, help="default 2")
    g.add_argument("--initial-replicas", type=int, default=None, help="default: --min-replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="requests in flight per replica that autoscaling aims for: the concurrency at which "
                        "one replica meets the SLO (`thrifty cost plan`); default 16")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests in flight per replica beyond which the proxy queues them; default 64")
    g.add_argument("--upscale-delay-s", type=float, default=None, help="default 30")
    g.add_argument("--downscale-delay-s", type=float, default=None, help="default 600")
    g.add_argument("--look-back-period-s", type=float, default=None,
                   help="window the ongoing requests are averaged over; default 30")
    g.add_argument("--num-cpus-per-replica", type=float, default=None,
                   help="Ray CPUs each replica reserves (also its torch threads unless --num-threads); default 1")
    g.add_argument("--num-gpus-per-replica", type=float, default=None, help="default 0")
    g.add_argument("--cost-report-interval-s", type=float, default=None,
                   help="how often each replica reports its cost to the ledger; default 5")
    # Flags that mean nothing without --ray: given alone, they are an error rather than ignored.
    p.set_defaults(ray_only_flags=tuple(a.option_strings[0] for a in g._group_actions if a.dest != "ray"))


def check_ray_flags(args: argparse.Namespace) -> None:
    if getattr(args, "ray", False):
        return
    given = [flag for flag in getattr(args, "ray_only_flags", ())
             if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --ray (Ray Serve); plain `thrifty serve` runs one replica")
