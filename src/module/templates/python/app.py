"""{{id}}: a modrun plugin that greets whoever its parameters name, and logs
and reports its progress as it goes."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.exports.plugin import Info
from wit_world.imports import host
from wit_world.imports.host import Level

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "times": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "additionalProperties": False,
}


class Plugin(wit_world.exports.Plugin):
    def describe(self) -> Info:
        return Info(
            # The id must be the component's file name: {{id}}.wasm.
            id="{{id}}",
            name="{{title}}",
            version="0.1.0",
            description="Greets whoever its parameters name.",
            # modrun checks every start's parameters against this schema
            # before the plugin runs.
            parameters_schema=json.dumps(SCHEMA),
        )

    def run(self, parameters: str) -> str:
        """`raise Err(message)` fails the run with that message. Any other
        exception fails it with the exception's type and message, and its
        traceback goes into the run's log."""
        params = json.loads(parameters)
        name = params.get("name", "world")
        times = params.get("times", 1)
        if not name.strip():
            raise Err("name must not be blank")
        host.log(Level.INFO, f"greeting {name} {times} time(s)")
        greetings = []
        for done in range(1, times + 1):
            greetings.append(f"Hello, {name}!")
            host.progress(done / times, f"{done} of {times}")
        return json.dumps({"greeting": " ".join(greetings)})
