"""``python -m fakehub --repos DIR --port N``: serve a repos folder on 127.0.0.1."""

from __future__ import annotations

import argparse
from pathlib import Path

from fakehub.samples import make_samples, move_main
from fakehub.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fakehub", description=__doc__)
    parser.add_argument("--repos", type=Path, required=True, help="folder of repos to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only)")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--token", action="append", default=[], help="a valid token (repeatable)")
    parser.add_argument(
        "--gated-access", action="append", default=[], help="a token with access to gated repos"
    )
    parser.add_argument(
        "--xet", action="store_true", help="serve LFS files through Xet, as the Hub does today"
    )
    parser.add_argument(
        "--samples", action="store_true", help="create the demo sample repos in --repos first"
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=0,
        help="send each response body of file content at most this many bytes per second (a"
        " capped link: every connection is capped, as a CDN does)",
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds every request waits first"
    )
    parser.add_argument(
        "--uplink",
        type=int,
        default=0,
        help="all response bodies of file content together at most this many bytes per second"
        " (the hub's uplink, shared by all its clients)",
    )
    parser.add_argument(
        "--send-buffer",
        type=int,
        default=None,
        help="each connection's kernel send buffer in bytes (SO_SNDBUF; default: the kernel's,"
        " up to 4 MiB): small, the bytes counted as served are those the link carried",
    )
    parser.add_argument(
        "--move",
        metavar="REPO",
        help="add a commit to REPO's main branch (new weights and config) and exit: a release a"
        " running hub serves at once",
    )
    args = parser.parse_args(argv)
    if args.move:
        try:
            print(f"{args.move} main is now {move_main(args.repos, args.move)}", flush=True)
        except KeyError as error:
            parser.error(str(error.args[0]))
        return
    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        parser.error("--host must be a loopback address")
    if args.samples:
        for repo_id, commit in make_samples(args.repos).items():
            print(f"sample repo {repo_id} at {commit}", flush=True)
    serve(
        args.repos,
        args.host,
        args.port,
        set(args.token),
        set(args.gated_access),
        args.xet,
        rate=args.rate,
        latency=args.latency,
        send_buffer=args.send_buffer,
        uplink=args.uplink,
    )


if __name__ == "__main__":
    main()
