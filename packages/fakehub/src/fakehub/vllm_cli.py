"""A stand-in vLLM server from the command line (``fakehub.vllm``), for demos."""

from __future__ import annotations

from fakehub.vllm import FakeVllm


def main(argv: list[str] | None = None) -> None:
    """``python -m fakehub.vllm_cli --port 8001 org/model [name=/path/to/snapshot]...``: stand in for
    a vLLM server serving those models (a bare root is served under its own name)."""
    import argparse

    parser = argparse.ArgumentParser(prog="fakehub.vllm_cli", description=main.__doc__)
    parser.add_argument("models", nargs="*", help="ROOT, or NAME=ROOT (a repo id or a path)")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--api-key", default=None, help="answer 401 without this bearer key")
    args = parser.parse_args(argv)
    models: list[tuple[str, str | None]] = []
    for spec in args.models:
        name, _, root = spec.partition("=")
        models.append((name, root) if root else (spec, spec))
    server = FakeVllm(models, api_key=args.api_key, port=args.port)
    print(f"stand-in vLLM at {server.url} serving {models}", flush=True)
    server.serve_until_interrupted()


if __name__ == "__main__":
    main()
