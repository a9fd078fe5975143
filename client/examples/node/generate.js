#!/usr/bin/env node
// Streams labelled synthetic records from a condgen server and prints them as CSV lines
// `intent,text` on stdout; the closing Summary goes to stderr.
//
// The API is read at run time from the repository's protos/ folder (no generated code):
//   node generate.js --target 127.0.0.1:50051 --intent card_arrival --intent exchange_rate \
//       --num-records 3 --seed 1
// `node generate.js --help` lists every option.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_FILE = 'condgen/v1/generator.proto';
const DEFAULT_PROTOS = path.resolve(__dirname, '..', '..', '..', 'protos');
const DEFAULT_TARGET = '127.0.0.1:50051';

const USAGE = `usage: node generate.js --intent NAME [--intent NAME ...] [options]

Streams records for each intent from condgen.v1.Generator/Generate, prints them as CSV
lines "intent,text" on stdout and the summary on stderr.

connection:
  --target HOST:PORT          server address (env CONDGEN_TARGET, default ${DEFAULT_TARGET})
  --protos DIR                folder holding ${PROTO_FILE}
                              (env CONDGEN_PROTOS, default: the repository's protos/)
  --token TOKEN               send "authorization: Bearer TOKEN" (env CONDGEN_TOKEN)
  --request-id ID             send "x-request-id: ID"
  --tls                       use TLS (the system's root certificates unless --ca-cert)
  --ca-cert FILE              PEM file of the CA that signed the server's certificate (implies --tls)
  --timeout SECONDS           deadline of the whole call (default: none)

request:
  --intent NAME               an intent to generate records for (repeat for several)
  --num-records N             records wanted per intent (default 10)
  --seed N                    seed of the request's random generator (same seed, same records)
  --temperature T             softmax temperature, 0 for greedy decoding
  --top-p P                   nucleus sampling threshold, 0 < P <= 1
  --top-k K                   keep the K most likely tokens, 0 disables
  --max-new-tokens N          tokens per sequence in one prompt round
  --num-prompt-examples N     real examples put in each prompt
  --sequences-per-round N     sequences sampled in parallel from one prompt
  --max-rounds N              prompt rounds allowed per intent
  --min-fidelity F            drop records the label classifier scores below F (0..1)
  --require-predicted-intent  drop records the classifier assigns to another intent
  --allow-training-copies     keep records that copy a training text
  --allow-recent-duplicates   keep records the server streamed recently (the default with --seed)
  --avoid-recent-duplicates   drop records the server streamed recently (the default without --seed)
  --example INTENT=TEXT       a real example of INTENT sent with the request (repeat); the
                              server builds INTENT's prompts from these, so INTENT may be one the
                              model never saw (list it with --intent too)
  --label-check               have the served model check each line's label (server default: on)
  --no-label-check            skip the label check
  --label-margin M            nats per token by which the requested intent must beat its rivals

output:
  --header                    print the header line "intent,text" first
  -h, --help                  show this help

Exit status: 0 when the stream ended with its summary (a warning names intents that fell
short of --num-records), 1 on a gRPC error (its status code name and details go to stderr),
2 on a usage error.`;

class UsageError extends Error {}

const OPTIONS = {
  target: { type: 'string' },
  protos: { type: 'string' },
  token: { type: 'string' },
  'request-id': { type: 'string' },
  tls: { type: 'boolean' },
  'ca-cert': { type: 'string' },
  timeout: { type: 'string' },
  intent: { type: 'string', multiple: true },
  'num-records': { type: 'string' },
  seed: { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  'max-new-tokens': { type: 'string' },
  'num-prompt-examples': { type: 'string' },
  'sequences-per-round': { type: 'string' },
  'max-rounds': { type: 'string' },
  'min-fidelity': { type: 'string' },
  'require-predicted-intent': { type: 'boolean' },
  'allow-training-copies': { type: 'boolean' },
  'allow-recent-duplicates': { type: 'boolean' },
  'avoid-recent-duplicates': { type: 'boolean' },
  example: { type: 'string', multiple: true },
  'label-check': { type: 'boolean' },
  'no-label-check': { type: 'boolean' },
  'label-margin': { type: 'string' },
  header: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
};

function parseInteger(name, text, { min = 0, max = 0xffffffff } = {}) {
  if (text === undefined) return undefined;
  if (!/^\d+$/.test(text)) throw new UsageError(`--${name} takes a whole number >= ${min}, got "${text}"`);
  const value = Number(text);
  if (value < min || value > max) throw new UsageError(`--${name} must be between ${min} and ${max}, got ${text}`);
  return value;
}

function parseFloatOption(name, text) {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value)) throw new UsageError(`--${name} takes a number, got "${text}"`);
  return value;
}

