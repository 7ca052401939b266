/**
 * `mpq vhost blk|rng`: vhost-user back-end programs following vhost-user.rst "Back-end program
 * conventions": --socket-path or --fd (or systemd socket activation), --print-capabilities,
 * no daemonizing, quick exit on SIGTERM, early non-zero exit on bad arguments.
 * @module
 */
import { parseArgs } from "node:util";
import { getpid } from "../../ffi/mod.ts";
import { InputError, UsageError } from "../cli/errors.ts";
import { intOption } from "../cli/options.ts";
import { DEFAULT_POLL_US, VhostUserDaemon } from "./daemon.ts";
import { DeviceOpenError, openDevice, type OpenedDevice } from "./device_factory.ts";
import { type DeviceSpec, hostQueueCount, type Listen, MAX_QUEUES } from "./device_spec.ts";
import { type EngineChoice, parseEngineChoice } from "./devices/blk_engine.ts";
import { sdNotify } from "../cli/sd_notify.ts";
import { defaultQueueThreads, QueuePool } from "./queue_thread.ts";
import { ctlMain, serveMain } from "./serve_cli.ts";
import { reactorWake } from "./wake.ts";

const COMMON = `  --socket-path=PATH      listen on this UNIX socket path
  --fd=N                  serve an inherited listening socket (exclusive with --socket-path)
                          (with neither, systemd socket activation: LISTEN_PID/LISTEN_FDS, fd 3)
  --print-capabilities    print the vhost-user.json capabilities and exit
  --metrics=PATH          serve Prometheus metrics on this UNIX socket (SIGUSR1 logs a summary)
  --poll-us=N             busy-poll the rings after the last request, for an adaptive window of
                          at most N microseconds (default 128; 0: never poll)
  --queue-threads=N       threads serving a multi-queue device's rings, this one included, 1..64
                          (default: the CPU count; 1: every ring on the daemon's thread)
  -h, --help              this text`;

/** Usage of `mpq vhost`. */
export const USAGE = `Usage: mpq vhost blk --blk-file PATH [options]
       mpq vhost rng [options]
       mpq vhost serve --device SPEC... [--config FILE] [--control PATH] [--metrics PATH]
       mpq vhost ctl SOCKET list|add SPEC|remove ID [--force]|stop [--json]

vhost-user back-end daemons for QEMU (vhost-user-blk-pci, vhost-user-rng-pci).

blk options:
  --blk-file=PATH         raw image file or block device (required)
  --read-only             refuse writes (VIRTIO_BLK_F_RO)
  --serial=ID             GET_ID answer (at most 20 bytes)
  --blk-size=512|4096     logical block size (default 512)
  --num-queues=N          request queues offered, 1..64 (default: the host's CPU count, so
                          QEMU's default of one queue per vCPU works)
  --direct                O_DIRECT on the file
  --writeback             advertise a writeback cache (FLUSH = fdatasync); default writethrough
  --engine=auto|uring|vmcopy|preadv   I/O engine (default auto)
  --io-threads=0|1        vmcopy: a helper thread copies half of each big batch (default 1)

common options:
${COMMON}

serve: many devices in one process (\`mpq vhost serve --help\`); ctl: its control socket's client.`;

const CAPABILITIES: Record<string, unknown> = {
  blk: { type: "block", features: ["read-only", "blk-file"] },
  rng: { type: "rng" },
};

function intArg(name: string, value: string | undefined, min: number, max: number): number | undefined {
  return intOption(name, value, { min, max, usage: USAGE });
}

/** Resolves where to listen: --socket-path, --fd, or systemd's fd 3. */
function listenArg(socketPath: string | undefined, fd: string | undefined): Listen {
  if (socketPath !== undefined && fd !== undefined) {
    throw new UsageError("--socket-path and --fd are mutually exclusive", USAGE);
  }
  if (socketPath !== undefined) {
    if (socketPath === "") throw new UsageError("--socket-path must not be empty", USAGE);
    return { socket: socketPath };
  }
  const n = intArg("fd", fd, 0, 1 << 20);
  if (n !== undefined) return { fd: n };
  const pid = Deno.env.get("LISTEN_PID");
  const fds = Deno.env.get("LISTEN_FDS");
  if (pid && fds && Number(pid) === getpid() && Number(fds) >= 1) {
    Deno.env.delete("LISTEN_PID");
    Deno.env.delete("LISTEN_FDS");
    Deno.env.delete("LISTEN_FDNAMES");
    return { fd: 3 };
  }
  throw new UsageError("one of --socket-path or --fd is required (or systemd socket activation)", USAGE);
}

/** The flag a DeviceOpenError's field stands for in the single-device form. */
const FIELD_FLAGS: Record<string, string> = {
  file: "--blk-file",
  engine: "--engine",
  socket: "--socket-path",
  fd: "--fd",
};

