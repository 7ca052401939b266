/**
 * `mpq vhost blk|rng`: vhost-user back-end programs following vhost-user.rst "Back-end program
 * conventions": --socket-path or --fd (or systemd socket activation), --print-capabilities,
 * no daemonizing, quick exit on SIGTERM, early non-zero exit on bad arguments.
 * @module
 */
import { parseArgs } from "node:util";
import {
  adoptListener,
  getpid,
  isListeningSocket,
  listenUnix,
  OwnedFd,
  type UnixListener,
} from "../../ffi/mod.ts";
import { InputError, UsageError } from "../cli/errors.ts";
import type { VhostUserDevice } from "./backend.ts";
import { DEFAULT_POLL_US, VhostUserDaemon } from "./daemon.ts";
import { BlkDevice, openBlkFile } from "./devices/blk.ts";
import { type EngineChoice, parseEngineChoice } from "./devices/blk_engine.ts";
import { RngDevice } from "./devices/rng.ts";

const COMMON = `  --socket-path=PATH      listen on this UNIX socket path
  --fd=N                  serve an inherited listening socket (exclusive with --socket-path)
                          (with neither, systemd socket activation: LISTEN_PID/LISTEN_FDS, fd 3)
  --print-capabilities    print the vhost-user.json capabilities and exit
  --metrics=PATH          serve Prometheus metrics on this UNIX socket (SIGUSR1 logs a summary)
  --poll-us=N             busy-poll the rings after the last request, for an adaptive window of
                          at most N microseconds (default 32, as QEMU IOThreads; 0: never poll)
  -h, --help              this text`;

/** Usage of `mpq vhost`. */
export const USAGE = `Usage: mpq vhost blk --blk-file PATH [options]
       mpq vhost rng [options]

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
${COMMON}`;

const CAPABILITIES: Record<string, unknown> = {
  blk: { type: "block", features: ["read-only", "blk-file"] },
  rng: { type: "rng" },
};

function intArg(name: string, value: string | undefined, min: number, max: number): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UsageError(
      `--${name} must be an integer in ${min}..${max}: got ${JSON.stringify(value)}`,
      USAGE,
    );
  }
  return n;
}

/** QEMU's vhost-user-blk-pci asks for one queue per vCPU: offer as many as the host has CPUs. */
function defaultQueues(): number {
  return Math.min(64, Math.max(1, navigator.hardwareConcurrency || 1));
}

/** Resolves where to listen: --socket-path, --fd, or systemd's fd 3. */
function listener(socketPath: string | undefined, fd: string | undefined): UnixListener {
  if (socketPath !== undefined && fd !== undefined) {
    throw new UsageError("--socket-path and --fd are mutually exclusive", USAGE);
  }
  if (socketPath !== undefined) {
    if (socketPath === "") throw new UsageError("--socket-path must not be empty", USAGE);
    try {
      return listenUnix(socketPath);
    } catch (e) {
      throw new InputError(`--socket-path ${socketPath}: ${(e as Error).message}`);
    }
  }
  let n = intArg("fd", fd, 0, 1 << 20);
  if (n === undefined) {
    const pid = Deno.env.get("LISTEN_PID");
    const fds = Deno.env.get("LISTEN_FDS");
    if (pid && fds && Number(pid) === getpid() && Number(fds) >= 1) {
      n = 3;
      Deno.env.delete("LISTEN_PID");
      Deno.env.delete("LISTEN_FDS");
      Deno.env.delete("LISTEN_FDNAMES");
    } else {
      throw new UsageError("one of --socket-path or --fd is required (or systemd socket activation)", USAGE);
    }
  }
  const owned = OwnedFd.unsafeAdopt(n, `fd ${n}`);
  try {
    if (!isListeningSocket(owned)) throw new Error("the socket is not listening");
    return adoptListener(owned);
  } catch (e) {
    owned.unsafeRelease();
    throw new InputError(`--fd ${n}: not a usable listening socket: ${(e as Error).message}`);
  }
}

/** `mpq vhost <blk|rng> ...`; returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const [kind, ...rest] = args;
  if (kind === undefined || kind === "-h" || kind === "--help") {
    console.log(USAGE);
    return kind === undefined ? 1 : 0;
  }
  if (kind !== "blk" && kind !== "rng") {
    throw new UsageError(`unknown device '${kind}': expected blk or rng`, USAGE);
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
  let device: VhostUserDevice;
  if (kind === "blk") {
    const file = str("blk-file");
    if (!file) throw new UsageError("--blk-file is required", USAGE);
    const blkSize = intArg("blk-size", str("blk-size"), 512, 4096) ?? 512;
    if (blkSize !== 512 && blkSize !== 4096) {
      throw new UsageError(`--blk-size must be 512 or 4096: got ${blkSize}`, USAGE);
    }
    const numQueues = intArg("num-queues", str("num-queues"), 1, 64) ?? defaultQueues();
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
    const opts = {
      readOnly: !!v["read-only"],
      serial,
      blkSize,
      numQueues,
      direct: !!v.direct,
      writeback: !!v.writeback,
      engine,
      ioThreads: intArg("io-threads", str("io-threads"), 0, 1) ?? 1,
    };
    let opened: { fd: OwnedFd; size: number };
    try {
      opened = openBlkFile(file, opts);
    } catch (e) {
      throw new InputError(`--blk-file ${file}: ${(e as Error).message}`);
    }
    try {
      device = new BlkDevice(opened.fd, opened.size, opts);
    } catch (e) {
      opened.fd.close();
      // "engine vmcopy: ...", "engine uring: ..."
      throw new InputError(`--${(e as Error).message}`);
    }
  } else {
    device = new RngDevice();
  }
  let l: UnixListener;
  try {
    l = listener(str("socket-path"), str("fd"));
  } catch (e) {
    device.close();
    throw e;
  }
  let daemon: VhostUserDaemon;
  try {
    daemon = new VhostUserDaemon(device, l, {
      metricsPath: str("metrics"),
      pollUs,
      signals: true,
      trace: Deno.env.get("MPQ_VHOST_TRACE") === "1",
    });
  } catch (e) {
    l.close();
    device.close();
    throw new InputError(`${(e as Error).message}`);
  }
  if (device instanceof BlkDevice) {
    console.error(
      `mpq vhost blk: ${str("blk-file")}, ${device.size} bytes, ${
        device.writeback ? "writeback" : "writethrough"
      }` +
        `, engine ${device.engine} (${device.engineReason})` +
        `${
          device.engine === "vmcopy"
            ? `, ${device.ioThreads} helper thread${device.ioThreads === 1 ? "" : "s"}`
            : ""
        }, ` +
        `polling ${pollUs > 0 ? `adaptive up to ${pollUs} µs` : "off"}`,
    );
  }
  console.error(`mpq vhost ${kind}: listening on ${l.path ?? `fd ${str("fd") ?? 3}`}`);
  try {
    await daemon.run();
  } finally {
    daemon.close();
  }
  return 0;
}
