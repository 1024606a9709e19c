"""Run every benchmark (or those named): ``python -m bench [--out bench-output] [name ...]``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import sys
from pathlib import Path

log = logging.getLogger("bench")


def discover() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench-output", help="folder for <name>.json results")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(discover())})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.names or discover()
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; available: {discover()}")
    failed = []
    for name in names:
        log.info("benchmark %s", name)
        module = importlib.import_module(f"bench.{name}")
        try:
            result = module.main()
        except Exception:
            log.exception("benchmark %s failed", name)
            failed.append(name)
            continue
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        sys.stdout.write(f"{name}: {json.dumps(result, sort_keys=True)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
