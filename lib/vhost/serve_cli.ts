/**
 * `mpq vhost serve` (many devices in one process) and `mpq vhost ctl` (its control socket's
 * client): argument and config-file parsing, usage text, exit codes.
 * @module
 */
import { parseArgs } from "node:util";
import { InputError, UsageError } from "../cli/errors.ts";
import { intOption } from "../cli/options.ts";
import { DEFAULT_POLL_US } from "./daemon.ts";
import { DeviceOpenError } from "./device_factory.ts";
import {
  checkUnique,
  type DeviceSpec,
  deviceSpecFromJson,
  hostQueueCount,
  parseDeviceArg,
  SpecError,
} from "./device_spec.ts";
import { VhostServer } from "./server.ts";
import { defaultQueueThreads } from "./queue_thread.ts";
import { reactorWake } from "./wake.ts";
import { controlRequest } from "../cli/control_client.ts";
import { sdNotify } from "../cli/sd_notify.ts";

/** Usage of `mpq vhost serve`. */
export const SERVE_USAGE = `Usage: mpq vhost serve [--device SPEC]... [--config FILE] [options]

Serves several vhost-user devices from one process (each on its own socket or inherited fd).

  --device SPEC        a device, QEMU -device style (repeatable; a comma in a value is written twice):
                         blk,file=PATH,socket=PATH|fd=N[,id=ID][,read-only][,serial=S][,blk-size=512|4096]
                             [,num-queues=N][,direct][,writeback][,engine=auto|uring|vmcopy|preadv]
                             [,io-threads=0|1]
                         rng,socket=PATH|fd=N[,id=ID]
  --config FILE        JSON: {"devices": [{"type": "blk", "id": "d0", "file": "...", "socket": "..."}],
                         "control": PATH, "metrics": PATH, "pollUs": N} (flags add to it)
  --control PATH       a JSON-lines control socket (mode 0600): list, add, remove, stop (mpq vhost ctl)
  --metrics PATH       every device's Prometheus metrics, labelled device="ID"
  --poll-us N          adaptive busy-poll window maximum per device, µs (default ${DEFAULT_POLL_US}; 0: off)
  --threads N          device threads, each sleeping in its own epoll_wait; devices are spread over them
                         (default 0: all devices on the main thread, with the control and metrics sockets)
  --queue-threads N    threads serving a multi-queue device's rings, the device's own thread included,
                         1..64 (default: the CPU count; 1: all of a device's rings on its thread)
  -h, --help           this text

Ids default to the type and position (blk0, rng1). blk num-queues defaults to the host's CPU count.`;

/** Usage of `mpq vhost ctl`. */
export const CTL_USAGE = `Usage: mpq vhost ctl SOCKET COMMAND [ARGS] [--json]

Talks to the control socket of \`mpq vhost serve --control SOCKET\`.

  list                 the devices: id, type, where they listen, connected, requests
  add SPEC             serve one more device (SPEC as for --device, or a JSON object)
  remove ID [--force]  stop serving a device (refused while a front-end is connected, unless --force)
  stop                 stop the server
  --json               print the reply as JSON
  -h, --help           this text`;

/** What a config file holds. */
interface ServeConfig {
  devices: unknown[];
  control?: string;
  metrics?: string;
  pollUs?: number;
}

function readConfig(path: string): ServeConfig {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (e) {
    throw new InputError(`--config ${path}: ${(e as Error).message}`);
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new InputError(`--config ${path}: not JSON: ${(e as Error).message}`);
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new InputError(`--config ${path}: expected a JSON object`);
  }
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!["devices", "control", "metrics", "pollUs"].includes(k)) {
      throw new InputError(
        `--config ${path}: unknown key ${JSON.stringify(k)} (keys: devices, control, metrics, pollUs)`,
      );
    }
  }
  const devices = o.devices ?? [];
  if (!Array.isArray(devices)) throw new InputError(`--config ${path}: devices: expected an array`);
  for (const k of ["control", "metrics"] as const) {
    if (o[k] !== undefined && (typeof o[k] !== "string" || o[k] === "")) {
      throw new InputError(`--config ${path}: ${k}: expected a socket path`);
    }
  }
  if (o.pollUs !== undefined && !(Number.isSafeInteger(o.pollUs) && (o.pollUs as number) >= 0)) {
    throw new InputError(
      `--config ${path}: pollUs: expected an integer >= 0: got ${JSON.stringify(o.pollUs)}`,
    );
  }
  return {
    devices,
    control: o.control as string | undefined,
    metrics: o.metrics as string | undefined,
    pollUs: o.pollUs as number | undefined,
  };
}

