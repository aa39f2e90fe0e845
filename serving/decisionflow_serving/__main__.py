"""Run the gateway under plain uvicorn (no Ray): ``python -m decisionflow_serving --port 8081``.

One model version in-process (:class:`~decisionflow_serving.models.LocalModelBackend`): ``--model-version`` or,
without it, the version behind ``--model-alias`` (``champion``) at start. Every other setting comes from
``DECISIONFLOW_GATEWAY_*`` variables (see :mod:`decisionflow_serving.settings`) or the flags below.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from decisionflow_serving.settings import GatewaySettings

    parser = argparse.ArgumentParser(prog="python -m decisionflow_serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="listen port")
    parser.add_argument("--log-level", default="warning")
    for name in GatewaySettings.field_names():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None,
                            help=f"gateway setting {name} (env DECISIONFLOW_GATEWAY_{name.upper()})")
    return parser


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from decisionflow_serving.app import create_app
    from decisionflow_serving.models import LocalModelBackend
    from decisionflow_serving.settings import GatewaySettings

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    overrides = {name: getattr(args, name) for name in GatewaySettings.field_names()}
    settings = GatewaySettings.from_env(**overrides)
    backend = LocalModelBackend(settings.mlflow_uri, settings.model_name, settings.model_version,
                                alias=settings.model_alias, load=False)
    try:
        backend.load()
    except Exception as exc:  # noqa: BLE001 - serve anyway: /ready says 503 until a model is there
        print(f"decisionflow gateway: no model loaded ({exc}); /ready answers 503", file=sys.stderr)
    app = create_app(settings, backend)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
