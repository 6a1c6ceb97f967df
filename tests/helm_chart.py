"""The Helm chart through helm-python-sdk (Helm's library; no helm binary, no cluster), for
tests/chart.rs. Usage: helm_chart.py render|lint|validate CHART_DIR [VALUES_JSON NAME NAMESPACE].
Prints JSON on stdout; a refused or failed call exits 1 with Helm's message on stderr."""
import json
import sys

import helm_python


def main():
    cmd, chart = sys.argv[1], sys.argv[2]
    values = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        if cmd == "render":
            out = helm_python.Chart.load(chart).render(
                values, name=sys.argv[4], namespace=sys.argv[5], is_install=True
            )
        elif cmd == "lint":
            out = helm_python.lint(chart, values, strict=True)
        elif cmd == "validate":
            helm_python.Chart.load(chart).validate_schema(values)
            out = {}
        else:
            raise SystemExit(f"unknown command {cmd}")
    except helm_python.HelmError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    json.dump(out, sys.stdout)


main()
