// hello_js: the JavaScript twin of the bundled `hello` plugin, with two more
// parameters for the tests: `fail` throws an Error, `spin` loops without end
// (for timeouts and cancels).

import { log, progress } from 'modrun:plugin/host@0.1.0';

const SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', minLength: 1, maxLength: 200 },
    times: { type: 'integer', minimum: 1, maximum: 10 },
    fail: { type: 'string' },
    spin: { type: 'boolean' },
  },
  additionalProperties: false,
};

function checkLedger(entry) {
  throw new TypeError(`the ledger has no entry "${entry}"`);
}

export const plugin = {
  describe() {
    return {
      id: 'hello_js',
      name: 'Hello (JavaScript)',
      version: '0.1.0',
      description: 'Greets whoever its parameters name, in JavaScript.',
      parametersSchema: JSON.stringify(SCHEMA),
    };
  },

  run(parameters) {
    const { name = 'world', times = 1, fail, spin } = JSON.parse(parameters);
    if (name.trim() === '') {
      throw 'name must not be blank';
    }
    if (fail !== undefined) {
      checkLedger(fail);
    }
    if (spin) {
      for (;;) {}
    }
    log('info', `greeting ${name}`);
    const greetings = [];
    for (let done = 1; done <= times; done++) {
      greetings.push(`Hello, ${name}!`);
      progress(done / times, `${done} of ${times}`);
    }
    console.log(`said hello ${times} time(s)`);
    return JSON.stringify({ greeting: greetings.join(' ') });
  },
};
