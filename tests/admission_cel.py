"""Evaluates a ValidatingAdmissionPolicy's CEL with cel-python, as the API server does, for
tests/admission.rs. Usage: admission_cel.py POLICY_YAML < cases.json, where each case is
{"request": ..., "object": ..., "oldObject": ...}. Prints, per case, "skipped" when a
matchCondition is false, else the list of the messages of the validations that fail (an error in
an expression counts as a failure, as with failurePolicy: Fail)."""
import json
import sys

import celpy
import yaml
from celpy import celtypes


def policy_spec(path):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ValidatingAdmissionPolicy":
            return doc["spec"]
    raise SystemExit(f"{path}: no ValidatingAdmissionPolicy")


def main():
    spec = policy_spec(sys.argv[1])
    env = celpy.Environment()
    compiled = lambda e: env.program(env.compile(e))
    conditions = [compiled(c["expression"]) for c in spec.get("matchConditions", [])]
    variables = [(v["name"], compiled(v["expression"])) for v in spec.get("variables", [])]
    validations = [(compiled(v["expression"]), v["message"]) for v in spec["validations"]]
    answers = []
    for case in json.load(sys.stdin):
        act = {k: celpy.json_to_cel(case.get(k)) for k in ("request", "object", "oldObject")}
        if not all(c.evaluate(act) == celtypes.BoolType(True) for c in conditions):
            answers.append("skipped")
            continue
        values = {}
        for name, prog in variables:
            act["variables"] = celtypes.MapType(values)
            values[celtypes.StringType(name)] = prog.evaluate(act)
        act["variables"] = celtypes.MapType(values)
        failed = []
        for prog, message in validations:
            try:
                ok = prog.evaluate(act)
            except Exception as e:  # an evaluation error denies (failurePolicy: Fail)
                ok = f"error: {e}"
            if ok != celtypes.BoolType(True):
                failed.append(message if ok == celtypes.BoolType(False) else f"{message} ({ok})")
        answers.append(failed)
    json.dump(answers, sys.stdout)


main()