/** `mpq vhost serve ...`. */
export async function serveMain(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        device: { type: "string", multiple: true },
        config: { type: "string" },
        control: { type: "string" },
        metrics: { type: "string" },
        "poll-us": { type: "string" },
        threads: { type: "string" },
        "queue-threads": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message, SERVE_USAGE);
  }
  const v = parsed.values;
  if (v.help) {
    console.log(SERVE_USAGE);
    return 0;
  }
  const config: ServeConfig = v.config ? readConfig(v.config) : { devices: [] };
  const specs: DeviceSpec[] = [];
  const queues = hostQueueCount();
  config.devices.forEach((d, i) => {
    try {
      specs.push(deviceSpecFromJson(d, { defaultQueues: queues, index: specs.length }));
    } catch (e) {
      if (!(e instanceof SpecError)) throw e;
      throw new InputError(`--config ${v.config}: devices[${i}]: ${e.message}`);
    }
  });
  (v.device ?? []).forEach((text, i) => {
    try {
      specs.push(parseDeviceArg(text, { defaultQueues: queues, index: specs.length }));
    } catch (e) {
      if (!(e instanceof SpecError)) throw e;
      throw new UsageError(`--device ${JSON.stringify(text)} (#${i + 1}): ${e.message}`, SERVE_USAGE);
    }
  });
  const control = v.control ?? config.control;
  if (specs.length === 0 && !control) {
    throw new UsageError(
      "nothing to serve: give --device, a --config with devices, or --control",
      SERVE_USAGE,
    );
  }
  try {
    checkUnique(specs);
  } catch (e) {
    throw new UsageError((e as Error).message, SERVE_USAGE);
  }
  const pollUs = intOption("poll-us", v["poll-us"], { min: 0, max: 10_000_000, usage: SERVE_USAGE }) ??
    config.pollUs ?? DEFAULT_POLL_US;
  let server: VhostServer;
  try {
    server = new VhostServer({
      controlPath: control,
      metricsPath: v.metrics ?? config.metrics,
      pollUs,
      signals: true,
      trace: Deno.env.get("MPQ_VHOST_TRACE") === "1",
      defaultQueues: queues,
      wake: reactorWake(),
      threads: intOption("threads", v.threads, { min: 0, max: 64, usage: SERVE_USAGE }) ?? 0,
      queueThreads: intOption("queue-threads", v["queue-threads"], { min: 1, max: 64, usage: SERVE_USAGE }) ??
        defaultQueueThreads(),
    });
  } catch (e) {
    throw new InputError((e as Error).message);
  }
  try {
    for (const spec of specs) {
      try {
        await server.add(spec);
      } catch (e) {
        const field = e instanceof DeviceOpenError ? ` ${e.field}` : "";
        throw new InputError(`device ${spec.id}${field}: ${(e as Error).message}`);
      }
    }
  } catch (e) {
    await server.close();
    throw e;
  }
  if (control) console.error(`mpq vhost serve: control socket ${control}`);
  sdNotify(`READY=1\nSTATUS=serving ${specs.length} device${specs.length === 1 ? "" : "s"}`);
  try {
    await server.run();
  } finally {
    sdNotify("STOPPING=1");
    await server.close();
  }
  return 0;
}

/** `mpq vhost ctl SOCKET COMMAND ...`. */
export async function ctlMain(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: true,
      options: {
        json: { type: "boolean" },
        force: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message, CTL_USAGE);
  }
  if (parsed.values.help) {
    console.log(CTL_USAGE);
    return 0;
  }
  const [path, cmd, ...rest] = parsed.positionals;
  if (!path || !cmd) throw new UsageError("a control socket and a command are required", CTL_USAGE);
  let req: Record<string, unknown>;
  switch (cmd) {
    case "list":
    case "stop":
      if (rest.length) throw new UsageError(`${cmd} takes no arguments: got ${rest.join(" ")}`, CTL_USAGE);
      req = {};
      break;
    case "add": {
      if (rest.length !== 1) throw new UsageError("add takes one device SPEC", CTL_USAGE);
      const text = rest[0];
      if (text.trimStart().startsWith("{")) {
        try {
          req = { device: JSON.parse(text) };
        } catch (e) {
          throw new UsageError(`add: the device is not JSON: ${(e as Error).message}`, CTL_USAGE);
        }
      } else {
        req = { device: text };
      }
      break;
    }
    case "remove":
      if (rest.length !== 1) throw new UsageError("remove takes one device ID", CTL_USAGE);
      req = { id: rest[0], force: parsed.values.force === true };
      break;
    default:
      throw new UsageError(`unknown command '${cmd}': expected list, add, remove or stop`, CTL_USAGE);
  }
  const reply = await controlRequest(path, cmd, req);
  if (parsed.values.json) {
    console.log(JSON.stringify(reply));
  } else if (!reply.ok) {
    console.error(`mpq vhost ctl: ${cmd}: ${reply.error}`);
  } else if (cmd === "list") {
    const rows = reply.result as Array<Record<string, unknown>>;
    console.log(["ID", "TYPE", "LISTEN", "CONNECTED", "REQUESTS"].join("\t"));
    for (const r of rows) {
      console.log([r.id, r.type, r.listen, r.connected ? "yes" : "no", r.requests].join("\t"));
    }
  } else if (cmd === "add") {
    const r = reply.result as Record<string, unknown>;
    console.log(`added ${r.id}: ${r.describe}, listening on ${r.listen}`);
  } else if (cmd === "remove") {
    console.log(`removed ${rest[0]}`);
  } else {
    console.log("stopping");
  }
  return reply.ok ? 0 : 1;
}
