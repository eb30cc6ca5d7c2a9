// {{id}}: a modrun plugin that greets whoever its parameters name, and logs
// and reports its progress as it goes.

import { log, progress } from 'modrun:plugin/host@0.1.0';

const SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', minLength: 1, maxLength: 100 },
    times: { type: 'integer', minimum: 1, maximum: 5 },
  },
  additionalProperties: false,
};

export const plugin = {
  describe() {
    return {
      // The id must be the component's file name: {{id}}.wasm.
      id: '{{id}}',
      name: '{{title}}',
      version: '0.1.0',
      description: 'Greets whoever its parameters name.',
      // modrun checks every start's parameters against this schema before
      // the plugin runs.
      parametersSchema: JSON.stringify(SCHEMA),
    };
  },

  // Throwing a string fails the run with that message. Throwing an Error
  // fails it with the error's name and message, and its stack goes into the
  // run's log.
  run(parameters) {
    const { name = 'world', times = 1 } = JSON.parse(parameters);
    if (name.trim() === '') {
      throw new RangeError('name must not be blank');
    }
    log('info', `greeting ${name} ${times} time(s)`);
    const greetings = [];
    for (let done = 1; done <= times; done++) {
      greetings.push(`Hello, ${name}!`);
      progress(done / times, `${done} of ${times}`);
    }
    return JSON.stringify({ greeting: greetings.join(' ') });
  },
};
