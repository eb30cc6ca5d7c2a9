"""hello_py: the Python twin of the bundled `hello` plugin, with two more
parameters for the tests: `fail` raises an uncaught exception, `spin` loops
without end (for timeouts and cancels)."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.exports.plugin import Info
from wit_world.imports import host
from wit_world.imports.host import Level

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "times": {"type": "integer", "minimum": 1, "maximum": 10},
        "fail": {"type": "string"},
        "spin": {"type": "boolean"},
    },
    "additionalProperties": False,
}


def check_ledger(entry: str) -> None:
    raise ValueError(f"the ledger has no entry {entry!r}")


class Plugin(wit_world.exports.Plugin):
    def describe(self) -> Info:
        return Info(
            id="hello_py",
            name="Hello (Python)",
            version="0.1.0",
            description="Greets whoever its parameters name, in Python.",
            parameters_schema=json.dumps(SCHEMA),
        )

    def run(self, parameters: str) -> str:
        params = json.loads(parameters)
        name = params.get("name", "world")
        times = params.get("times", 1)
        if not name.strip():
            raise Err("name must not be blank")
        if "fail" in params:
            check_ledger(params["fail"])
        if params.get("spin"):
            while True:
                pass
        host.log(Level.INFO, f"greeting {name}")
        greetings = []
        for done in range(1, times + 1):
            greetings.append(f"Hello, {name}!")
            host.progress(done / times, f"{done} of {times}")
        print(f"said hello {times} time(s)")
        return json.dumps({"greeting": " ".join(greetings)})
