"""The Helm chart through helm-python-sdk (Helm's library; no helm binary, no cluster), for
tests/chart.rs. Usage: helm_chart.py render|lint|validate CHART_DIR [VALUES_JSON NAME NAMESPACE].
Prints JSON on stdout; a refused or failed call exits 1 with Helm's message on stderr.
`helm_chart.py batch CHART_DIR` reads a JSON list of [CMD, VALUES, NAME?, NAMESPACE?] on stdin
and prints a list of {"ok": output} or {"err": message}: one interpreter (and one load of Helm's
library, the slow part) for many calls."""
import json
import sys

import helm_python


def call(cmd, chart, values, release):
    if cmd == "render":
        return helm_python.Chart.load(chart).render(
            values, name=release[0], namespace=release[1], is_install=True
        )
    if cmd == "lint":
        return helm_python.lint(chart, values, strict=True)
    if cmd == "validate":
        helm_python.Chart.load(chart).validate_schema(values)
        return {}
    raise SystemExit(f"unknown command {cmd}")


def main():
    cmd, chart = sys.argv[1], sys.argv[2]
    if cmd == "batch":
        answers = []
        for c, values, *release in json.load(sys.stdin):
            try:
                answers.append({"ok": call(c, chart, values, release)})
            except helm_python.HelmError as e:
                answers.append({"err": f"{type(e).__name__}: {e}"})
        json.dump(answers, sys.stdout)
        return
    values = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        out = call(cmd, chart, values, sys.argv[4:])
    except helm_python.HelmError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    json.dump(out, sys.stdout)


main()