/** `mpq vhost blk|rng|serve|ctl ...`: returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const [kind, ...rest] = args;
  if (kind === undefined || kind === "-h" || kind === "--help") {
    console.log(USAGE);
    return kind === undefined ? 1 : 0;
  }
  if (kind === "serve") return await serveMain(rest);
  if (kind === "ctl") return await ctlMain(rest);
  if (kind !== "blk" && kind !== "rng") {
    throw new UsageError(`unknown device '${kind}': expected blk, rng, serve or ctl`, USAGE);
  }
  let parsed;
  try {
    parsed = parseArgs({
      args: rest,
      strict: true,
      allowPositionals: false,
      options: {
        "socket-path": { type: "string" },
        fd: { type: "string" },
        "print-capabilities": { type: "boolean" },
        metrics: { type: "string" },
        "poll-us": { type: "string" },
        "queue-threads": { type: "string" },
        help: { type: "boolean", short: "h" },
        ...(kind === "blk"
          ? {
            "blk-file": { type: "string" },
            "read-only": { type: "boolean" },
            serial: { type: "string" },
            "blk-size": { type: "string" },
            "num-queues": { type: "string" },
            direct: { type: "boolean" },
            writeback: { type: "boolean" },
            engine: { type: "string" },
            "io-threads": { type: "string" },
          } as const
          : {}),
      },
    });
  } catch (e) {
    throw new UsageError((e as Error).message, USAGE);
  }
  const v = parsed.values as Record<string, string | boolean | undefined>;
  if (v.help) {
    console.log(USAGE);
    return 0;
  }
  if (v["print-capabilities"]) {
    console.log(JSON.stringify(CAPABILITIES[kind]));
    return 0;
  }
  const str = (k: string) => v[k] as string | undefined;
  const pollUs = intArg("poll-us", str("poll-us"), 0, 10_000_000) ?? DEFAULT_POLL_US;
  const queueThreads = intArg("queue-threads", str("queue-threads"), 1, 64) ?? defaultQueueThreads();
  let spec: DeviceSpec;
  if (kind === "blk") {
    const file = str("blk-file");
    if (!file) throw new UsageError("--blk-file is required", USAGE);
    const blkSize = intArg("blk-size", str("blk-size"), 512, 4096) ?? 512;
    if (blkSize !== 512 && blkSize !== 4096) {
      throw new UsageError(`--blk-size must be 512 or 4096: got ${blkSize}`, USAGE);
    }
    const serial = str("serial") ?? "";
    if (new TextEncoder().encode(serial).byteLength > 20) {
      throw new UsageError(`--serial must be at most 20 bytes: got ${JSON.stringify(serial)}`, USAGE);
    }
    let engine: EngineChoice;
    try {
      engine = parseEngineChoice(str("engine") ?? "auto");
    } catch (e) {
      throw new UsageError(`--${(e as Error).message}`, USAGE);
    }
    spec = {
      type: "blk",
      id: "blk",
      listen: listenArg(str("socket-path"), str("fd")),
      file,
      readOnly: !!v["read-only"],
      serial,
      blkSize,
      numQueues: intArg("num-queues", str("num-queues"), 1, MAX_QUEUES) ?? hostQueueCount(),
      direct: !!v.direct,
      writeback: !!v.writeback,
      engine,
      ioThreads: (intArg("io-threads", str("io-threads"), 0, 1) ?? 1) as 0 | 1,
    };
  } else {
    spec = { type: "rng", id: "rng", listen: listenArg(str("socket-path"), str("fd")) };
  }
  let opened: OpenedDevice;
  try {
    opened = openDevice(spec);
  } catch (e) {
    if (e instanceof DeviceOpenError) throw new InputError(`${FIELD_FLAGS[e.field]} ${e.message}`);
    throw e;
  }
  const l = opened.listener;
  const pool = queueThreads > 1 ? new QueuePool(queueThreads) : null;
  let daemon: VhostUserDaemon;
  try {
    daemon = new VhostUserDaemon(opened.device, l, {
      queueThreads: pool ? { pool, spec } : undefined,
      metricsPath: str("metrics"),
      pollUs,
      signals: true,
      trace: Deno.env.get("MPQ_VHOST_TRACE") === "1",
      wake: reactorWake(),
    });
  } catch (e) {
    l.close();
    opened.device.close();
    throw new InputError(`${(e as Error).message}`);
  }
  if (kind === "blk") {
    console.error(
      `mpq vhost blk: ${opened.describe}, polling ${pollUs > 0 ? `adaptive up to ${pollUs} µs` : "off"}`,
    );
  }
  console.error(`mpq vhost ${kind}: listening on ${l.path ?? `fd ${str("fd") ?? 3}`}`);
  sdNotify(`READY=1\nSTATUS=listening on ${l.path ?? `fd ${str("fd") ?? 3}`}`);
  try {
    await daemon.run();
  } finally {
    sdNotify("STOPPING=1");
    daemon.close();
    await pool?.stop();
  }
  return 0;
}