function parseSeed(text) {
  if (text === undefined) return undefined;
  // uint64: passed on as a decimal string so that seeds above 2^53 keep every digit.
  if (!/^\d+$/.test(text) || BigInt(text) > 0xffffffffffffffffn) {
    throw new UsageError(`--seed takes a whole number between 0 and 2^64-1, got "${text}"`);
  }
  return text;
}

/** `--example INTENT=TEXT` options to IntentExamples messages, texts grouped by intent. */
function parseExamples(values) {
  const byIntent = new Map();
  for (const item of values || []) {
    const split = item.indexOf('=');
    if (split <= 0 || split === item.length - 1) {
      throw new UsageError(`--example takes INTENT=TEXT, got "${item}"`);
    }
    const intent = item.slice(0, split);
    if (!byIntent.has(intent)) byIntent.set(intent, []);
    byIntent.get(intent).push(item.slice(split + 1));
  }
  return [...byIntent].map(([intent, texts]) => ({ intent, texts }));
}

/** Command line to settings; throws UsageError on anything it cannot use. */
function parseCommandLine(argv, env) {
  let values;
  try {
    ({ values } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: false, strict: true }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  if (values.help) return { help: true };
  const intents = values.intent || [];
  if (intents.length === 0) throw new UsageError('give at least one --intent');

  const sampling = {};
  const setIf = (target, key, value) => { if (value !== undefined) target[key] = value; };
  setIf(sampling, 'temperature', parseFloatOption('temperature', values.temperature));
  setIf(sampling, 'top_p', parseFloatOption('top-p', values['top-p']));
  setIf(sampling, 'top_k', parseInteger('top-k', values['top-k']));
  setIf(sampling, 'seed', parseSeed(values.seed));
  setIf(sampling, 'max_new_tokens', parseInteger('max-new-tokens', values['max-new-tokens'], { min: 1 }));

  // Field names exactly as in generator.proto (the loader keeps their case).
  const request = {
    intents,
    num_records: parseInteger('num-records', values['num-records'] ?? '10', { min: 1 }),
    sampling,
    allow_training_copies: Boolean(values['allow-training-copies']),
    require_predicted_intent: Boolean(values['require-predicted-intent']),
  };
  setIf(request, 'num_prompt_examples', parseInteger('num-prompt-examples', values['num-prompt-examples']));
  setIf(request, 'sequences_per_round', parseInteger('sequences-per-round', values['sequences-per-round'], { min: 1 }));
  setIf(request, 'max_rounds', parseInteger('max-rounds', values['max-rounds'], { min: 1 }));
  setIf(request, 'min_fidelity', parseFloatOption('min-fidelity', values['min-fidelity']));
  if (values['allow-recent-duplicates'] && values['avoid-recent-duplicates']) {
    throw new UsageError('give --allow-recent-duplicates or --avoid-recent-duplicates, not both');
  }
  if (values['allow-recent-duplicates']) request.avoid_recent_duplicates = false;
  if (values['avoid-recent-duplicates']) request.avoid_recent_duplicates = true;
  request.examples = parseExamples(values.example);
  if (values['label-check'] && values['no-label-check']) {
    throw new UsageError('give --label-check or --no-label-check, not both');
  }
  if (values['label-check']) request.label_check = true;
  if (values['no-label-check']) request.label_check = false;
  setIf(request, 'label_margin', parseFloatOption('label-margin', values['label-margin']));

  const timeout = parseFloatOption('timeout', values.timeout);
  if (timeout !== undefined && timeout <= 0) throw new UsageError('--timeout must be above 0 seconds');

  return {
    help: false,
    target: values.target || env.CONDGEN_TARGET || DEFAULT_TARGET,
    protos: path.resolve(values.protos || env.CONDGEN_PROTOS || DEFAULT_PROTOS),
    token: values.token ?? env.CONDGEN_TOKEN,
    requestId: values['request-id'],
    tls: Boolean(values.tls || values['ca-cert']),
    caCert: values['ca-cert'],
    timeout,
    header: Boolean(values.header),
    request,
  };
}

/** One CSV field, quoted like a CSV writer's minimal quoting (RFC 4180). */
function csvField(value) {
  const text = String(value);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function csvLine(fields) {
  return `${fields.map(csvField).join(',')}\n`;
}

function loadGeneratorService(protosDir) {
  const file = path.join(protosDir, PROTO_FILE);
  if (!fs.existsSync(file)) {
    throw new UsageError(`no ${PROTO_FILE} under ${protosDir}: `
      + "point --protos (or CONDGEN_PROTOS) at the repository's protos/ folder");
  }
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protosDir],
    keepCase: true, // snake_case field names, as written in the .proto
    longs: String, // uint64 (seed, tokens_generated) as decimal strings
    enums: String,
    defaults: true,
    oneofs: true, // GenerateResponse.item names the member that is set
  });
  return grpc.loadPackageDefinition(definition).condgen.v1.Generator;
}

function channelCredentials(settings) {
  if (!settings.tls) return grpc.credentials.createInsecure();
  let ca = null;
  if (settings.caCert) {
    try {
      ca = fs.readFileSync(settings.caCert);
    } catch (err) {
      throw new UsageError(`cannot read --ca-cert ${settings.caCert}: ${err.message}`);
    }
  }
  return grpc.credentials.createSsl(ca);
}

const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpc.status).filter(([, code]) => typeof code === 'number').map(([name, code]) => [code, name]),
);

function statusName(code) {
  return STATUS_NAMES[code] || `status ${code}`;
}

function describeSummary(summary, counts) {
  const lines = [];
  const state = summary.complete ? 'complete' : 'INCOMPLETE';
  lines.push(`summary: ${summary.records_accepted} records accepted, ${summary.lines_parsed} lines parsed, `
    + `${summary.rounds} rounds, ${summary.tokens_generated} tokens, `
    + `${Number(summary.elapsed_seconds).toFixed(2)} s, ${state}`);
  lines.push(`records per intent: ${Object.entries(counts).map(([k, v]) => `${k}=${v}`).join(' ')}`);
  const rejected = Object.entries(summary.rejected || {}).filter(([, n]) => Number(n) > 0);
  lines.push(`rejected: ${rejected.length ? rejected.map(([k, v]) => `${k}=${v}`).join(' ') : 'none'}`);
  if (!summary.complete) {
    lines.push(`warning: the round budget ran out before ${summary.incomplete_intents.join(', ')} `
      + 'reached --num-records; raise --max-rounds or relax the filters');
  }
  return `${lines.join('\n')}\n`;
}

/** Runs one Generate call; resolves with the process exit status. */
function generate(settings, { stdout = process.stdout, stderr = process.stderr } = {}) {
  const Generator = loadGeneratorService(settings.protos);
  const client = new Generator(settings.target, channelCredentials(settings));
  const metadata = new grpc.Metadata();
  if (settings.token) metadata.set('authorization', `Bearer ${settings.token}`);
  if (settings.requestId) metadata.set('x-request-id', settings.requestId);
  const options = {};
  if (settings.timeout !== undefined) options.deadline = new Date(Date.now() + settings.timeout * 1000);

  const counts = Object.fromEntries(settings.request.intents.map((intent) => [intent, 0]));
  if (settings.header) stdout.write(csvLine(['intent', 'text']));

  return new Promise((resolve) => {
    let summary = null;
    let finished = false;
    const call = client.Generate(settings.request, metadata, options);
    const finish = (status) => {
      if (finished) return;
      finished = true;
      process.removeListener('SIGINT', onInterrupt);
      client.close();
      resolve(status);
    };
    const onInterrupt = () => call.cancel();
    process.once('SIGINT', onInterrupt);
    stdout.on('error', (err) => {
      // A closed pipe (`| head`): stop the stream quietly.
      if (err.code === 'EPIPE') {
        call.cancel();
        finish(0);
      }
    });

    call.on('data', (response) => {
      if (finished) return;
      if (response.item === 'record') {
        const record = response.record;
        counts[record.intent] = (counts[record.intent] || 0) + 1;
        stdout.write(csvLine([record.intent, record.text]));
      } else if (response.item === 'summary') {
        summary = response.summary;
      }
    });
    call.on('error', (err) => {
      if (err.code === grpc.status.CANCELLED && finished) return;
      // The server echoes the call's request id in its trailers (its own when none was sent).
      const echoed = err.metadata ? err.metadata.get('x-request-id')[0] : undefined;
      const requestId = echoed || settings.requestId;
      const where = requestId ? ` (request id ${requestId})` : '';
      const details = err.details || err.message;
      stderr.write(`error: Generate on ${settings.target} failed${where}: ${statusName(err.code)}: ${details}\n`);
      finish(err.code === grpc.status.CANCELLED ? 130 : 1);
    });
    // The call is over once every message was read ('end') and the status arrived ('status').
    let ended = false;
    let statusOk = false;
    const complete = () => {
      if (finished || !ended || !statusOk) return;
      if (summary === null) {
        stderr.write(`error: the stream from ${settings.target} ended without a summary\n`);
        finish(1);
        return;
      }
      stderr.write(describeSummary(summary, counts));
      finish(0);
    };
    call.on('end', () => { ended = true; complete(); });
    call.on('status', (status) => { statusOk = status.code === grpc.status.OK; complete(); });
  });
}

async function main() {
  let settings;
  try {
    settings = parseCommandLine(process.argv.slice(2), process.env);
    if (settings.help) {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    return await generate(settings);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`error: ${err.message}\n(node generate.js --help lists the options)\n`);
      return 2;
    }
    throw err;
  }
}

if (require.main === module) {
  main().then((status) => { process.exitCode = status; }, (err) => {
    process.stderr.write(`error: ${err.stack || err}\n`);
    process.exitCode = 1;
  });
}

module.exports = { csvField, csvLine, parseCommandLine, generate };
